"""Evaluate trained runs: encode a split, score it under a protocol, write the reports."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from dsran.evaluate.protocols import (
    EvalSet,
    ProtocolResult,
    check_protocol,
    evaluate_protocol,
    load_eval_set,
)
from dsran.evaluate.recall import DEFAULT_KS, default_device
from dsran.evaluate.report import write_reports
from dsran.extract.store import FeatureStore, StoreError

if TYPE_CHECKING:
    from dsran.train.run import TrainedRun

logger = logging.getLogger(__name__)

DEFAULT_STORE_SPLIT = "test"
DEFAULT_BATCH_SIZE = 128
EVAL_SUBFOLDER = "eval"


class EvaluationError(RuntimeError):
    """The requested evaluation cannot run: missing runs or stores, mismatched inputs."""


@dataclass
class EvalOptions:
    """Settings of one ``dsran eval`` run: the models, the data, the protocol and the output."""

    protocol: str  # "test", "5k" or "1k-5fold"
    models: list[Path]  # run folders; several form an ensemble
    feats: Path | None = None  # feature store; None reads the store the runs were trained from
    store_split: str = DEFAULT_STORE_SPLIT  # store split whose images are scored
    out: Path | None = None  # report folder; None writes into the first run's eval/ folder
    batch_size: int = DEFAULT_BATCH_SIZE  # images or captions per encoder batch
    device: str | None = None  # torch device; None picks CUDA when present
    ks: tuple[int, ...] = DEFAULT_KS  # the K of Recall@K
    chunk_size: int | None = None  # image rows per ranking block; None sizes it automatically


@dataclass
class EvalOutcome:
    """The result of one evaluation and where its reports went."""

    result: ProtocolResult
    eval_set: EvalSet
    out_dir: Path
    report_paths: dict[str, Path] = field(default_factory=dict)


def resolve_store_path(run_paths: Sequence[Path], trained_from: Sequence[str | None]) -> Path:
    """Find the one feature store that all runs were trained from.

    A relative path in a run's metadata is tried as given (relative to the working
    folder, where ``dsran train`` ran) and then relative to the run folder.
    """
    resolved = []
    for run_path, feats in zip(run_paths, trained_from, strict=True):
        if not feats:
            raise EvaluationError(
                f"run {run_path} does not record the feature store it was trained from; "
                "pass --feats STORE"
            )
        candidates = [Path(feats)]
        if not Path(feats).is_absolute():
            candidates.append(run_path / feats)
        found = next((path for path in candidates if (path / "zarr.json").is_file()), None)
        if found is None:
            raise EvaluationError(
                f"run {run_path} was trained from feature store {feats}, which was not found "
                f"(tried {', '.join(str(path) for path in candidates)}); pass --feats STORE"
            )
        resolved.append(found.resolve())
    if len(set(resolved)) > 1:
        listing = ", ".join(
            f"{run} <- {store}" for run, store in zip(run_paths, resolved, strict=True)
        )
        raise EvaluationError(
            f"the runs were trained from different feature stores ({listing}); pass --feats "
            "STORE to score them all on one store"
        )
    return resolved[0]


def store_summary(store: FeatureStore) -> dict[str, Any]:
    """Describe a store for the reports: path, provenance, extractor settings, random weights."""
    attrs = store.attrs
    return {
        "path": str(store.path),
        "schema_version": attrs.get("schema_version"),
        "provenance": attrs.get("provenance", {}),
        "settings": store.settings,
        "random_weights": store.random_weights,
        "num_images": len(store),
    }


def model_summary(run: TrainedRun) -> dict[str, Any]:
    """Describe a trained run for the reports: its folder and training metadata."""
    metadata = dict(run.metadata)
    summary: dict[str, Any] = {"path": str(run.path)}
    for key in ("feats", "random_cnn_weights", "best_epoch", "val_rsum"):
        if key in metadata:
            summary[key] = metadata[key]
    summary["metadata"] = metadata
    return summary


def encode_eval_set(
    run: TrainedRun,
    store: FeatureStore,
    eval_set: EvalSet,
    batch_size: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed the eval set's images and captions with one trained run.

    Returns (N, D) image and (M, D) caption embeddings, float32 and L2-normalised.
    """
    from dsran.train.encode import encode_captions, encode_images

    start = time.perf_counter()
    images = encode_images(
        run.model, store, eval_set.image_rows, batch_size=batch_size, device=device
    )
    captions = encode_captions(
        run.model,
        run.tokenizer,
        [str(text) for text in eval_set.caption_texts],
        max_length=run.config.data.max_length,
        batch_size=batch_size,
        device=device,
    )
    elapsed = time.perf_counter() - start
    logger.info(
        "encoded %d images and %d captions with %s in %.1f s (%.0f items/s)",
        eval_set.num_images,
        eval_set.num_captions,
        run.path,
        elapsed,
        (eval_set.num_images + eval_set.num_captions) / max(elapsed, 1e-9),
    )
    return images, captions


def default_out_dir(models: Sequence[Path], protocol: str, store_split: str) -> Path:
    """Return the report folder used when --out is not given: ``eval/<protocol>-<split>/``
    in the first run, so that each protocol and split keeps its own reports."""
    return Path(models[0]) / EVAL_SUBFOLDER / f"{protocol}-{store_split}"


def evaluate_runs(options: EvalOptions) -> EvalOutcome:
    """Run one evaluation: check the store and split, encode with every run, score, report."""
    if not options.models:
        raise EvaluationError("no model given; pass --model RUN (several times for an ensemble)")
    for path in options.models:
        if not Path(path).is_dir():
            raise EvaluationError(f"run folder not found: {path}")
    device = torch.device(options.device) if options.device else default_device()
    # Imported on use: the training stack (transformers) is slow to import, and
    # `dsran eval --help` or a rejected split should not wait for it.
    from dsran.train.run import METADATA_FILE, RunError, load_run, read_json

    # 1. The store the runs were trained from unless --feats names another, and the
    #    split, checked against the protocol before any model is loaded.
    if options.feats is not None:
        store_path = Path(options.feats)
    else:
        try:
            trained_from = [
                read_json(Path(path) / METADATA_FILE).get("feats") for path in options.models
            ]
        except RunError as error:
            raise EvaluationError(
                f"{error}; is it a run folder written by `dsran train`?"
            ) from error
        store_path = resolve_store_path([Path(path) for path in options.models], trained_from)
    store = FeatureStore.open(store_path)
    try:
        eval_set = load_eval_set(store, options.store_split)
    except StoreError as error:
        raise EvaluationError(str(error)) from error
    check_protocol(options.protocol, eval_set.num_images, eval_set.split)
    logger.info(
        "evaluating %d run(s) on split %r of %s: %d images, %d captions, protocol %s",
        len(options.models),
        eval_set.split,
        store.path,
        eval_set.num_images,
        eval_set.num_captions,
        options.protocol,
    )
    if store.random_weights:
        logger.warning("the store's CNN features come from random weights")

    # 2. Embeddings of every run, loaded one at a time so that only one model is in memory.
    image_embeddings, caption_embeddings, model_summaries = [], [], []
    for path in options.models:
        try:
            run = load_run(path, device=device)
        except RunError as error:
            raise EvaluationError(str(error)) from error
        images, captions = encode_eval_set(run, store, eval_set, options.batch_size, device)
        image_embeddings.append(images)
        caption_embeddings.append(captions)
        model_summaries.append(model_summary(run))
        del run

    # 3. The protocol on the (averaged) similarities.
    result = evaluate_protocol(
        options.protocol,
        eval_set,
        image_embeddings,
        caption_embeddings,
        ks=options.ks,
        chunk_size=options.chunk_size,
        device=device,
    )

    # 4. Reports.
    out_dir = (
        Path(options.out)
        if options.out is not None
        else default_out_dir(options.models, options.protocol, options.store_split)
    )
    paths = write_reports(out_dir, result, eval_set, model_summaries, store_summary(store))
    return EvalOutcome(result=result, eval_set=eval_set, out_dir=out_dir, report_paths=paths)
