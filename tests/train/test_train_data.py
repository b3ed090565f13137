"""The chunk-wise training loader: epoch plans, skipping, batches from a real store."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dsran.extract.store import FeatureStore, StoreError
from dsran.train.config import DataConfig
from dsran.train.data import (
    TrainingBatches,
    caption_samples,
    epoch_buffers,
    skip_samples,
    split_image_rows,
    usable_image_rows,
)
from synthetic_store import random_store

ARRAYS = ("grid/features", "regions/features", "regions/count")


def stream(buffers):
    return np.concatenate([buffer.samples for buffer in buffers])


def test_epoch_plan_visits_every_sample_once():
    image_rows = np.repeat(np.arange(100), 5)
    buffers = epoch_buffers(image_rows, chunk_images=16, buffer_chunks=2, seed=0, epoch=0)
    order = stream(buffers)
    assert sorted(order.tolist()) == list(range(500))
    for buffer in buffers:
        # A buffer's samples come from its own chunks only.
        assert set(np.unique(image_rows[buffer.samples] // 16)) == set(buffer.chunks.tolist())
        assert len(buffer.chunks) <= 2


def test_epoch_plan_depends_on_seed_and_epoch_only():
    image_rows = np.repeat(np.arange(64), 3)
    first = stream(epoch_buffers(image_rows, 8, 2, seed=3, epoch=1))
    again = stream(epoch_buffers(image_rows, 8, 2, seed=3, epoch=1))
    other_epoch = stream(epoch_buffers(image_rows, 8, 2, seed=3, epoch=2))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other_epoch)


def test_ranks_split_the_buffers():
    image_rows = np.repeat(np.arange(64), 2)
    all_buffers = epoch_buffers(image_rows, 8, 1, seed=0, epoch=0)
    ranks = [
        epoch_buffers(image_rows, 8, 1, seed=0, epoch=0, rank=r, world_size=3) for r in range(3)
    ]
    assert sum(len(b) for b in ranks) == len(all_buffers)
    assert sorted(np.concatenate([stream(b) for b in ranks]).tolist()) == list(range(128))


@pytest.mark.parametrize("skip", [0, 1, 9, 10, 11, 37, 127, 128])
def test_skip_samples_drops_the_stream_head(skip):
    image_rows = np.repeat(np.arange(64), 2)
    buffers = epoch_buffers(image_rows, 8, 1, seed=0, epoch=0)
    np.testing.assert_array_equal(
        stream(skip_samples(buffers, skip)) if skip < 128 else [], stream(buffers)[skip:]
    )


def _collect(batches):
    return [{name: tensor.clone() for name, tensor in batch.items()} for batch in batches]


def test_batches_hold_the_store_rows_of_their_captions(tmp_path, tokenizer):
    store = random_store(
        tmp_path / "feats.zarr", n_images=50, captions_per_image=3, max_boxes=20, chunk_images=8
    )
    rows = split_image_rows(store, ["train", "val"])
    samples = caption_samples(store, rows, tokenizer, max_length=16)
    config = DataConfig(batch_size=16, buffer_chunks=2, num_workers=0, max_length=16)
    batches = _collect(
        TrainingBatches(store.path, ARRAYS, samples, config, store.chunk_images, 0, 0, steps=9)
    )
    assert len(batches) == 9

    grid = store.array("grid/features")[:]
    regions = store.array("regions/features")[:]
    count = store.array("regions/count")[:]
    text, caption_image = store.captions()
    for batch in batches:
        image_rows = batch["image_rows"].numpy()
        assert batch["grid/features"].dtype == torch.float16
        np.testing.assert_array_equal(batch["grid/features"].numpy(), grid[image_rows])
        np.testing.assert_array_equal(batch["regions/features"].numpy(), regions[image_rows])
        np.testing.assert_array_equal(batch["regions/count"].numpy(), count[image_rows])
        assert batch["input_ids"].shape == batch["attention_mask"].shape
        assert batch["attention_mask"][:, -1].any(), "padding is trimmed to the longest caption"
        # Token ids decode back to a caption of the same image.
        for ids, mask, image in zip(
            batch["input_ids"], batch["attention_mask"], image_rows, strict=True
        ):
            decoded = tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            candidates = {
                str(t).lower() for t, i in zip(text, caption_image, strict=True) if i == image
            }
            assert decoded in candidates
    seen = np.concatenate([b["image_rows"].numpy() for b in batches])
    assert len(seen) == 9 * 16


def test_workers_and_resume_give_the_same_batches(tmp_path, tokenizer):
    store = random_store(
        tmp_path / "feats.zarr", n_images=48, captions_per_image=2, max_boxes=10, chunk_images=4
    )
    samples = caption_samples(
        store, split_image_rows(store, ["train", "val"]), tokenizer, max_length=12
    )

    def run(workers, start_step=0):
        config = DataConfig(batch_size=10, buffer_chunks=3, num_workers=workers, max_length=12)
        loader = TrainingBatches(
            store.path,
            ARRAYS,
            samples,
            config,
            store.chunk_images,
            5,
            2,
            steps=9,
            start_step=start_step,
        )
        return _collect(loader)

    serial, parallel, resumed = run(0), run(2), run(2, start_step=4)
    assert len(serial) == len(parallel) == 9
    assert len(resumed) == 5
    for expected, got in zip(serial, parallel, strict=True):
        for name in expected:
            torch.testing.assert_close(got[name], expected[name])
    for expected, got in zip(serial[4:], resumed, strict=True):
        torch.testing.assert_close(got["image_rows"], expected["image_rows"])
        torch.testing.assert_close(got["grid/features"], expected["grid/features"])


def test_pending_and_failed_images(tmp_path):
    store = random_store(tmp_path / "feats.zarr", n_images=20, max_boxes=5)
    rows = np.arange(20)
    writable = FeatureStore.open(store.path, mode="r+")
    done = writable.array("images/done")
    flags = done[:]
    flags[3] = False
    done[:] = flags
    with pytest.raises(StoreError, match="1 of the 20 training images have no features yet"):
        usable_image_rows(writable, rows, "training")
    failed = writable.array("images/failed")
    marks = failed[:]
    marks[3] = True
    failed[:] = marks
    np.testing.assert_array_equal(usable_image_rows(writable, rows, "training"), np.delete(rows, 3))
