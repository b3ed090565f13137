"""Click command of stage 3: ``dsran eval``.

Inside the DVC pipeline the ``eval:`` section of ``params.yaml`` sets this command's
defaults. Its keys are the option names with underscores: ``split``, ``model`` (one run
folder or a list of them), ``feats``, ``store_split``, ``out``, ``show_failures``,
``device`` and ``batch_size``. Options on the command line win.
"""

from __future__ import annotations

from pathlib import Path

import click
from dsran.evaluate.evaluator import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_STORE_SPLIT,
    EvalOptions,
    EvaluationError,
    evaluate_runs,
)
from dsran.evaluate.protocols import PROTOCOLS, ProtocolError
from dsran.evaluate.report import format_failures
from dsran.extract.store import StoreError


class _ListOption(click.Option):
    """A ``multiple=True`` option whose params.yaml default may be one string or a list."""

    def consume_value(self, ctx: click.Context, opts: dict) -> tuple:
        value, source = super().consume_value(ctx, opts)
        if isinstance(value, str):
            value = (value,)
        return value, source


@click.command("eval")
@click.option(
    "--split",
    type=click.Choice(PROTOCOLS),
    required=True,
    help="Protocol: 'test' scores every image of --store-split as one set; '5k' the 5,000 "
    "COCO test images as one set; '1k-5fold' those 5,000 as 5 folds of 1,000, averaged.",
)
@click.option(
    "--model",
    "model",
    cls=_ListOption,
    multiple=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Run folder written by `dsran train`. Give it several times to average the "
    "similarities of an ensemble.",
)
@click.option(
    "--feats",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Feature store to score. Default: the store the first run was trained from.",
)
@click.option(
    "--store-split",
    default=DEFAULT_STORE_SPLIT,
    show_default=True,
    help="Split of the feature store whose images and captions are scored.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the reports. Default: eval/PROTOCOL-STORE_SPLIT/ inside the first run folder.",
)
@click.option(
    "--show-failures",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Print the N worst-ranked text queries and image queries with their captions.",
)
@click.option(
    "--device",
    default=None,
    help="Torch device for encoding and ranking, e.g. cpu or cuda:0. Default: CUDA when present.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Images or captions per encoder batch.",
)
def eval_command(
    split: str,
    model: tuple[Path, ...],
    feats: Path | None,
    store_split: str,
    out: Path | None,
    show_failures: int,
    device: str | None,
    batch_size: int,
) -> None:
    """Score trained runs on a feature store split with Recall@K and write reports."""
    if not model:
        raise click.UsageError(
            "no model given: pass --model RUN, or set `model` in the eval section of params.yaml"
        )
    options = EvalOptions(
        protocol=split,
        models=list(model),
        feats=feats,
        store_split=store_split,
        out=out,
        batch_size=batch_size,
        device=device,
    )
    try:
        outcome = evaluate_runs(options)
    except (EvaluationError, ProtocolError, StoreError) as error:
        raise click.ClickException(str(error)) from error

    metrics = outcome.result.metrics
    ks = outcome.result.ks
    click.echo(
        f"{outcome.result.protocol} on split {outcome.eval_set.split!r} "
        f"({outcome.eval_set.num_images} images, {outcome.eval_set.num_captions} captions)"
    )
    for direction in ("i2t", "t2i"):
        recalls = "  ".join(f"R@{k} {metrics[f'{direction}_r{k}']:.1f}" for k in ks)
        click.echo(
            f"  {direction}: {recalls}  medr {metrics[f'{direction}_medr']:.1f}  "
            f"meanr {metrics[f'{direction}_meanr']:.1f}"
        )
    click.echo(f"  rsum: {metrics['rsum']:.1f}")
    click.echo(f"reports written to {outcome.out_dir}")
    if show_failures:
        click.echo(format_failures(outcome.result, outcome.eval_set, show_failures))
