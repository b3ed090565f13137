"""`dvc repro` of dvc.yaml in a temporary git repository, on ten sample images."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dsran.extract.store import FeatureStore

REPOSITORY = Path(__file__).resolve().parents[2]
SAMPLE = REPOSITORY / "data" / "coco-mini"

TINY_PARAMS = {
    "extract": {
        "images": "images",
        "out": "pipeline/feats.zarr",
        "captions": [
            "annotations/captions_train2017.json",
            "annotations/captions_val2017.json",
        ],
        "random_weights_if_missing": True,
        "region_min_size": 128,
        "region_max_size": 213,
        "region_proposals": 6,
        "min_boxes": 4,
        "max_boxes": 4,
        "chunk_images": 4,
        "batch_size": 4,
        "num_workers": 0,
    },
    "train": {
        "feats": "pipeline/feats.zarr",
        "preset": "sample",
        "out": "pipeline/run",
        "overrides": [
            "data.val_split=null",
            "data.batch_size=10",
            "data.num_workers=0",
            "model.embed_size=64",
            "optim.epochs=1",
        ],
    },
    "eval": {
        "split": "test",
        "store_split": "val",
        "model": "pipeline/run",
        "out": "pipeline/eval",
    },
}


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a command in the temporary repository with dsran and dvc on PATH."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        # An empty torch cache: the pipeline must fall back to random weights.
        "TORCH_HOME": str(cwd / ".torch-home"),
    }
    process = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, (
        f"{' '.join(args)} exited with {process.returncode}:\n"
        f"{process.stdout[-3000:]}\n{process.stderr[-3000:]}"
    )
    return process


def dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], cwd)


@pytest.fixture
def pipeline_repo(tmp_path) -> Path:
    """A git + DVC repository with the project's dvc.yaml, tiny params and 10 images."""
    repo = tmp_path / "repo"
    for split, count in (("train2017", 6), ("val2017", 4)):
        (repo / "images" / split).mkdir(parents=True)
        for source in sorted((SAMPLE / "images" / split).glob("*.jpg"))[:count]:
            shutil.copyfile(source, repo / "images" / split / source.name)
    shutil.copytree(SAMPLE / "annotations", repo / "annotations")
    shutil.copyfile(REPOSITORY / "dvc.yaml", repo / "dvc.yaml")
    (repo / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    run(["git", "init", "-q"], repo)
    dvc("init", "-q", cwd=repo)
    shutil.copyfile(REPOSITORY / ".dvc" / "config", repo / ".dvc" / "config")
    return repo


def test_repro_writes_metrics_then_reruns_train_only(pipeline_repo):
    repo = pipeline_repo
    first = dvc("repro", cwd=repo)
    assert "Running stage 'extract'" in first.stdout
    assert "Running stage 'eval'" in first.stdout

    metrics = json.loads((repo / "pipeline" / "eval" / "metrics.json").read_text())
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"):
        assert 0.0 <= metrics[key] <= (600.0 if key == "rsum" else 100.0), key
    shown = json.loads(dvc("metrics", "show", "--json", cwd=repo).stdout)
    assert "pipeline/eval/metrics.json" in json.dumps(shown)
    report = (repo / "pipeline" / "eval" / "results.md").read_text()
    assert "random" in report
    store = FeatureStore.open(repo / "pipeline" / "feats.zarr", require_complete=True)
    assert store.random_weights
    store_created = store.attrs["provenance"]["created_utc"]

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["overrides"] = [
        item.replace("optim.epochs=1", "optim.epochs=2") for item in params["train"]["overrides"]
    ]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = dvc("status", cwd=repo).stdout
    assert "train" in status
    assert "extract:" not in status

    second = dvc("repro", cwd=repo)
    assert "Stage 'extract' didn't change, skipping" in second.stdout
    assert "Running stage 'train'" in second.stdout
    assert "Running stage 'eval'" in second.stdout
    reopened = FeatureStore.open(repo / "pipeline" / "feats.zarr")
    assert reopened.attrs["provenance"]["created_utc"] == store_created


def test_repro_resumes_interrupted_extraction(pipeline_repo):
    """A store left by an interrupted run persists through `dvc repro`, which finishes it."""
    repo = pipeline_repo
    run([sys.executable, "-m", "dsran", "--params", "params.yaml", "extract", "--limit", "4"], repo)
    partial = FeatureStore.open(repo / "pipeline" / "feats.zarr")
    assert len(partial) == 4
    created = partial.attrs["provenance"]["created_utc"]
    first_rows = partial.read_chunk(0)["grid/features"]

    dvc("repro", "extract", cwd=repo)
    store = FeatureStore.open(repo / "pipeline" / "feats.zarr", require_complete=True)
    assert len(store) == 10
    assert store.attrs["provenance"]["created_utc"] == created
    assert (store.read_chunk(0)["grid/features"] == first_rows).all()


def test_params_yaml_is_the_sample_preset():
    root = yaml.safe_load((REPOSITORY / "params.yaml").read_text())
    preset = yaml.safe_load((REPOSITORY / "pipelines" / "presets" / "sample.yaml").read_text())
    assert root == preset


@pytest.mark.parametrize("name", ["sample", "coco", "flickr30k"])
def test_presets_use_known_options(name):
    """Every key of a pipeline preset is an option of its dsran command."""
    from dsran.pipelines.cli import cli

    preset = yaml.safe_load((REPOSITORY / "pipelines" / "presets" / f"{name}.yaml").read_text())
    assert set(preset) == {"extract", "train", "eval"}
    for command_name, section in preset.items():
        options = {param.name for param in cli.commands[command_name].params}
        unknown = set(section) - options
        assert not unknown, f"{name}.yaml [{command_name}] has unknown keys {unknown}"
