"""Training configuration: dataclasses, named presets and ``key=value`` overrides.

A run's configuration is built in three layers: the dataclass defaults below, a preset
file (``train/presets/<name>.yaml`` or any YAML path) and ``--set section.key=value``
overrides. The resolved result is written to ``config.yaml`` in the run folder, and
:func:`load_config` reads that file back.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A preset, override or configuration value is invalid."""


@dataclass
class ModelConfig:
    """The DSRAN network."""

    # Size D of the joint embedding space and of every graph-attention layer.
    embed_size: int = 1024
    # Attention heads of every graph-attention layer; embed_size must divide by it.
    gat_heads: int = 8
    # Dropout on attention weights and after both Linear blocks of a graph-attention layer.
    gat_dropout: float = 0.2
    # Graph-attention layers x stacked on each side of the separate semantic
    # relationship module (SSR): x on the grid graph and x on the region graph.
    # 0 skips SSR (the ablation baseline).
    ssr_layers: int = 1
    # Branches K of the joint semantic relationship module (JSR), one graph-attention
    # layer each over the joint grid + region graph, fused by gates: 1, 2 or 4.
    jsr_branches: int = 2
    # Use the grid features (grid/features, 49 nodes per image).
    use_grid: bool = True
    # Use the region features (regions/features, masked by regions/count).
    use_regions: bool = True
    # Grid feature encoder: "paper" (Linear) or "official" (Linear + ReLU + Dropout 0.1).
    grid_encoder: str = "paper"
    # Region feature encoder: "paper" (Linear) or "official". The official one adds the
    # authors' MLP 2048-2048-D over the features to Linear + ReLU + Dropout 0.1 over 6 box
    # values and the 1601 class probabilities, so it also reads regions/boxes,
    # regions/object_scores and regions/class_probs.
    region_encoder: str = "paper"
    # Text model: a folder with config.json, weights and tokenizer files, a Hugging Face
    # model id already in the local cache (HF_HOME), or "package:MODULE/SUBDIR" for a
    # model folder inside an installed Python package. Nothing is ever downloaded.
    text_model: str = "bert-base-uncased"
    # Fine-tune the text model's weights (True) or keep them frozen (False).
    finetune_text: bool = True
    # Dropout after the Linear + ReLU that maps text-model states to embed_size.
    text_dropout: float = 0.1
    # Caption pooling: "official" (masked mean after the graph-attention layer) or
    # "paper" (gated fusion of the masked means before and after it).
    text_pooling: str = "official"
    # Added to the norm before dividing in the L2 normalisation of embeddings.
    norm_eps: float = 1e-8
    # Feed the network as the authors' code does when true. No masks anywhere: BERT
    # attends to padding, every region slot is a graph node and means cover every
    # position. Captions are cut to data.max_length after adding [CLS] and [SEP], so a
    # long caption loses [SEP], and padded with id 0 to exactly data.max_length.
    # False masks padding.
    official_masking: bool = False


@dataclass
class DataConfig:
    """Reading the feature store."""

    # Image splits whose captions are training samples (COCO adds "restval").
    train_splits: list[str] = field(default_factory=lambda: ["train"])
    # Split used for validation after each epoch; null trains without validation and
    # keeps the last epoch as the best checkpoint.
    val_split: str | None = "val"
    # Validate on the first this many images of val_split; null uses all of them.
    val_max_images: int | None = None
    # Captions per training batch (per process under torchrun).
    batch_size: int = 128
    # Captions per batch when encoding for validation.
    eval_batch_size: int = 128
    # Maximum caption length in tokens, [CLS] and [SEP] included; longer captions are cut.
    max_length: int = 32
    # Store chunks read together and shuffled as one buffer. Larger buffers mix samples
    # better but cost memory: a 16-image chunk of grid + 100 regions is about 10 MB.
    buffer_chunks: int = 32
    # DataLoader worker processes reading chunks; 0 reads in the training process.
    num_workers: int = 2


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule."""

    # Epochs over the training captions.
    epochs: int = 12
    # Peak learning rate of Adam.
    lr: float = 2e-5
    # Adam epsilon.
    adam_eps: float = 1e-6
    # Fraction of all steps with a linear warm-up from 0 to lr; linear decay follows.
    warmup_fraction: float = 0.1
    # Multiply the learning rate by lr_decay every this many epochs.
    lr_update: int = 10
    # Factor applied every lr_update epochs.
    lr_decay: float = 0.1
    # Maximum global L2 norm of the gradients; null disables clipping.
    grad_clip: float | None = 1.0


@dataclass
class LossConfig:
    """The hinge triplet loss of VSE++."""

    # Margin of the hinge.
    margin: float = 0.2
    # Negatives per positive pair: "max" (hardest negative in the batch, VSE++ max
    # violation) or "sum" (every negative in the batch).
    negatives: str = "max"


@dataclass
class RunConfig:
    """Devices, precision, logging and checkpoints."""

    # Seed of parameters, dropout and data order.
    seed: int = 0
    # "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
    device: str = "auto"
    # "auto" (fp16 autocast on CUDA, bf16 on CPUs with native bf16, else fp32), "fp32",
    # "bf16" or "fp16" (CUDA only).
    precision: str = "auto"
    # Log loss, lr and samples/s every this many steps.
    log_every: int = 10
    # Also write a resumable checkpoint every this many steps; 0 writes one per epoch only.
    checkpoint_every: int = 0
    # Stop after this many optimiser steps in total (the schedule still spans all
    # epochs); null runs every epoch. A later --resume continues from there.
    stop_after_steps: int | None = None
    # Convert BatchNorm layers to SyncBatchNorm under torchrun.
    sync_batchnorm: bool = False
    # Write TensorBoard event files next to the CSV logs.
    tensorboard: bool = True
    # CPU threads of torch in the training process; null keeps torch's default (one per
    # core). On a CPU shared with other jobs, 1 thread can be several times faster.
    threads: int | None = None


@dataclass
class TrainConfig:
    """Everything that defines a training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def available_presets() -> list[str]:
    return sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))


def read_preset(preset: str | Path) -> dict[str, Any]:
    """Read a preset by name (a file of ``train/presets``) or by YAML path."""
    path = Path(preset)
    if not path.suffix:
        path = PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"unknown preset {str(preset)!r}; valid names: {', '.join(available_presets())}, "
                "or a path to a YAML file"
            )
    if not path.is_file():
        raise ConfigError(f"preset file not found: {path}")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(
            f"preset {path} must be a YAML mapping of sections, got {type(values).__name__}"
        )
    return values


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``section.key=value`` into the dotted key and its YAML-parsed value."""
    key, sep, raw = text.partition("=")
    if not sep or "." not in key:
        raise ConfigError(
            f"invalid override {text!r}; expected section.key=value, e.g. data.batch_size=64"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"invalid value in override {text!r}: {error}") from error
    return key.strip(), value


def _set_nested(values: dict[str, Any], dotted: str, value: Any) -> None:
    section, _, key = dotted.partition(".")
    values.setdefault(section, {})
    if not isinstance(values[section], dict):
        raise ConfigError(
            f"{section!r} is a section, so it cannot take a value ({dotted}={value!r})"
        )
    values[section][key] = value


def build_config(values: dict[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig` from nested dicts, rejecting unknown sections and keys."""
    sections = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    section_classes = {
        "model": ModelConfig,
        "data": DataConfig,
        "optim": OptimConfig,
        "loss": LossConfig,
        "run": RunConfig,
    }
    kwargs = {}
    for section, entries in values.items():
        if section not in sections:
            raise ConfigError(
                f"unknown config section {section!r}; valid sections: {', '.join(sections)}"
            )
        cls = section_classes[section]
        if entries is None:
            entries = {}
        if not isinstance(entries, dict):
            raise ConfigError(f"config section {section!r} must be a mapping, got {entries!r}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(entries) - set(valid))
        if unknown:
            raise ConfigError(
                f"unknown key(s) {', '.join(section + '.' + k for k in unknown)}; "
                f"valid keys of {section!r}: {', '.join(valid)}"
            )
        hints = typing.get_type_hints(cls)
        coerced = {
            key: _coerce(f"{section}.{key}", value, hints[key]) for key, value in entries.items()
        }
        kwargs[section] = cls(**coerced)
    config = TrainConfig(**kwargs)
    validate_config(config)
    return config


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a field's type; numbers written as text (YAML reads ``2e-5``
    as a string) become numbers."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None and type(None) in args:
            return None
        hint = next(arg for arg in args if arg is not type(None))
        args = typing.get_args(hint)
    if typing.get_origin(hint) is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"invalid {name} {value!r}; expected a list, e.g. [train, restval]")
        return [_coerce(name, item, args[0]) for item in value]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"invalid {name} {value!r}; expected true or false")
        return value
    if hint in (int, float):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"invalid {name} {value!r}; expected a number") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"invalid {name} {value!r}; expected a number")
        if hint is int:
            if value != int(value):
                raise ConfigError(f"invalid {name} {value!r}; expected a whole number")
            return int(value)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"invalid {name} {value!r}; expected a string")
        return value
    return value


def resolve_config(
    preset: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    text_model: str | None = None,
) -> TrainConfig:
    """Merge the defaults, a preset, ``key=value`` overrides and ``--text-model``."""
    values: dict[str, Any] = read_preset(preset) if preset is not None else {}
    values = {section: dict(entries or {}) for section, entries in values.items()}
    for text in overrides:
        key, value = parse_override(text)
        _set_nested(values, key, value)
    if text_model is not None:
        _set_nested(values, "model.text_model", str(text_model))
    return build_config(values)


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def load_config(path: str | Path) -> TrainConfig:
    """Read a ``config.yaml`` that :func:`save_config` wrote."""
    values = yaml.safe_load(Path(path).read_text()) or {}
    return build_config(values)


def _check_choice(name: str, value: Any, valid: tuple[Any, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"invalid {name} {value!r}; valid values: {', '.join(map(repr, valid))}")


def _check_positive(name: str, value: Any, allow_zero: bool = False) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    if isinstance(value, bool) or not isinstance(value, int | float) or not low_ok:
        bound = "at least 0" if allow_zero else "positive"
        raise ConfigError(f"invalid {name} {value!r}; it must be {bound}")


def validate_config(config: TrainConfig) -> None:
    """Raise :class:`ConfigError` on a value the trainer cannot use."""
    model, data, optim, loss, run = config.model, config.data, config.optim, config.loss, config.run
    _check_positive("model.embed_size", model.embed_size)
    _check_positive("model.gat_heads", model.gat_heads)
    if model.embed_size % model.gat_heads:
        raise ConfigError(
            f"model.embed_size {model.embed_size} does not divide by model.gat_heads "
            f"{model.gat_heads}; pick sizes such as 1024 and 8"
        )
    _check_positive("model.ssr_layers", model.ssr_layers, allow_zero=True)
    _check_choice("model.jsr_branches", model.jsr_branches, (1, 2, 4))
    _check_choice("model.text_pooling", model.text_pooling, ("official", "paper"))
    _check_choice("model.grid_encoder", model.grid_encoder, ("paper", "official"))
    _check_choice("model.region_encoder", model.region_encoder, ("paper", "official"))
    if not (model.use_grid or model.use_regions):
        raise ConfigError(
            "model.use_grid and model.use_regions are both false; enable at least one"
        )
    for name in ("gat_dropout", "text_dropout"):
        value = getattr(model, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"invalid model.{name} {value!r}; it must be in [0, 1)")

    if not data.train_splits:
        raise ConfigError("data.train_splits is empty; name at least one split, e.g. [train]")
    for name in ("batch_size", "eval_batch_size", "buffer_chunks"):
        _check_positive(f"data.{name}", getattr(data, name))
    if data.batch_size < 2:
        raise ConfigError(
            f"invalid data.batch_size {data.batch_size}; the loss needs at least 2 captions per batch"
        )
    if data.max_length < 3:
        raise ConfigError(
            f"invalid data.max_length {data.max_length}; it must be at least 3 tokens"
        )
    _check_positive("data.num_workers", data.num_workers, allow_zero=True)
    if data.val_max_images is not None:
        _check_positive("data.val_max_images", data.val_max_images)

    _check_positive("optim.epochs", optim.epochs)
    _check_positive("optim.lr", optim.lr)
    _check_positive("optim.adam_eps", optim.adam_eps)
    _check_positive("optim.lr_update", optim.lr_update)
    _check_positive("optim.lr_decay", optim.lr_decay)
    if not 0.0 <= optim.warmup_fraction < 1.0:
        raise ConfigError(
            f"invalid optim.warmup_fraction {optim.warmup_fraction!r}; it must be in [0, 1)"
        )
    if optim.grad_clip is not None:
        _check_positive("optim.grad_clip", optim.grad_clip)

    _check_positive("loss.margin", loss.margin, allow_zero=True)
    _check_choice("loss.negatives", loss.negatives, ("max", "sum"))

    _check_choice("run.precision", run.precision, ("auto", "fp32", "bf16", "fp16"))
    _check_positive("run.log_every", run.log_every)
    _check_positive("run.checkpoint_every", run.checkpoint_every, allow_zero=True)
    if run.threads is not None:
        _check_positive("run.threads", run.threads)
    if run.stop_after_steps is not None:
        _check_positive("run.stop_after_steps", run.stop_after_steps)
