"""The test, 5k and 1k-5fold protocols on hand-made embeddings with known answers."""

import math

import numpy as np
import pytest
import torch
from dsran.evaluate.protocols import (
    COCO_TEST_IMAGES,
    FOLD_IMAGES,
    ProtocolError,
    build_eval_set,
    ensemble_similarity,
    evaluate_protocol,
    load_eval_set,
    protocol_folds,
)
from dsran.extract.store import FeatureStore, StoreError


def make_eval_set(captions_per_image, split="test"):
    """An eval set over store rows 0..N-1 whose captions are listed image by image."""
    num_images = len(captions_per_image)
    caption_image = np.repeat(np.arange(num_images), captions_per_image)
    return build_eval_set(
        split,
        np.arange(num_images),
        caption_image,
        np.array([f"img{i}.jpg" for i in range(num_images)], dtype=object),
        np.array([f"caption {c} of img{i}" for c, i in enumerate(caption_image)], dtype=object),
    )


def circle(angles):
    angles = torch.as_tensor(angles, dtype=torch.float64)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=1).float()


def coco_like_embeddings():
    """5,000 images on a circle: each fold spaced by s, the folds offset by s/5.

    Captions sit at their image's angle + 0.35 s. Within a fold the own image is the
    nearest (0.35 s against 0.65 s), so every rank is 1. Over all 5,000 images the
    neighbours are s/5 apart, and three images lie closer to each caption (0.15 s,
    0.05 s and 0.25 s away). So every caption ranks 4th, and each image finds the
    captions of its three predecessors (at least 12) before its own.
    """
    step = 2 * math.pi / FOLD_IMAGES
    captions_per_image = [4, 6] * (COCO_TEST_IMAGES // 2)
    eval_set = make_eval_set(captions_per_image)
    index = np.arange(COCO_TEST_IMAGES)
    fold, position = index // FOLD_IMAGES, index % FOLD_IMAGES
    image_angles = position * step + fold * step / 5
    images = circle(image_angles)
    captions = circle(image_angles[eval_set.caption_image] + 0.35 * step)
    return eval_set, images, captions


def test_test_protocol_known_answers():
    # Images on the axes of 4-D space, with 4 and 6 captions in turn. Two captions point
    # at the wrong image: caption 0 (of image 0) at image 1, caption 4 (of image 1)
    # at image 3.
    captions_per_image = [4, 6, 4, 6]
    eval_set = make_eval_set(captions_per_image)
    images = torch.eye(4)
    targets = eval_set.caption_image.copy()
    targets[0], targets[4] = 1, 3
    captions = images[torch.from_numpy(targets)]

    result = evaluate_protocol("test", eval_set, [images], [captions], device="cpu")

    assert len(result.folds) == 1
    assert result.folds[0].fold.name == "all"
    assert result.metrics["i2t_r1"] == 100.0
    assert result.metrics["t2i_r1"] == pytest.approx(100.0 * 18 / 20)
    assert result.metrics["t2i_r5"] == 100.0
    assert result.metrics["rsum"] == pytest.approx(500.0 + 90.0)
    ranks = result.folds[0].ranks
    assert ranks.t2i[0] == 2
    assert ranks.t2i_top1[0] == 1
    assert ranks.t2i_top1[4] == 3


def test_protocols_on_5000_images():
    eval_set, images, captions = coco_like_embeddings()
    assert eval_set.num_captions == 25_000

    folds = evaluate_protocol("1k-5fold", eval_set, [images], [captions], device="cpu")
    whole = evaluate_protocol("5k", eval_set, [images], [captions], device="cpu")

    assert [r.fold.name for r in folds.folds] == [f"fold{i}" for i in range(1, 6)]
    for fold_result in folds.folds:
        assert fold_result.metrics["rsum"] == 600.0, fold_result.fold.name
    assert folds.metrics["rsum"] == 600.0
    assert folds.metrics["t2i_medr"] == 1.0

    assert len(whole.folds) == 1
    assert whole.metrics["t2i_r1"] == 0.0
    assert whole.metrics["t2i_r5"] == 100.0
    assert whole.metrics["t2i_medr"] == 4.0
    assert whole.metrics["t2i_meanr"] == 4.0
    assert whole.metrics["i2t_r10"] == 0.0
    # Each image ranks after every caption of its three predecessors on the circle.
    step = 2 * math.pi / FOLD_IMAGES
    index = np.arange(COCO_TEST_IMAGES)
    order = np.argsort((index % FOLD_IMAGES) * step + (index // FOLD_IMAGES) * step / 5)
    counts = np.bincount(eval_set.caption_image)
    expected = np.empty(COCO_TEST_IMAGES, dtype=np.int64)
    for place, image in enumerate(order):
        predecessors = order[[place - 1, place - 2, place - 3]]
        expected[image] = 1 + counts[predecessors].sum()
    np.testing.assert_array_equal(whole.folds[0].ranks.i2t, expected)
    assert whole.metrics["i2t_medr"] >= 13.0


def test_fold_slicing_is_consecutive():
    captions_per_image = [4, 6] * (COCO_TEST_IMAGES // 2)
    eval_set = make_eval_set(captions_per_image)
    folds = protocol_folds("1k-5fold", eval_set)

    assert len(folds) == 5
    for index, fold in enumerate(folds):
        start = index * FOLD_IMAGES
        np.testing.assert_array_equal(fold.images, np.arange(start, start + FOLD_IMAGES))
        assert len(fold.captions) == 5000
        np.testing.assert_array_equal(
            eval_set.caption_image[fold.captions], fold.caption_image + start
        )
        assert fold.caption_image.min() == 0
        assert fold.caption_image.max() == FOLD_IMAGES - 1
    all_captions = np.concatenate([fold.captions for fold in folds])
    np.testing.assert_array_equal(all_captions, np.arange(eval_set.num_captions))


def test_fold_metrics_are_averaged():
    # Fold k has k wrong captions, pointing at the next image of the fold.
    captions_per_image = [5] * COCO_TEST_IMAGES
    eval_set = make_eval_set(captions_per_image)
    dim = FOLD_IMAGES
    images = torch.eye(dim).repeat(5, 1)
    targets = eval_set.caption_image % FOLD_IMAGES
    for fold in range(5):
        for wrong in range(fold):
            caption = (fold * FOLD_IMAGES + wrong) * 5
            targets[caption] = (targets[caption] + 1) % FOLD_IMAGES
    captions = torch.eye(dim)[torch.from_numpy(targets)]

    result = evaluate_protocol("1k-5fold", eval_set, [images], [captions], device="cpu")

    per_fold = [r.metrics["t2i_r1"] for r in result.folds]
    assert per_fold == pytest.approx([100.0 * (5000 - k) / 5000 for k in range(5)])
    assert result.metrics["t2i_r1"] == pytest.approx(np.mean(per_fold))
    assert result.metrics["i2t_r1"] == 100.0


def test_wrong_size_split_rejected():
    eval_set = make_eval_set([5] * 79, split="val")
    for protocol in ("5k", "1k-5fold"):
        with pytest.raises(ProtocolError, match="split 'val' has 79 images.*--split test"):
            protocol_folds(protocol, eval_set)
    with pytest.raises(ProtocolError, match="unknown protocol 'coco'.*'1k-5fold'"):
        protocol_folds("coco", eval_set)
    assert len(protocol_folds("test", eval_set)) == 1


def test_split_image_without_caption_rejected():
    with pytest.raises(ProtocolError, match="split 'test'.*no caption"):
        build_eval_set(
            "test",
            np.array([0, 1, 2]),
            np.array([0, 0, 2]),
            np.array(["a", "b", "c"], dtype=object),
            np.array(["x", "y", "z"], dtype=object),
        )


def test_eval_set_keeps_only_split_captions():
    eval_set = build_eval_set(
        "test",
        np.array([3, 1]),
        np.array([0, 1, 3, 3, 2, 1]),
        np.array(["a", "b", "c", "d"], dtype=object),
        np.array(["t0", "t1", "t2", "t3", "t4", "t5"], dtype=object),
    )
    assert eval_set.caption_rows.tolist() == [1, 2, 3, 5]
    assert eval_set.caption_image.tolist() == [1, 0, 0, 1]
    assert eval_set.image_paths.tolist() == ["d", "b"]
    assert eval_set.caption_texts.tolist() == ["t1", "t2", "t3", "t5"]


def test_ensemble_averages_similarities():
    # Model A scores image 0 at 0.5 with its caption 0 and 0.6 with caption 1, so it
    # misses by a small margin. Model B scores them 0.9 and 0.1, and the average follows it.
    images_a = images_b = torch.eye(2)
    captions_a = torch.tensor([[0.5, 0.0], [0.6, 0.9]])
    captions_b = torch.tensor([[0.9, 0.0], [0.1, 0.9]])
    eval_set = make_eval_set([1, 1])

    single = evaluate_protocol("test", eval_set, [images_a], [captions_a], device="cpu")
    pair = evaluate_protocol(
        "test", eval_set, [images_a, images_b], [captions_a, captions_b], device="cpu"
    )

    assert single.metrics["i2t_r1"] == 50.0
    assert pair.metrics["i2t_r1"] == 100.0
    expected = (images_a @ captions_a.T + images_b @ captions_b.T) / 2
    torch.testing.assert_close(
        ensemble_similarity([images_a, images_b], [captions_a, captions_b], device="cpu"),
        expected,
    )


def test_ensemble_shape_mismatch_rejected():
    with pytest.raises(ProtocolError, match="model 1 has 3 image"):
        ensemble_similarity(
            [torch.zeros(2, 4), torch.zeros(3, 4)], [torch.zeros(5, 4)] * 2, device="cpu"
        )
    with pytest.raises(ProtocolError, match="one image and one caption embedding matrix"):
        ensemble_similarity([torch.zeros(2, 4)], [], device="cpu")
    eval_set = make_eval_set([1, 1])
    with pytest.raises(ProtocolError, match="split 'test' has 2 images and 2 captions"):
        evaluate_protocol("test", eval_set, [torch.zeros(3, 4)], [torch.zeros(2, 4)])


def make_store(path, done, failed=None):
    """A store without features whose rows 0..len(done)-1 are marked done or not."""
    failed = np.zeros(len(done), dtype=bool) if failed is None else np.asarray(failed)
    num_images = len(done)
    store = FeatureStore.create(
        path, [f"im{i}.jpg" for i in range(num_images)], {"grid": None, "regions": None}
    )
    for chunk in range(store.num_chunks):
        rows = store.chunk_rows(chunk)
        count = rows.stop - rows.start
        store.write_chunk(
            chunk,
            {
                "images/width": np.full(count, 64),
                "images/height": np.full(count, 48),
                "images/failed": failed[rows],
                "images/done": np.asarray(done[rows]),
            },
        )
    store.write_captions(["c0", "c1", "c2", "c3", "c4"], [0, 2, 2, 1, 3])
    store.write_splits({"train": [0, 1], "test": [3, 2]})
    return store


def test_load_eval_set_from_store(tmp_path):
    store = make_store(tmp_path / "feats.zarr", [True] * 4)
    eval_set = load_eval_set(store, "test")
    assert eval_set.image_rows.tolist() == [3, 2]
    assert eval_set.image_paths.tolist() == ["im3.jpg", "im2.jpg"]
    assert eval_set.caption_texts.tolist() == ["c1", "c2", "c4"]
    assert eval_set.caption_image.tolist() == [1, 1, 0]
    with pytest.raises(StoreError, match="no split 'val'"):
        load_eval_set(store, "val")


def test_load_eval_set_rejects_unfinished_images(tmp_path):
    store = make_store(tmp_path / "feats.zarr", [True, True, False, True])
    with pytest.raises(StoreError, match="1 of 2 images of split 'test'.*first: im2.jpg"):
        load_eval_set(store, "test")


def test_load_eval_set_leaves_out_failed_images(tmp_path, caplog):
    store = make_store(
        tmp_path / "feats.zarr", [True, True, False, True], [False, False, True, False]
    )
    with caplog.at_level("WARNING"):
        eval_set = load_eval_set(store, "test")
    assert eval_set.image_paths.tolist() == ["im3.jpg"]
    assert eval_set.caption_texts.tolist() == ["c4"]
    assert eval_set.caption_image.tolist() == [0]
    assert "leaving out 1 of 2 images of split 'test' that failed extraction" in caplog.text
