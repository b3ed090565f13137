"""Recall@K by counting, checked against a per-query argsort reference and hand-made cases."""

import numpy as np
import pytest
import torch
from dsran.evaluate.recall import (
    metrics_from_ranks,
    recall_curve,
    retrieval_metrics,
    retrieval_ranks,
)


def reference_ranks(similarity: np.ndarray, caption_image: np.ndarray):
    """Slow, obvious ranks: sort every query's scores and find its positive."""
    num_images, num_captions = similarity.shape
    i2t = np.empty(num_images, dtype=np.int64)
    for image in range(num_images):
        order = np.argsort(-similarity[image], kind="stable")
        positions = [np.flatnonzero(order == c)[0] for c in np.flatnonzero(caption_image == image)]
        i2t[image] = min(positions) + 1
    t2i = np.empty(num_captions, dtype=np.int64)
    for caption in range(num_captions):
        order = np.argsort(-similarity[:, caption], kind="stable")
        t2i[caption] = np.flatnonzero(order == caption_image[caption])[0] + 1
    return i2t, t2i


def random_problem(seed: int, captions_per_image: list[int], dim: int = 16):
    """Seeded embeddings where captions lie near their image, with a known caption map."""
    rng = np.random.default_rng(seed)
    num_images = len(captions_per_image)
    caption_image = np.repeat(np.arange(num_images), captions_per_image)
    rng.shuffle(caption_image)
    images = rng.normal(size=(num_images, dim))
    captions = images[caption_image] + 1.5 * rng.normal(size=(len(caption_image), dim))
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    captions /= np.linalg.norm(captions, axis=1, keepdims=True)
    return (images @ captions.T).astype(np.float32), caption_image


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranks_match_argsort_reference(seed, backend):
    rng = np.random.default_rng(100 + seed)
    captions_per_image = rng.integers(4, 8, size=60).tolist()  # 4 to 7 captions
    similarity, caption_image = random_problem(seed, captions_per_image)

    ranks = retrieval_ranks(similarity, caption_image, chunk_size=7, device="cpu", backend=backend)
    i2t, t2i = reference_ranks(similarity, caption_image)

    np.testing.assert_array_equal(ranks.i2t, i2t)
    np.testing.assert_array_equal(ranks.t2i, t2i)
    assert ranks.i2t.min() >= 1
    assert (ranks.i2t > 1).any(), "the seeded problem should not be trivially solved"


@pytest.mark.parametrize("per_image", [4, 5, 6])
def test_fixed_captions_per_image_match_reference(per_image):
    similarity, caption_image = random_problem(per_image, [per_image] * 40)
    metrics = retrieval_metrics(similarity, caption_image, device="cpu")
    i2t, t2i = reference_ranks(similarity, caption_image)
    expected = metrics_from_ranks(i2t, t2i)
    assert metrics == expected
    assert metrics["i2t_r10"] >= metrics["i2t_r5"] >= metrics["i2t_r1"]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("chunk_size", [1, 3, 16, 59, 60, 1000])
def test_chunked_equals_full_matrix(chunk_size, backend):
    similarity, caption_image = random_problem(7, [4, 6] * 30)
    full = retrieval_ranks(similarity, caption_image, chunk_size=60, device="cpu", backend="numpy")
    chunked = retrieval_ranks(
        similarity, caption_image, chunk_size=chunk_size, device="cpu", backend=backend
    )
    for field in ("i2t", "t2i", "i2t_best_caption", "i2t_top1", "t2i_top1"):
        np.testing.assert_array_equal(getattr(chunked, field), getattr(full, field), err_msg=field)


def test_tensor_and_ndarray_inputs_agree():
    similarity, caption_image = random_problem(3, [5] * 20)
    from_numpy = retrieval_metrics(similarity, caption_image, device="cpu")
    from_tensor = retrieval_metrics(torch.from_numpy(similarity), caption_image, device="cpu")
    from_double = retrieval_metrics(
        torch.from_numpy(similarity).double(), torch.tensor(caption_image), device="cpu"
    )
    assert from_numpy == from_tensor == from_double


def test_hand_made_embeddings_known_answers():
    # Three images on the axes; captions 0-3 belong to image 0, 4-9 to image 1 and 10
    # to image 2. Caption 4 points at image 0, caption 10 sits between images 1 and 2.
    images = torch.eye(3)
    captions = torch.tensor(
        [
            [1.0, 0.0, 0.0],
            [0.9, 0.1, 0.0],
            [0.8, 0.2, 0.0],
            [0.7, 0.3, 0.0],
            [1.0, 0.0, 0.0],  # image 1's caption, closest to image 0
            [0.0, 1.0, 0.0],
            [0.0, 0.9, 0.1],
            [0.0, 0.8, 0.2],
            [0.0, 0.7, 0.3],
            [0.0, 0.6, 0.4],
            [0.0, 0.6, 0.5],  # image 2's caption, closer to image 1
        ]
    )
    caption_image = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2]
    ranks = retrieval_ranks(images @ captions.T, caption_image, chunk_size=2, device="cpu")

    # Every image's best positive scores highest in its row. Image 0 ties caption 0
    # (positive) with caption 4 (negative) at 1.0, and ties count in its favour.
    np.testing.assert_array_equal(ranks.i2t, [1, 1, 1])
    # Caption 4 scores 1.0 on image 0 above 0.0 on its image 1, so it ranks 2nd (image 2
    # ties image 1 at 0.0 and does not count). Caption 10 scores 0.6 on image 1 above
    # 0.5 on its image 2, so it ranks 2nd too.
    np.testing.assert_array_equal(ranks.t2i, [1, 1, 1, 1, 2, 1, 1, 1, 1, 1, 2])
    assert ranks.i2t_best_caption.tolist() == [0, 5, 10]
    assert ranks.t2i_top1[4] == 0
    assert ranks.t2i_top1[10] == 1

    metrics = metrics_from_ranks(ranks.i2t, ranks.t2i, ks=(1,))
    assert metrics["i2t_r1"] == 100.0
    assert metrics["t2i_r1"] == pytest.approx(100.0 * 9 / 11)
    assert metrics["rsum"] == pytest.approx(100.0 + 100.0 * 9 / 11)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_ties_count_in_query_favour(backend):
    # Every score equal: each query ranks its positive first.
    similarity = np.zeros((4, 8), dtype=np.float32)
    caption_image = np.repeat(np.arange(4), 2)
    ranks = retrieval_ranks(similarity, caption_image, device="cpu", backend=backend)
    assert ranks.i2t.tolist() == [1, 1, 1, 1]
    assert ranks.t2i.tolist() == [1] * 8


def test_metrics_skip_top1():
    similarity, caption_image = random_problem(5, [5] * 10)
    ranks = retrieval_ranks(similarity, caption_image, device="cpu", with_top1=False)
    assert ranks.i2t_top1 is None
    assert ranks.t2i_top1 is None
    full = retrieval_ranks(similarity, caption_image, device="cpu")
    np.testing.assert_array_equal(ranks.i2t, full.i2t)
    np.testing.assert_array_equal(ranks.t2i, full.t2i)


def test_image_rank_is_best_caption_rank():
    # Image 0 has captions 0 and 3: caption 3 ranks 2nd and caption 0 ranks 5th.
    similarity = np.array([[0.1, 0.9, 0.5, 0.6, 0.2], [0.0] * 5], dtype=np.float32)
    ranks = retrieval_ranks(similarity, [0, 1, 1, 0, 1], device="cpu")
    assert ranks.i2t[0] == 2
    assert ranks.i2t_best_caption[0] == 3


def test_metric_keys_and_rank_statistics():
    i2t = np.array([1, 2, 3, 20])
    t2i = np.array([1, 1, 6, 11, 50])
    metrics = metrics_from_ranks(i2t, t2i)
    assert list(metrics) == [
        "i2t_r1",
        "i2t_r5",
        "i2t_r10",
        "t2i_r1",
        "t2i_r5",
        "t2i_r10",
        "rsum",
        "i2t_medr",
        "i2t_meanr",
        "t2i_medr",
        "t2i_meanr",
    ]
    assert metrics["i2t_r5"] == 75.0
    assert metrics["t2i_r10"] == 60.0
    assert metrics["i2t_medr"] == 2.0  # median 2.5 rounded down
    assert metrics["t2i_medr"] == 6.0
    assert metrics["i2t_meanr"] == 6.5
    assert metrics["rsum"] == pytest.approx(25 + 75 + 75 + 40 + 40 + 60)


def test_recall_curve_matches_recall_at():
    ranks = np.array([1, 3, 3, 7, 150])
    curve = recall_curve(ranks, max_k=10)
    assert curve.shape == (10,)
    assert curve[0] == 20.0
    assert curve[2] == 60.0
    assert curve[6] == 80.0
    assert curve[9] == 80.0


def test_caption_map_errors_name_the_problem():
    similarity = np.zeros((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="no caption.*first indices: \\[2\\]"):
        retrieval_ranks(similarity, [0, 0, 1, 1], device="cpu")
    with pytest.raises(ValueError, match="outside 0..2"):
        retrieval_ranks(similarity, [0, 1, 2, 3], device="cpu")
    with pytest.raises(ValueError, match="3 entries but similarity has 4"):
        retrieval_ranks(similarity, [0, 1, 2], device="cpu")
    with pytest.raises(ValueError, match="chunk_size must be at least 1"):
        retrieval_ranks(similarity, [0, 1, 2, 2], chunk_size=0, device="cpu")
    with pytest.raises(ValueError, match="2-D"):
        retrieval_ranks(np.zeros(4), [0, 1, 2, 2], device="cpu")


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_non_finite_scores_rejected(backend):
    similarity = np.zeros((3, 3), dtype=np.float32)
    similarity[2, 1] = np.nan
    with pytest.raises(ValueError, match="score of nan in image rows 2..2"):
        retrieval_ranks(similarity, [0, 1, 2], chunk_size=1, device="cpu", backend=backend)
    similarity[2, 1] = np.inf
    with pytest.raises(ValueError, match="score of inf in image rows 2..2"):
        retrieval_ranks(similarity, [0, 1, 2], chunk_size=1, device="cpu", backend=backend)
    similarity[2, 1] = -np.inf  # a negative that ranks last
    ranks = retrieval_ranks(similarity, [0, 1, 2], device="cpu", backend=backend)
    assert ranks.t2i.tolist() == [1, 1, 1]
    similarity[1, 1] = -np.inf
    with pytest.raises(ValueError, match="positive score of caption 1 is -inf"):
        retrieval_ranks(similarity, [0, 1, 2], device="cpu", backend=backend)


def test_unknown_backend_rejected():
    with pytest.raises(ValueError, match="unknown backend 'jax'.*'numpy', 'torch'"):
        retrieval_ranks(np.zeros((1, 1)), [0], backend="jax")
