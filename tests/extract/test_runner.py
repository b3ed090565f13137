"""`dsran extract` end to end: CLI, resume after SIGKILL, dask, failures, settings."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from dsran.extract.base import ExtractorOptions
from dsran.extract.runner import ExtractConfig, extract_chunks_task, run_extraction
from dsran.extract.store import FeatureStore, StoreError
from dsran.pipelines.cli import cli

from tests.extract.conftest import (
    CAPTION_FILES,
    DSRAN,
    SAMPLE_IMAGES,
    assert_same_store,
    extract_args,
    run_dsran,
)
from tests.extract.test_images import make_bad_files, make_good_files


def sample_captions(file_names):
    """Captions of the sample images named `file_names`, from the COCO files."""
    texts = {}
    for caption_file in CAPTION_FILES:
        content = json.loads(caption_file.read_text())
        ids = {image["id"]: image["file_name"] for image in content["images"]}
        for annotation in content["annotations"]:
            name = ids[annotation["image_id"]]
            if name in file_names:
                texts.setdefault(name, []).append(annotation["caption"].strip())
    return texts


def test_cli_extracts_sample(reference_store, mini_images):
    out, process = reference_store
    assert "images: 10 (10 done, 0 failed, 0 pending), chunks of 2" in process.stdout
    assert "grid/features: (10, 49, 2048) float16" in process.stdout
    assert "WARNING: features come from randomly initialised CNN weights" in process.stdout

    store = FeatureStore.open(out, require_complete=True)
    paths = list(store.image_paths())
    assert paths == sorted(
        p.relative_to(mini_images).as_posix() for p in mini_images.rglob("*.jpg")
    )
    assert store.settings["grid"]["random_weights"] is True
    assert store.settings["regions"] is None

    features = store.array("grid/features")[:]
    assert np.isfinite(features).all()
    assert (features != 0).any(axis=(1, 2)).all()
    assert not np.array_equal(features[0], features[1])

    from PIL import Image

    for row, path in enumerate(paths):
        with Image.open(mini_images / path) as image:
            assert store.array("images/width")[row] == image.width
            assert store.array("images/height")[row] == image.height

    expected = sample_captions({Path(path).name for path in paths})
    text, image = store.captions()
    for row, path in enumerate(paths):
        assert list(text[image == row]) == expected[Path(path).name], path
    # Splits keep the order of the caption files, not the store order.
    assert sorted(paths[row] for row in store.split("train")) == paths[:5]
    assert sorted(paths[row] for row in store.split("val")) == paths[5:]

    info = run_dsran("info", str(out))
    assert info.stdout.strip() == FeatureStore.open(out).summary()


def wait_for_done_rows(out: Path, process: subprocess.Popen, minimum: int) -> int:
    """Poll the store that `process` writes until `minimum` rows are done; return the count."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"extraction exited with {process.returncode} before the kill")
        try:
            done = int(np.asarray(zarr.open_group(str(out), mode="r")["images/done"][:]).sum())
        except Exception:  # the store is being created or a chunk file is half written
            done = 0
        if done >= minimum:
            return done
        time.sleep(0.1)
    raise AssertionError("no chunk was written within 300 s")


def kill_after_done_rows(args: list[str], out: Path, minimum: int) -> int:
    """Start `dsran ARGS`, SIGKILL it once `minimum` rows of `out` are done; return the count."""
    process = subprocess.Popen(
        [*DSRAN, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        return wait_for_done_rows(out, process, minimum)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_resume_after_sigkill(reference_store, mini_images, tmp_path):
    reference, _ = reference_store
    out = tmp_path / "feats.zarr"
    args = extract_args(mini_images, out, "--num-workers", "1")
    done_at_kill = kill_after_done_rows(args, out, minimum=2)
    assert done_at_kill < 10, "the run finished before it could be killed"
    partial = FeatureStore.open(out)
    assert not (partial.done() | partial.failed()).all()

    resumed = run_dsran(*args)
    remaining = int(re.search(r"(\d+) of 10 images to extract", resumed.stderr)[1])
    assert remaining <= 10 - done_at_kill
    assert_same_store(out, reference)


def test_dask_local_cluster_matches_single_process(reference_store, mini_images, tmp_path):
    reference, _ = reference_store
    out = tmp_path / "feats.zarr"
    run_dsran(*extract_args(mini_images, out, "--workers", "2"))
    assert_same_store(out, reference)


def test_bad_images_recorded_and_run_goes_on(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    reasons = make_bad_files(images)
    # The decoding of every mode is checked in test_images; here two good files suffice.
    modes = tmp_path / "modes"
    modes.mkdir()
    make_good_files(modes)
    shutil.copyfile(modes / "rotated.JPG", images / "rotated.JPG")
    shutil.copyfile(sorted((SAMPLE_IMAGES / "val2017").glob("*.jpg"))[0], images / "photo.jpg")
    config = ExtractConfig(
        images=images,
        out=tmp_path / "feats.zarr",
        options=ExtractorOptions(random_weights=True),
        batch_size=4,
        num_workers=2,
        chunk_images=4,
    )
    store = run_extraction(config)

    store = FeatureStore.open(tmp_path / "feats.zarr", require_complete=True)
    paths = list(store.image_paths())
    failed = {paths[row] for row in np.flatnonzero(store.failed())}
    assert failed == set(reasons)
    done = {paths[row] for row in np.flatnonzero(store.done())}
    assert done == {"rotated.JPG", "photo.jpg"}
    for item in store.failures:
        assert re.search(reasons[item["path"]], item["reason"], re.IGNORECASE), item
    features = store.array("grid/features")[:]
    failed_rows = store.failed()
    assert not features[failed_rows].any()
    assert (features[~failed_rows] != 0).any(axis=(1, 2)).all()
    rotated = paths.index("rotated.JPG")
    assert (store.array("images/width")[rotated], store.array("images/height")[rotated]) == (20, 30)

    # A crash between writing a chunk and recording its failures loses the reasons;
    # the next run decodes the failed images again to restore them.
    recorded = store.failures
    FeatureStore.open(tmp_path / "feats.zarr", mode="r+").update_attrs(failures=[])
    run_extraction(config)
    assert FeatureStore.open(tmp_path / "feats.zarr").failures == recorded


def test_failed_image_retried_after_fix(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    photos = sorted((SAMPLE_IMAGES / "val2017").glob("*.jpg"))[:2]
    shutil.copyfile(photos[0], images / "a.jpg")
    (images / "b.jpg").write_bytes(b"")
    config = ExtractConfig(
        images=images,
        out=tmp_path / "feats.zarr",
        options=ExtractorOptions(random_weights=True),
        batch_size=2,
        num_workers=0,
        chunk_images=2,
    )
    run_extraction(config)
    store = FeatureStore.open(tmp_path / "feats.zarr")
    assert store.failed().tolist() == [False, True]
    assert [item["path"] for item in store.failures] == ["b.jpg"]
    first_row = store.array("grid/features")[0]

    shutil.copyfile(photos[1], images / "b.jpg")
    run_extraction(config)
    store = FeatureStore.open(tmp_path / "feats.zarr", require_complete=True)
    assert store.done().tolist() == [True, True]
    assert store.failed().tolist() == [False, False]
    assert store.failures == []
    assert np.array_equal(store.array("grid/features")[0], first_row)
    assert store.array("grid/features")[1].any()


def extract_args_with_captions(images: Path, out: Path, caption_file: Path) -> list[str]:
    """`extract_args` for the first 2 images with `caption_file` as the only captions."""
    sample_files = {"--captions", *(str(path) for path in CAPTION_FILES)}
    args = [arg for arg in extract_args(images, out, "--limit", "2") if arg not in sample_files]
    return ["--no-params", *args, "--captions", str(caption_file)]


def test_bad_caption_file_writes_no_store(tmp_path, mini_images):
    out = tmp_path / "feats.zarr"
    bad = tmp_path / "captions.json"
    bad.write_text("[1, 2, 3]")
    result = CliRunner().invoke(cli, extract_args_with_captions(mini_images, out, bad))
    assert result.exit_code == 1
    assert str(bad) in result.output
    assert not out.exists()


def test_captions_matching_no_image_rejected(tmp_path, mini_images):
    out = tmp_path / "feats.zarr"
    unrelated = tmp_path / "captions_train2017.json"
    unrelated.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "elsewhere.jpg"}],
                "annotations": [{"id": 1, "image_id": 1, "caption": "A dog."}],
            }
        )
    )
    result = CliRunner().invoke(cli, extract_args_with_captions(mini_images, out, unrelated))
    assert result.exit_code == 1
    assert "no caption of" in result.output
    assert "names one of the 2 images found" in result.output
    assert not out.exists()


def test_limit_then_append(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    sources = sorted((SAMPLE_IMAGES / "train2017").glob("*.jpg"))[:3]
    for source in sources:
        shutil.copyfile(source, images / source.name)
    config = ExtractConfig(
        images=images,
        out=tmp_path / "feats.zarr",
        options=ExtractorOptions(random_weights=True),
        batch_size=2,
        num_workers=0,
        chunk_images=2,
        limit=2,
    )
    first = run_extraction(config)
    assert list(first.image_paths()) == [source.name for source in sources[:2]]
    features = first.array("grid/features")[:]

    config.limit = None
    store = run_extraction(config)
    assert list(store.image_paths()) == [source.name for source in sources]
    assert store.done().all()
    assert np.array_equal(store.array("grid/features")[:2], features)


def test_settings_mismatch_rejected(reference_store, mini_images, tmp_path):
    reference, _ = reference_store
    out = tmp_path / "feats.zarr"
    shutil.copytree(reference, out)
    precision = FeatureStore.open(out).settings["grid"]["precision"]
    other = "fp32" if precision != "fp32" else "bf16"
    args = extract_args(mini_images, out, "--precision", other, "--device", "cpu")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert f"grid.precision ({precision!r} in the store, {other!r} now)" in result.output
    assert "write to a new --out path" in result.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--workers", "2", "--scheduler", "tcp://127.0.0.1:1"],
            "--workers 2 and --scheduler tcp://127.0.0.1:1 exclude each other",
        ),
        (
            ["--regions", "--region-weights", "absent.pth"],
            "--random-weights and --region-weights absent.pth exclude each other",
        ),
        (["--regions", "--min-boxes", "20", "--max-boxes", "10"], "min_boxes=20, max_boxes=10"),
        (
            ["--regions", "--region-proposals", "50"],
            "rpn_post_nms_topk=50, max_boxes=100",
        ),
        (["--no-grid"], "--no-grid and --no-regions leave nothing to extract"),
        (["--grid-weights", "absent.pth"], "exclude each other"),
    ],
)
def test_cli_option_errors(mini_images, tmp_path, extra, message):
    out = tmp_path / "feats.zarr"
    result = CliRunner().invoke(cli, [*extract_args(mini_images, out), *extra])
    assert result.exit_code == 1
    assert message in result.output
    assert not out.exists()


def test_cli_empty_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "feats.zarr"
    result = CliRunner().invoke(cli, extract_args(empty, out))
    assert result.exit_code == 1
    assert f"no image files found under {empty}" in result.output
    assert not out.exists()


def test_task_rejects_other_worker_settings(reference_store, mini_images, tmp_path):
    reference, _ = reference_store
    out = tmp_path / "feats.zarr"
    shutil.copytree(reference, out)
    precision = FeatureStore.open(out).settings["grid"]["precision"]
    other = "fp32" if precision != "fp32" else "bf16"
    options = ExtractorOptions(device="cpu", precision=other, random_weights=True)
    with pytest.raises(StoreError, match=f"grid.precision \\({precision!r} in the store"):
        extract_chunks_task(str(out), str(mini_images), [0], ("grid",), options, 2, 0)
