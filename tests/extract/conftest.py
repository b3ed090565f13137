"""Shared fixtures of the extraction tests: a small image folder and a `dsran` runner."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

REPOSITORY = Path(__file__).resolve().parents[2]
SAMPLE = REPOSITORY / "data" / "coco-mini"
SAMPLE_IMAGES = SAMPLE / "images"
CAPTION_FILES = [
    SAMPLE / "annotations" / "captions_train2017.json",
    SAMPLE / "annotations" / "captions_val2017.json",
]
DSRAN = [sys.executable, "-m", "dsran"]


def run_dsran(*args: str, env: dict[str, str] | None = None, check: bool = True):
    """Run `python -m dsran ARGS` as a subprocess and return the completed process."""
    full_env = {**os.environ, **(env or {})}
    process = subprocess.run(
        [*DSRAN, *args], capture_output=True, text=True, env=full_env, timeout=600
    )
    if check and process.returncode != 0:
        raise AssertionError(
            f"dsran {' '.join(args)} exited with {process.returncode}:\n{process.stderr[-3000:]}"
        )
    return process


@pytest.fixture(scope="session")
def mini_images(tmp_path_factory) -> Path:
    """A folder of 10 sample images, 5 from train2017 and 5 from val2017."""
    root = tmp_path_factory.mktemp("mini") / "images"
    for split in ("train2017", "val2017"):
        (root / split).mkdir(parents=True)
        for source in sorted((SAMPLE_IMAGES / split).glob("*.jpg"))[:5]:
            shutil.copyfile(source, root / split / source.name)
    return root


def extract_args(images: Path, out: Path, *extra: str) -> list[str]:
    """The `dsran extract` arguments every store comparison uses: small chunks and batches.

    Region features are off because the published detector settings take seconds per
    image on a CPU; the region tests pass --regions with a small detector configuration.
    """
    args = ["extract", "--images", str(images), "--out", str(out), "--random-weights"]
    args.append("--no-regions")
    for caption_file in CAPTION_FILES:
        args += ["--captions", str(caption_file)]
    return [*args, "--chunk-images", "2", "--batch-size", "2", *extra]


@pytest.fixture(scope="session")
def reference_store(mini_images, tmp_path_factory):
    """An uninterrupted single-process extraction of `mini_images`, and its CLI output."""
    out = tmp_path_factory.mktemp("reference") / "feats.zarr"
    process = run_dsran(*extract_args(mini_images, out, "--num-workers", "1"))
    return out, process


def store_contents(path: Path) -> dict[str, object]:
    """Every array and the reproducible attributes of a store, for equality checks."""
    group = zarr.open_group(str(path), mode="r")
    contents: dict[str, object] = {}
    for name in ("images", "grid", "regions", "captions", "splits"):
        if name in group:
            for array_name, array in group[name].arrays():
                contents[f"{name}/{array_name}"] = np.asarray(array[:])
    attrs = group.attrs.asdict()
    contents["settings"] = attrs["settings"]
    contents["failures"] = attrs["failures"]
    contents["chunk_images"] = attrs["chunk_images"]
    return contents


def assert_same_store(actual: Path, expected: Path) -> None:
    """Assert that two stores hold equal arrays (bit for bit) and equal attributes."""
    got, want = store_contents(actual), store_contents(expected)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        if isinstance(value, np.ndarray):
            assert got[key].dtype == value.dtype, key
            assert np.array_equal(got[key], value), f"{key} differs"
        else:
            assert got[key] == value, key
