"""`dsran extract` with region features, `dsran import` and `dsran show`, end to end.

Region runs use a small detector configuration (shorter side 128, 10 proposals, K = 6)
so that the 6 images of these tests take seconds; the published settings only change
sizes and counts.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from dsran.extract.store import FeatureStore
from dsran.pipelines.cli import cli
from PIL import Image

from tests.extract.conftest import (
    SAMPLE_IMAGES,
    assert_same_store,
    extract_args,
    run_dsran,
)
from tests.extract.test_importers import _regions, write_milvlg_npz
from tests.extract.test_runner import kill_after_done_rows

K = 6
REGION_ARGS = (
    "--regions",
    "--region-min-size",
    "128",
    "--region-max-size",
    "213",
    "--region-proposals",
    "10",
    "--min-boxes",
    str(K),
    "--max-boxes",
    str(K),
)


@pytest.fixture(scope="module")
def region_images(tmp_path_factory):
    """Five sample images and one corrupt file."""
    root = tmp_path_factory.mktemp("region_images") / "images"
    root.mkdir(parents=True)
    for source in sorted((SAMPLE_IMAGES / "val2017").glob("*.jpg"))[:5]:
        shutil.copyfile(source, root / source.name)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return root


def region_args(images, out, *extra):
    return extract_args(images, out, *REGION_ARGS, *extra)


@pytest.fixture(scope="module")
def region_store(region_images, tmp_path_factory):
    """An uninterrupted grid + regions extraction of `region_images`."""
    out = tmp_path_factory.mktemp("region_reference") / "feats.zarr"
    process = run_dsran(*region_args(region_images, out, "--num-workers", "1"))
    return out, process


def test_extract_writes_grid_and_regions(region_store):
    out, process = region_store
    assert f"regions/features: (6, {K}, 2048) float16" in process.stdout
    assert "grid/features: (6, 49, 2048) float16" in process.stdout
    store = FeatureStore.open(out, require_complete=True)
    paths = list(store.image_paths())
    broken = paths.index("broken.jpg")

    settings = store.settings["regions"]
    assert settings["random_weights"] is True
    assert settings["max_boxes"] == K
    assert settings["rpn_post_nms_topk"] == 10
    assert settings["precision"] == store.settings["grid"]["precision"]
    assert store.settings["grid"]["random_weights"] is True

    counts = store.array("regions/count")[:]
    assert counts[broken] == 0
    assert all(counts[row] == K for row in range(len(paths)) if row != broken)
    assert (store.array("regions/object_ids")[broken] == -1).all()
    assert store.failed()[broken]
    assert store.failures[0]["path"] == "broken.jpg"

    for row, path in enumerate(paths):
        if row == broken:
            continue
        with Image.open(SAMPLE_IMAGES / "val2017" / path) as image:
            width, height = image.size
        boxes = store.array("regions/boxes")[row]
        assert (boxes[:, 2] <= width).all(), path
        assert (boxes[:, 3] <= height).all(), path
        assert np.isfinite(store.array("regions/features")[row]).all(), path


def test_resume_after_sigkill_with_regions(region_store, region_images, tmp_path):
    reference, _ = region_store
    out = tmp_path / "feats.zarr"
    args = region_args(region_images, out, "--num-workers", "1")
    done_at_kill = kill_after_done_rows(args, out, minimum=1)
    partial = FeatureStore.open(out)
    assert not (partial.done() | partial.failed()).all(), "the run finished before the kill"

    resumed = run_dsran(*args)
    remaining = int(re.search(r"(\d+) of 6 images to extract", resumed.stderr)[1])
    assert remaining <= 6 - done_at_kill
    assert_same_store(out, reference)


def test_dask_with_regions_matches_single_process(region_store, region_images, tmp_path):
    reference, _ = region_store
    out = tmp_path / "feats.zarr"
    run_dsran(*region_args(region_images, out, "--workers", "2"))
    assert_same_store(out, reference)


def test_regions_only_store(region_images, tmp_path):
    out = tmp_path / "feats.zarr"
    args = region_args(region_images, out, "--no-grid", "--class-probs", "--limit", "2")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(out, require_complete=True)
    assert store.settings["grid"] is None
    assert store.array("regions/class_probs").shape == (2, K, 1601)


def test_regions_need_weights_or_random(region_images, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    args = [
        arg for arg in region_args(region_images, tmp_path / "f.zarr") if arg != "--random-weights"
    ]
    result = CliRunner().invoke(cli, [*args, "--no-grid"])
    assert result.exit_code == 1
    assert "no region detector weights given or found in" in result.output
    assert "Pass --region-weights PATH" in result.output
    assert not (tmp_path / "f.zarr").exists()


def test_random_weights_if_missing(region_images, tmp_path):
    """With no weights in the caches, the fallback extracts with random weights and logs a warning."""
    out = tmp_path / "f.zarr"
    args = [
        arg for arg in region_args(region_images, out, "--limit", "2") if arg != "--random-weights"
    ]
    process = run_dsran(
        *args, "--random-weights-if-missing", env={"TORCH_HOME": str(tmp_path / "torch-home")}
    )
    assert "no ResNet152 weights found" in process.stderr
    assert "no region detector weights given or found in" in process.stderr
    store = FeatureStore.open(out, require_complete=True)
    assert store.settings["grid"]["random_weights"] is True
    assert store.settings["regions"]["random_weights"] is True
    assert store.random_weights


def test_show_draws_boxes(region_store, region_images, tmp_path):
    out, _ = region_store
    store = FeatureStore.open(out)
    path = str(store.image_paths()[0])
    picture = tmp_path / "boxes.png"
    result = CliRunner().invoke(
        cli, ["show", str(out), path, "--images", str(region_images), "--out", str(picture)]
    )
    assert result.exit_code == 0, result.output
    assert "detector with random weights" in result.output
    with Image.open(picture) as drawn, Image.open(region_images / path) as original:
        assert drawn.size == original.size
        changed = np.abs(
            np.asarray(drawn.convert("RGB"), dtype=np.int16)
            - np.asarray(original.convert("RGB"), dtype=np.int16)
        )
    assert (changed.max(axis=2) > 60).mean() > 0.005


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("absent", "image 'absent' not found in"),
        ("broken", "has no features in"),
    ],
)
def test_show_rejects_bad_image(region_store, region_images, tmp_path, image, message):
    out, _ = region_store
    result = CliRunner().invoke(
        cli,
        ["show", str(out), image, "--images", str(region_images), "--out", str(tmp_path / "x.png")],
    )
    assert result.exit_code == 1
    assert message in result.output


def test_import_npz_then_show(region_images, tmp_path):
    dumps = tmp_path / "npz"
    dumps.mkdir()
    names = sorted(path.stem for path in region_images.glob("*.jpg") if path.stem != "broken")
    for seed, name in enumerate(names[:3]):
        with Image.open(region_images / f"{name}.jpg") as image:
            width, height = image.size
        write_milvlg_npz(dumps / f"{name}.npz", name, _regions(seed, 4), width, height)
    out = tmp_path / "imported.zarr"
    result = CliRunner().invoke(
        cli,
        [
            "import",
            "--format",
            "milvlg-npz",
            "--features",
            str(dumps),
            "--images",
            str(region_images),
            "--out",
            str(out),
            "--max-boxes",
            "10",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "imported regions of 3 images (0 already done, 3 without a record" in result.output
    store = FeatureStore.open(out, require_complete=True)
    assert store.settings["regions"]["source_format"] == "milvlg-npz"
    assert store.array("regions/count")[:].tolist().count(4) == 3

    picture = tmp_path / "imported.png"
    show_result = CliRunner().invoke(
        cli, ["show", str(out), names[0], "--images", str(region_images), "--out", str(picture)]
    )
    assert show_result.exit_code == 0, show_result.output
    assert picture.is_file()


def test_import_rejects_folder_for_tsv(region_images, tmp_path):
    result = CliRunner().invoke(
        cli,
        [
            "import",
            "--format",
            "bottom-up-tsv",
            "--features",
            str(tmp_path),
            "--images",
            str(region_images),
            "--out",
            str(tmp_path / "x.zarr"),
        ],
    )
    assert result.exit_code == 1
    assert "--format bottom-up-tsv reads TSV files, not folders" in result.output
