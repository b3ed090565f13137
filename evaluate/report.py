"""Evaluation reports: JSON, DVC metrics, a Markdown table beside the paper, plots and ranks.

Files written into the output folder:

- ``results.json``: every metric (averaged and per fold), the models, the store's
  provenance and whether the CNN features came from random weights.
- ``metrics.json``: the averaged metrics with flat keys, for ``dvc metrics``.
- ``results.md``: the metrics in the layout of the tables of the DSRAN paper (Wen and
  Gu), beside that paper's numbers for the matching protocol.
- ``recall_at_k.png``: Recall@K for K = 1..100, image-to-text and text-to-image.
- ``rank_histogram.png``: histograms of the per-query ranks, both directions.
- ``ranks.csv``: one row per query with its rank, its positive and its top-1 result.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and in DVC stages

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from dsran.evaluate.protocols import EvalSet, ProtocolResult  # noqa: E402
from dsran.evaluate.recall import recall_curve  # noqa: E402

from dsran import __version__  # noqa: E402

logger = logging.getLogger(__name__)

CURVE_MAX_K = 100
TIE_RULE = (
    "rank = 1 + number of candidates scoring strictly above the positive; "
    "ties count in the query's favour"
)
RESULTS_JSON = "results.json"
METRICS_JSON = "metrics.json"
RESULTS_MARKDOWN = "results.md"
RECALL_PLOT = "recall_at_k.png"
RANK_HISTOGRAM = "rank_histogram.png"
RANKS_CSV = "ranks.csv"


@dataclass(frozen=True)
class PaperResult:
    """DSRAN's published recalls for one protocol (BERT-base text encoder)."""

    benchmark: str  # the test set the paper reports on
    single: tuple[float, ...]  # i2t R@1, R@5, R@10, t2i R@1, R@5, R@10, Rsum; one model
    ensemble: tuple[float, ...]  # the same for the two-model ensemble


# Wen and Gu, "Dual Semantic Relationship Attention Network for Image-Text Matching",
# Table I (MS-COCO 1K and 5K test sets) and Table II (Flickr30K).
PAPER_DSRAN = {
    "1k-5fold": PaperResult(
        "COCO 1K test (5 folds of 1,000 images)",
        (76.5, 96.0, 98.4, 62.7, 89.7, 95.2, 518.4),
        (78.2, 96.3, 98.6, 64.2, 90.6, 95.8, 523.7),
    ),
    "5k": PaperResult(
        "COCO 5K test",
        (52.7, 81.5, 90.3, 39.9, 70.9, 81.1, 416.4),
        (55.0, 83.0, 90.6, 41.5, 72.2, 82.4, 424.7),
    ),
    "test": PaperResult(
        "Flickr30K 1K test",
        (74.6, 93.8, 97.2, 57.8, 84.8, 90.6, 498.7),
        (76.3, 94.4, 97.5, 60.0, 85.8, 91.9, 505.9),
    ),
}
PAPER_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def random_weights_used(models: Sequence[Mapping[str, Any]], store: Mapping[str, Any]) -> bool:
    """True when the store or any model's training store has features from random CNN weights."""
    return bool(store.get("random_weights")) or any(
        bool(model.get("random_cnn_weights")) for model in models
    )


def build_results(
    result: ProtocolResult,
    eval_set: EvalSet,
    models: Sequence[Mapping[str, Any]],
    store: Mapping[str, Any],
) -> dict[str, Any]:
    """Collect everything ``results.json`` records, as JSON-serialisable values.

    ``models`` has one dict per model (``path`` and the run metadata), ``store`` the
    store's ``path``, ``provenance``, ``settings`` and ``random_weights``.
    """
    paper = PAPER_DSRAN[result.protocol]
    paper_numbers = paper.ensemble if len(models) > 1 else paper.single
    return {
        "protocol": result.protocol,
        "split": result.split,
        "num_images": eval_set.num_images,
        "num_captions": eval_set.num_captions,
        "ks": list(result.ks),
        "tie_rule": TIE_RULE,
        "metrics": result.metrics,
        "folds": [
            {
                "name": fold.fold.name,
                "num_images": len(fold.fold.images),
                "num_captions": len(fold.fold.captions),
                "metrics": fold.metrics,
            }
            for fold in result.folds
        ],
        "models": [dict(model) for model in models],
        "ensemble": len(models) > 1,
        "store": dict(store),
        "random_cnn_weights": random_weights_used(models, store),
        "paper": {
            "benchmark": paper.benchmark,
            "models": "two-model ensemble" if len(models) > 1 else "single model",
            "metrics": dict(zip(PAPER_KEYS, paper_numbers, strict=True)),
        },
        "dsran_version": __version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def flat_metrics(results: Mapping[str, Any]) -> dict[str, float | int | str]:
    """Flatten the averaged metrics and the set sizes into one level, for ``dvc metrics``."""
    flat: dict[str, float | int | str] = {
        key: round(value, 4) for key, value in results["metrics"].items()
    }
    flat["num_images"] = results["num_images"]
    flat["num_captions"] = results["num_captions"]
    return flat


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_report(results: Mapping[str, Any]) -> str:
    """Render the metrics in the paper's table layout, beside the paper's DSRAN numbers."""
    metrics, paper = results["metrics"], results["paper"]
    ks = results["ks"]
    columns = [f"{d} R@{k}" for d in ("i2t", "t2i") for k in ks] + ["Rsum"]
    keys = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in ks] + ["rsum"]
    model_names = ", ".join(Path(model["path"]).name for model in results["models"])

    lines = [f"# Retrieval results: protocol {results['protocol']}", ""]
    if results["random_cnn_weights"]:
        lines += [
            "**Warning: the CNN features come from randomly initialised weights (the store or a "
            "run's training store was extracted with random weights). These numbers only show "
            "that the pipeline runs; they say nothing about DSRAN's accuracy and cannot be "
            "compared with the paper.**",
            "",
        ]
    lines += [
        f"Split `{results['split']}`: {results['num_images']:,} images, "
        f"{results['num_captions']:,} captions. Image-to-text (i2t) ranks the captions for "
        "each image; text-to-image (t2i) ranks the images for each caption. Recall in percent.",
        "",
        _row(["Method", *columns]),
        _row(["---"] * (len(columns) + 1)),
        _row([f"This evaluation ({model_names})", *(f"{metrics[key]:.1f}" for key in keys)]),
    ]
    paper_cells = [
        f"{paper['metrics'][key]:.1f}" if key in paper["metrics"] else "-" for key in keys
    ]
    lines.append(_row([f"DSRAN paper, {paper['models']}, BERT-base", *paper_cells]))
    lines += [
        "",
        f"The paper's row is its {paper['benchmark']} result; it is comparable only when this "
        "split is that test set and the features come from the paper's pretrained CNNs.",
        "",
    ]

    if len(results["folds"]) > 1:
        lines += ["## Folds", "", _row(["Fold", *columns]), _row(["---"] * (len(columns) + 1))]
        for fold in results["folds"]:
            lines.append(_row([fold["name"], *(f"{fold['metrics'][key]:.1f}" for key in keys)]))
        lines += ["", "The first table averages these folds.", ""]

    lines += [
        "## Ranks",
        "",
        _row(["Direction", "median rank", "mean rank"]),
        _row(["---"] * 3),
        _row(["i2t", f"{metrics['i2t_medr']:.1f}", f"{metrics['i2t_meanr']:.1f}"]),
        _row(["t2i", f"{metrics['t2i_medr']:.1f}", f"{metrics['t2i_meanr']:.1f}"]),
        "",
        f"Tie rule: {results['tie_rule']}.",
        "",
        "## Inputs",
        "",
    ]
    for model in results["models"]:
        # A run trained without a validation split has no val_rsum (null in its metadata).
        details = ", ".join(
            f"{key} {model[key]}"
            for key in ("best_epoch", "val_rsum")
            if model.get(key) is not None
        )
        lines.append(f"- model `{model['path']}`" + (f" ({details})" if details else ""))
    store = results["store"]
    lines.append(f"- feature store `{store.get('path')}`")
    lines.append(f"- random CNN weights: {'yes' if results['random_cnn_weights'] else 'no'}")
    return "\n".join(lines) + "\n"


def _fold_curves(result: ProtocolResult, direction: str) -> np.ndarray:
    curves = [recall_curve(getattr(fold.ranks, direction), CURVE_MAX_K) for fold in result.folds]
    return np.mean(curves, axis=0)


def plot_recall_curves(result: ProtocolResult, path: Path) -> None:
    """Plot Recall@K for K = 1..100 both ways, averaged over folds."""
    ks = np.arange(1, CURVE_MAX_K + 1)
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(ks, _fold_curves(result, "i2t"), label="image-to-text")
    axes.plot(ks, _fold_curves(result, "t2i"), label="text-to-image")
    axes.set_xscale("log")
    axes.set_xlabel("K")
    axes.set_ylabel("Recall@K (%)")
    axes.set_ylim(0, 100)
    axes.set_title(f"Recall@K, protocol {result.protocol}, split {result.split}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_rank_histograms(result: ProtocolResult, path: Path) -> None:
    """Plot histograms of per-query ranks (all folds) on logarithmic bins.

    Bars show queries per rank (count divided by the bin's width in ranks), because
    logarithmic bins over integer ranks have unequal widths.
    """
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, direction, title in (
        (axes[0], "i2t", "image-to-text"),
        (axes[1], "t2i", "text-to-image"),
    ):
        ranks = np.concatenate([getattr(fold.ranks, direction) for fold in result.folds])
        edges = np.unique(np.geomspace(1, ranks.max() + 1, num=40).round())
        if len(edges) < 2:
            edges = np.array([1.0, 2.0])
        counts, _ = np.histogram(ranks, bins=edges)
        widths = np.diff(edges)
        axis.bar(edges[:-1], counts / widths, width=widths, align="edge")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("rank of the positive (1 = first)")
        axis.set_ylabel("queries per rank")
        axis.set_title(f"{title} ({len(ranks):,} queries)")
    figure.suptitle(f"Ranks, protocol {result.protocol}, split {result.split}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_ranks_csv(result: ProtocolResult, eval_set: EvalSet, path: Path) -> None:
    """Write one row per query: its rank, its positive and its top-1 result.

    Rows use store rows (``images/*`` for images, ``captions/*`` for captions), so the
    file can be joined with the store.
    """
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(
            [
                "fold",
                "direction",
                "query_row",
                "query",
                "rank",
                "positive_row",
                "positive",
                "top1_row",
                "top1",
            ]
        )
        for fold_result in result.folds:
            fold, ranks = fold_result.fold, fold_result.ranks
            images, captions = fold.images, fold.captions
            for local, image in enumerate(images):
                best = captions[ranks.i2t_best_caption[local]]
                top1 = captions[ranks.i2t_top1[local]]
                writer.writerow(
                    [
                        fold.name,
                        "i2t",
                        eval_set.image_rows[image],
                        eval_set.image_paths[image],
                        ranks.i2t[local],
                        eval_set.caption_rows[best],
                        eval_set.caption_texts[best],
                        eval_set.caption_rows[top1],
                        eval_set.caption_texts[top1],
                    ]
                )
            for local, caption in enumerate(captions):
                positive = images[fold.caption_image[local]]
                top1 = images[ranks.t2i_top1[local]]
                writer.writerow(
                    [
                        fold.name,
                        "t2i",
                        eval_set.caption_rows[caption],
                        eval_set.caption_texts[caption],
                        ranks.t2i[local],
                        eval_set.image_rows[positive],
                        eval_set.image_paths[positive],
                        eval_set.image_rows[top1],
                        eval_set.image_paths[top1],
                    ]
                )


def write_reports(
    out_dir: str | Path,
    result: ProtocolResult,
    eval_set: EvalSet,
    models: Sequence[Mapping[str, Any]],
    store: Mapping[str, Any],
) -> dict[str, Path]:
    """Write every report file into ``out_dir`` and return their paths by file name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = build_results(result, eval_set, models, store)
    paths = {name: out_dir / name for name in (RESULTS_JSON, METRICS_JSON, RESULTS_MARKDOWN)}
    paths[RESULTS_JSON].write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
    paths[METRICS_JSON].write_text(json.dumps(flat_metrics(results), indent=2) + "\n")
    paths[RESULTS_MARKDOWN].write_text(markdown_report(results))

    paths[RECALL_PLOT] = out_dir / RECALL_PLOT
    plot_recall_curves(result, paths[RECALL_PLOT])
    paths[RANK_HISTOGRAM] = out_dir / RANK_HISTOGRAM
    plot_rank_histograms(result, paths[RANK_HISTOGRAM])
    paths[RANKS_CSV] = out_dir / RANKS_CSV
    write_ranks_csv(result, eval_set, paths[RANKS_CSV])
    logger.info("wrote %d report files to %s", len(paths), out_dir)
    return paths


def _json_default(value: Any) -> Any:
    """Convert numpy scalars and arrays and paths, which json cannot serialise."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON: {value!r}")


def format_failures(result: ProtocolResult, eval_set: EvalSet, count: int) -> str:
    """Describe the ``count`` worst-ranked text queries and image queries with their captions."""
    text_queries, image_queries = [], []
    for fold_result in result.folds:
        fold, ranks = fold_result.fold, fold_result.ranks
        for local, caption in enumerate(fold.captions):
            positive = fold.images[fold.caption_image[local]]
            top1 = fold.images[ranks.t2i_top1[local]]
            text_queries.append((int(ranks.t2i[local]), fold.name, caption, positive, top1))
        for local, image in enumerate(fold.images):
            top1 = fold.captions[ranks.i2t_top1[local]]
            image_queries.append((int(ranks.i2t[local]), fold.name, image, top1))
    text_queries.sort(key=lambda item: -item[0])
    image_queries.sort(key=lambda item: -item[0])
    captions_of = _captions_by_image(eval_set)

    lines = [f"Worst {min(count, len(text_queries))} text queries (text-to-image):"]
    for rank, fold, caption, positive, top1 in text_queries[:count]:
        lines += [
            f"  rank {rank} ({fold}): {eval_set.caption_texts[caption]!r}",
            f"      its image: {eval_set.image_paths[positive]}",
            f"      top-1 image: {eval_set.image_paths[top1]}",
        ]
    lines.append(f"Worst {min(count, len(image_queries))} image queries (image-to-text):")
    for rank, fold, image, top1 in image_queries[:count]:
        lines.append(f"  rank {rank} ({fold}): {eval_set.image_paths[image]}")
        lines += [f"      its caption: {eval_set.caption_texts[c]!r}" for c in captions_of[image]]
        lines.append(f"      top-1 caption: {eval_set.caption_texts[top1]!r}")
    return "\n".join(lines)


def _captions_by_image(eval_set: EvalSet) -> list[list[int]]:
    by_image: list[list[int]] = [[] for _ in range(eval_set.num_images)]
    for caption, image in enumerate(eval_set.caption_image):
        by_image[image].append(caption)
    return by_image
