"""Click command of stage 2: ``dsran train``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click
from dsran.train.config import (
    ConfigError,
    available_presets,
    build_config,
    load_config,
    parse_override,
    resolve_config,
)

# Kept equal to dsran.train.run.CONFIG_FILE; importing that module here would load torch
# for every dsran command.
CONFIG_FILE = "config.yaml"

logger = logging.getLogger(__name__)

# Sections that --set may change when resuming; the others define the model and data.
RESUMABLE_SECTIONS = ("run",)


def _resume_config(
    out: Path, preset: str | None, overrides: tuple[str, ...], text_model: str | None
):
    """Load the saved config of ``out`` and apply ``run.*`` overrides; reject other changes."""
    if not (out / CONFIG_FILE).is_file():
        raise click.ClickException(
            f"cannot resume: {out / CONFIG_FILE} not found; start a new run without --resume"
        )
    if preset is not None or text_model is not None:
        raise click.ClickException(
            "--resume continues with the run's saved config.yaml; drop --preset and --text-model"
        )
    config = load_config(out / CONFIG_FILE)
    values = config.to_dict()
    for text in overrides:
        key, value = parse_override(text)
        section, _, name = key.partition(".")
        if section not in RESUMABLE_SECTIONS:
            raise click.ClickException(
                f"--set {text} would change the {section!r} section of a run being resumed; only "
                f"{', '.join(s + '.*' for s in RESUMABLE_SECTIONS)} settings may change on --resume"
            )
        values[section][name] = value
    return build_config(values)


@click.command("train")
@click.option(
    "--feats",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Feature store written by `dsran extract` (grid and/or region features, captions, splits).",
)
@click.option(
    "--preset",
    default=None,
    help=f"Configuration preset: a name ({', '.join(available_presets())}) or a YAML file. "
    "Default: the built-in defaults (Flickr30K-like, BERT-base).",
)
@click.option(
    "--out",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="Run folder for config, checkpoints and logs. Default: runs/<preset>-<UTC time>.",
)
@click.option(
    "--text-model",
    default=None,
    help="Text model folder, Hugging Face model id in the local cache, or package:MODULE/SUBDIR; "
    "overrides model.text_model.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in --out from its last checkpoint, at the exact step.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config value, e.g. --set data.batch_size=64 --set optim.epochs=3 (repeatable).",
)
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N; overrides run.device.")
@click.option(
    "--precision",
    default=None,
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    help="Autocast precision; overrides run.precision.",
)
def train_command(
    feats: Path,
    preset: str | None,
    out: Path | None,
    text_model: str | None,
    resume: bool,
    overrides: tuple[str, ...],
    device: str | None,
    precision: str | None,
) -> None:
    """Train DSRAN on a feature store and write a run folder."""
    from dsran.extract.store import StoreError
    from dsran.train.run import RunError
    from dsran.train.text import TextModelNotFoundError
    from dsran.train.trainer import TrainingError, train

    overrides = tuple(overrides)
    if device is not None:
        overrides += (f"run.device={device}",)
    if precision is not None:
        overrides += (f"run.precision={precision}",)
    if out is None:
        if resume:
            raise click.ClickException("--resume needs --out RUN, the run folder to continue")
        import datetime as _dt

        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{Path(preset).stem if preset else 'default'}-{stamp}"
    try:
        if resume:
            config = _resume_config(out, preset, overrides, text_model)
        else:
            config = resolve_config(preset, overrides, text_model)
        state = train(config, feats, out, resume=resume)
    except (ConfigError, StoreError, RunError, TrainingError, TextModelNotFoundError) as error:
        raise click.ClickException(str(error)) from error
    if os.environ.get("RANK", "0") != "0":
        return
    if state.epoch >= config.optim.epochs:
        best = f"best epoch {state.best_epoch}" + (
            f", val rsum {state.best_rsum:.1f}" if state.best_rsum > float("-inf") else ""
        )
        click.echo(f"trained {out}: {state.step} steps, {best}")
    else:
        click.echo(
            f"stopped {out} at step {state.step}; continue with: dsran train --feats {feats} --out {out} --resume"
        )


@click.command("convert-official")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Run folder to write; `dsran eval --model RUN` reads it like a trained run.",
)
@click.option(
    "--feats",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="Feature store to evaluate on (with regions/class_probs); recorded in the run, and its "
    "grid weights are compared with the checkpoint's ResNet152.",
)
@click.option(
    "--text-model",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="BERT folder of the checkpoint's opt.bert_path: config.json or bert_config.json, and "
    "vocab.txt or tokenizer files. Its weights are not read; the checkpoint's replace them.",
)
@click.option(
    "--trust-pickle",
    is_flag=True,
    help="Unpickle the checkpoint. Unpickling runs code named in the file; pass this only "
    "for files from a source you trust.",
)
@click.option(
    "--grid-weights",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The ResNet152 weights file the store's grid features came from, when it is not in "
    "torchvision's cache; used only for the comparison.",
)
@click.option(
    "--export-resnet",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also save the checkpoint's ResNet152 as a torchvision state dict, for "
    "`dsran extract --grid-weights FILE`.",
)
def convert_official_command(
    checkpoint: Path,
    out: Path,
    feats: Path | None,
    text_model: Path,
    trust_pickle: bool,
    grid_weights: Path | None,
    export_resnet: Path | None,
) -> None:
    """Convert an official DSRAN checkpoint (model_best.pth.tar, BERT) into a run folder."""
    from dsran.extract.store import StoreError
    from dsran.train.official import ConversionError, convert_official

    try:
        result = convert_official(
            checkpoint,
            out,
            text_model=text_model,
            feats=feats,
            trust_pickle=trust_pickle,
            grid_weights=grid_weights,
            export_resnet_path=export_resnet,
        )
    except (ConversionError, StoreError) as error:
        raise click.ClickException(str(error)) from error
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"converted {checkpoint} into {out}")
