"""Learning checks: real training runs that must reach high recall, nothing mocked."""

from __future__ import annotations

import numpy as np
from dsran.evaluate.recall import retrieval_metrics
from dsran.train.config import resolve_config
from dsran.train.encode import encode_captions, encode_images
from dsran.train.run import load_run
from dsran.train.trainer import Trainer
from synthetic_store import MINILM, coco_mini_captions, concept_store, write_store

SMALL = [
    f"model.text_model={MINILM}",
    "model.embed_size=128",
    "data.batch_size=32",
    "data.num_workers=0",
    "data.max_length=24",
    "run.tensorboard=false",
]


def test_held_out_concept_images_are_retrieved(tmp_path):
    # Test images show concept sets that never occur in training, so recall needs the
    # model to tie each concept's features to its word.
    store = concept_store(tmp_path / "feats.zarr", n_train=120, n_test=50, max_boxes=8)
    config = resolve_config(
        None, [*SMALL, "data.val_split=test", "optim.epochs=2", "optim.lr=2e-4"]
    )
    Trainer(config, store.path, tmp_path / "run").fit()

    run = load_run(tmp_path / "run")
    rows = store.split("test")
    text, caption_image = store.captions()
    selected = np.flatnonzero(np.isin(caption_image, rows))
    images = encode_images(run.model, store, rows)
    captions = encode_captions(
        run.model, run.tokenizer, [str(text[i]) for i in selected], run.config.data.max_length
    )
    positions = np.searchsorted(rows, caption_image[selected])
    metrics = retrieval_metrics(images @ captions.T, positions)
    assert metrics["i2t_r1"] >= 90, metrics
    assert metrics["t2i_r1"] >= 90, metrics
    assert run.metadata["val_rsum"] == max(
        row["rsum"] for row in run.metadata["checkpoint"]["history"]
    )


def test_training_split_recall_rises_far_above_chance(tmp_path):
    # Real COCO captions of the coco-mini sample, each image a fixed random feature set:
    # the model must learn which captions belong to which features.
    captions, caption_image, names = coco_mini_captions()
    n = len(names)
    rng = np.random.default_rng(0)
    grid = rng.standard_normal((n, 49, 2048)).astype(np.float16)
    regions = rng.standard_normal((n, 8, 2048)).astype(np.float16)
    store = write_store(
        tmp_path / "feats.zarr",
        grid,
        regions,
        rng.integers(3, 9, n),
        captions,
        caption_image,
        {"train": range(80), "val": range(80, n)},
    )
    config = resolve_config(
        None, [*SMALL, "data.val_split=train", "optim.epochs=2", "optim.lr=5e-4"]
    )
    trainer = Trainer(config, store.path, tmp_path / "run")
    before = trainer.validate()
    state = trainer.fit()

    after = state.history[-1]
    # Chance level for 80 images with 5 captions each is an Rsum of about 39.
    assert before["rsum"] < 100, before
    assert after["rsum"] > 400, after
    assert after["rsum"] > before["rsum"] + 300
