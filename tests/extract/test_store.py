"""FeatureStore round trip and the errors that opening a bad store raises."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from dsran.extract.store import FeatureStore, StoreError

SETTINGS = {"grid": {"network": "resnet152", "random_weights": True}, "regions": None}
PATHS = ["a.jpg", "a.png", "b/c.jpg"]


def make_store(path, paths=PATHS, chunk_images=2):
    return FeatureStore.create(path, paths, SETTINGS, chunk_images=chunk_images)


def chunk_data(store, chunk, seed):
    """Random whole-chunk data for every array of the store, every row done."""
    rows = store.chunk_rows(chunk)
    count = rows.stop - rows.start
    generator = np.random.default_rng(seed)
    data = {}
    for spec in store.array_specs():
        data[spec.name] = generator.random((count, *spec.row_shape)).astype(spec.dtype)
    data["images/done"] = np.ones(count, dtype=bool)
    data["images/failed"] = np.zeros(count, dtype=bool)
    return data


def test_round_trip(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    written = {chunk: chunk_data(store, chunk, seed=chunk) for chunk in range(store.num_chunks)}
    for chunk, data in written.items():
        store.write_chunk(chunk, data)
    store.write_captions(["one", "two", "three"], [0, 0, 2])
    store.write_splits({"train": [0, 1], "test": [2]})
    store.record_failures([{"path": "a.png", "reason": "bad"}])

    reopened = FeatureStore.open(tmp_path / "s.zarr", require_complete=True)
    assert list(reopened.image_paths()) == PATHS
    assert reopened.num_chunks == 2
    for chunk, data in written.items():
        read = reopened.read_chunk(chunk)
        for name, values in data.items():
            assert np.array_equal(read[name], values), name
    text, image = reopened.captions()
    assert list(text) == ["one", "two", "three"]
    assert list(image) == [0, 0, 2]
    assert list(reopened.split("test")) == [2]
    assert reopened.failures == [{"path": "a.png", "reason": "bad"}]
    assert reopened.random_weights
    assert "WARNING: features come from randomly initialised CNN weights" in reopened.summary()
    assert "grid weights: random weights" in reopened.summary()


def test_append_images_keeps_rows(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    data = chunk_data(store, 0, seed=1)
    store.write_chunk(0, data)
    store.append_images(["d.jpg", "e.jpg"])
    reopened = FeatureStore.open(tmp_path / "s.zarr")
    assert len(reopened) == 5
    assert list(reopened.done()) == [True, True, False, False, False]
    assert np.array_equal(reopened.read_chunk(0)["grid/features"], data["grid/features"])


def test_interrupted_append_arrays_grown(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    data = chunk_data(store, 0, seed=1)
    store.write_chunk(0, data)
    # A crash after the per-image arrays grew but before images/path did.
    for spec in store.array_specs():
        store.array(spec.name).resize((5, *spec.row_shape))
    with pytest.raises(StoreError, match="images/width has shape"):
        FeatureStore.open(tmp_path / "s.zarr")
    repaired = FeatureStore.open(tmp_path / "s.zarr", mode="r+")
    assert len(repaired) == 3
    assert repaired.array("grid/features").shape[0] == 3
    assert np.array_equal(repaired.read_chunk(0)["grid/features"], data["grid/features"])
    repaired.append_images(["d.jpg"])
    assert list(FeatureStore.open(tmp_path / "s.zarr").image_paths()) == [*PATHS, "d.jpg"]


def test_interrupted_append_paths_unwritten(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    # A crash after images/path grew but before the new paths were written.
    for spec in store.array_specs():
        store.array(spec.name).resize((5, *spec.row_shape))
    store.group["images/path"].resize((5,))
    repaired = FeatureStore.open(tmp_path / "s.zarr", mode="r+")
    assert list(repaired.image_paths()) == PATHS
    assert repaired.array("images/done").shape == (3,)


def test_wrong_schema_version(tmp_path):
    make_store(tmp_path / "s.zarr")
    zarr.open_group(str(tmp_path / "s.zarr"), mode="r+").attrs["schema_version"] = 99
    with pytest.raises(StoreError, match="schema version 99, but this dsran .* reads version 1"):
        FeatureStore.open(tmp_path / "s.zarr")


def test_inconsistent_shapes(tmp_path):
    make_store(tmp_path / "s.zarr")
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    group["grid/features"].resize((2, 49, 2048))
    with pytest.raises(
        StoreError, match=r"grid/features has shape \(2, 49, 2048\), expected \(3, 49, 2048\)"
    ):
        FeatureStore.open(tmp_path / "s.zarr")


def test_caption_rows_out_of_range(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match=r"captions/image has image rows outside 0..2"):
        store.write_captions(["x"], [3])


def test_unfinished_store(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    store.write_chunk(0, chunk_data(store, 0, seed=0))
    FeatureStore.open(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match=r"unfinished: 1 of 3 images .* \(first: b/c.jpg\)"):
        FeatureStore.open(tmp_path / "s.zarr", require_complete=True)


def test_settings_mismatch(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    other = {"grid": {"network": "resnet152", "random_weights": False}, "regions": None}
    with pytest.raises(StoreError, match=r"grid.random_weights \(True in the store, False now\)"):
        store.check_settings(other)
    store.check_settings(SETTINGS)


def test_settings_mismatch_feature_kinds(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    no_grid = {"grid": None, "regions": None}
    with pytest.raises(
        StoreError, match="has grid features, but this run skips them. Run with --grid"
    ):
        store.check_settings(no_grid)
    with_regions = {**SETTINGS, "regions": {"max_boxes": 10}}
    with pytest.raises(
        StoreError,
        match="has no region features, but this run asks for them. Run with --no-regions",
    ):
        store.check_settings(with_regions)


def test_duplicate_paths(tmp_path):
    with pytest.raises(StoreError, match="'a.jpg' appears twice"):
        make_store(tmp_path / "s.zarr", paths=["a.jpg", "b.jpg", "a.jpg"])
    store = make_store(tmp_path / "t.zarr")
    with pytest.raises(StoreError, match="'b/c.jpg' appears twice"):
        store.append_images(["b/c.jpg"])


def test_missing_and_existing_paths(tmp_path):
    with pytest.raises(StoreError, match="feature store not found"):
        FeatureStore.open(tmp_path / "absent.zarr")
    make_store(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="already exists"):
        make_store(tmp_path / "s.zarr")


def test_write_chunk_checks_arrays(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    data = chunk_data(store, 1, seed=0)
    with pytest.raises(
        StoreError, match=r"write_chunk\(0\): images/width has shape \(1,\), expected \(2,\)"
    ):
        store.write_chunk(0, data)
    del data["grid/features"]
    with pytest.raises(StoreError, match=r"missing arrays \['grid/features'\]"):
        store.write_chunk(1, data)
