"""The trainer, the run folder and `dsran train`: resume, smoke run, errors, load_run."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from dsran.pipelines.cli import cli
from dsran.train.config import resolve_config
from dsran.train.encode import encode_captions, encode_images
from dsran.train.run import load_run
from dsran.train.trainer import Trainer, lr_lambda
from safetensors.torch import load_file
from synthetic_store import MINILM, random_store

TINY = [
    f"model.text_model={MINILM}",
    "model.embed_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.buffer_chunks=1",
    "optim.epochs=2",
    "optim.lr=1e-4",
    "run.tensorboard=false",
    "run.log_every=1",
]


def read_log(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_schedule_warms_up_decays_and_steps_down():
    factor = lr_lambda([10, 10, 10, 10], warmup_fraction=0.1, lr_update=2, lr_decay=0.1)
    values = [factor(step) for step in range(40)]
    assert values[0] == pytest.approx(0.25)
    assert values[3] == pytest.approx(1.0)
    assert values[4] == pytest.approx(1.0)
    assert values[5] == pytest.approx(35 / 36)
    assert values[19] == pytest.approx(21 / 36)
    assert values[20] == pytest.approx(0.1 * 20 / 36)
    assert values[39] == pytest.approx(0.1 * 1 / 36)
    assert all(a >= b for a, b in zip(values[3:20], values[4:20], strict=False))


def test_schedule_with_less_than_one_warmup_step():
    factor = lr_lambda([6, 6], warmup_fraction=0.1, lr_update=10, lr_decay=0.1)
    values = [factor(step) for step in range(12)]
    assert values[0] == pytest.approx(1 / 1.2)
    assert max(values) == pytest.approx(1.0)


def test_resume_continues_with_identical_losses(tmp_path):
    store = random_store(tmp_path / "feats.zarr", n_images=24, max_boxes=12, chunk_images=4)
    config = resolve_config(None, TINY)

    # 1. The uninterrupted run: 2 epochs of 3 steps.
    Trainer(config, store.path, tmp_path / "full").fit()

    # 2. The same run stopped at step 4, inside epoch 2, then resumed.
    stopped = resolve_config(None, [*TINY, "run.stop_after_steps=4"])
    state = Trainer(stopped, store.path, tmp_path / "resumed").fit()
    assert (state.step, state.epoch, state.epoch_step) == (4, 1, 1)
    assert len(read_log(tmp_path / "resumed" / "train_log.csv")) == 4
    state = Trainer(config, store.path, tmp_path / "resumed", resume=True).fit()
    assert state.step == 6

    full = read_log(tmp_path / "full" / "train_log.csv")
    resumed = read_log(tmp_path / "resumed" / "train_log.csv")
    assert [row["step"] for row in resumed] == [str(step) for step in range(1, 7)]
    for expected, got in zip(full, resumed, strict=True):
        assert got["loss"] == expected["loss"], f"step {got['step']}"
        assert got["lr"] == expected["lr"]
    final_full = load_file(tmp_path / "full" / "checkpoints" / "last.safetensors")
    final_resumed = load_file(tmp_path / "resumed" / "checkpoints" / "last.safetensors")
    for name, tensor in final_full.items():
        torch.testing.assert_close(final_resumed[name], tensor, rtol=0, atol=0, msg=name)
    assert read_log(tmp_path / "full" / "val_metrics.csv") == read_log(
        tmp_path / "resumed" / "val_metrics.csv"
    )


def test_dsran_train_cpu_smoke_run(tmp_path):
    store = random_store(tmp_path / "feats.zarr", n_images=32, max_boxes=100)
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "dsran",
        "train",
        "--feats",
        str(store.path),
        "--preset",
        "sample",
        "--out",
        str(out),
        "--precision",
        "bf16",
        "--set",
        "model.embed_size=64",
        "--set",
        "data.batch_size=8",
        "--set",
        "optim.epochs=1",
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained" in result.stdout
    assert "randomly initialised CNN weights" in result.stderr

    for name in ("config.yaml", "metadata.json", "train_log.csv", "val_metrics.csv", "tensorboard"):
        assert (out / name).exists(), name
    for name in ("best.safetensors", "best.json", "last.safetensors", "last.json", "last-state.pt"):
        assert (out / "checkpoints" / name).exists(), name
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["random_cnn_weights"] is True
    assert any("randomly initialised CNN weights" in warning for warning in metadata["warnings"])
    assert metadata["feats"] == str(store.path.resolve())
    assert metadata["best_epoch"] == 1
    assert metadata["finished"] is True
    log = read_log(out / "train_log.csv")
    assert len(log) == 4  # 32 training captions in batches of 8
    assert all(float(row["samples_per_s"]) > 0 for row in log)

    run = load_run(out)
    assert run.config.model.embed_size == 64
    assert run.config.model.jsr_branches == 2
    assert not run.model.training
    assert run.metadata["val_rsum"] == pytest.approx(
        float(read_log(out / "val_metrics.csv")[0]["rsum"])
    )
    images = encode_images(run.model, store, np.array([30, 2, 17]), batch_size=2)
    captions = encode_captions(
        run.model, run.tokenizer, ["a dog", "a kite and a bench"], run.config.data.max_length
    )
    assert images.shape == (3, 64)
    assert captions.shape == (2, 64)
    assert images.dtype == captions.dtype == torch.float32
    torch.testing.assert_close(images.norm(dim=1), torch.ones(3), rtol=1e-4, atol=1e-4)
    # The same image encoded alone or among others gives the same embedding.
    alone = encode_images(run.model, store.path, [17])
    torch.testing.assert_close(alone[0], images[2], rtol=1e-3, atol=1e-3)


def invoke(args):
    return CliRunner().invoke(cli, ["--no-params", "train", *args])


@pytest.mark.parametrize(
    ("store_options", "extra", "message"),
    [
        ({"regions": False}, [], "has no region features, which model.use_regions needs"),
        ({"grid": False}, [], "has no grid features, which model.use_grid needs"),
        (
            {"splits": {"val": range(10)}},
            [],
            "has no split 'train' \\(data.train_splits\\); it has val",
        ),
        ({}, ["--set", "data.val_split=dev"], "has no split 'dev' \\(data.val_split\\)"),
        ({}, ["--set", "data.batch_size=64"], "give no full batch of data.batch_size=64"),
    ],
)
def test_store_without_what_config_needs_is_rejected(tmp_path, store_options, extra, message):
    store = random_store(tmp_path / "feats.zarr", n_images=20, max_boxes=4, **store_options)
    result = invoke(
        [
            "--feats",
            str(store.path),
            "--out",
            str(tmp_path / "run"),
            *[f"--set={o}" for o in TINY],
            *extra,
        ]
    )
    assert result.exit_code == 1, result.output
    assert "Error:" in result.output
    assert re.search(message, result.output), result.output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_store_without_captions_is_rejected(tmp_path):
    store = random_store(tmp_path / "feats.zarr", n_images=20, max_boxes=4)
    del store.group["captions"]
    result = invoke(
        ["--feats", str(store.path), "--out", str(tmp_path / "run"), *[f"--set={o}" for o in TINY]]
    )
    assert result.exit_code == 1
    assert "has no captions. Re-run `dsran extract` with --captions FILE" in result.output


def test_missing_store_and_text_model_errors(tmp_path, monkeypatch):
    result = invoke(["--feats", str(tmp_path / "none.zarr"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "feature store not found" in result.output

    store = random_store(tmp_path / "feats.zarr", n_images=20, max_boxes=4)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = invoke(
        [
            "--feats",
            str(store.path),
            "--out",
            str(tmp_path / "run"),
            "--text-model",
            "bert-base-uncased",
        ]
    )
    assert result.exit_code == 1
    assert (
        "text model 'bert-base-uncased' is not a local folder and is not in the Hugging Face cache"
        in result.output
    )
    assert "dsran never downloads models" in result.output
    result = invoke(
        [
            "--feats",
            str(store.path),
            "--out",
            str(tmp_path / "run"),
            "--text-model",
            str(tmp_path / "nope"),
        ]
    )
    assert "text model folder not found" in result.output


def test_run_folder_rules(tmp_path):
    store = random_store(tmp_path / "feats.zarr", n_images=20, max_boxes=4)
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    options = ["--feats", str(store.path), "--out", str(out), *[f"--set={o}" for o in TINY]]
    result = invoke(options)
    assert "already exists and is not empty; pass --resume" in result.output
    result = invoke([*options, "--resume"])
    assert "cannot resume" in result.output
    result = invoke(["--feats", str(store.path), "--resume"])
    assert "--resume needs --out RUN" in result.output


def test_cli_and_run_folder_agree_on_config_name():
    from dsran.train import cli as train_cli
    from dsran.train import run as run_files

    assert train_cli.CONFIG_FILE == run_files.CONFIG_FILE


def test_torchrun_two_processes_with_sync_batchnorm(tmp_path):
    store = random_store(tmp_path / "feats.zarr", n_images=48, max_boxes=10, chunk_images=4)
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "dsran",
        "train",
        "--feats",
        str(store.path),
        "--out",
        str(out),
        *[f"--set={option}" for option in TINY],
        "--set=data.batch_size=4",
        "--set=run.sync_batchnorm=true",
    ]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trained") == 1, result.stdout
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["world_size"] == 2
    # 24 training images with 2 captions each: every process reads half the buffers,
    # 24 captions or 6 batches of 4 per epoch, for 2 epochs.
    log = read_log(out / "train_log.csv")
    assert [int(row["step"]) for row in log] == list(range(1, 13))
    assert float(log[0]["samples_per_s"]) > 0
    assert len(read_log(out / "val_metrics.csv")) == 2
    run = load_run(out)
    assert run.metadata["best_epoch"] in (1, 2)
