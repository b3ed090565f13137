"""The run folder: configuration, metadata, checkpoints, and loading a trained run.

Layout of a run folder::

    config.yaml                  resolved TrainConfig
    metadata.json                store path, random-weight flag, warnings, best epoch, ...
    text_model/                  text encoder architecture (config.json) and tokenizer
    checkpoints/best.safetensors model weights of the epoch with the best val Rsum
    checkpoints/best.json        epoch, step and validation metrics of those weights
    checkpoints/last.safetensors model weights at the latest checkpoint
    checkpoints/last.json        epoch, step, position in the epoch
    checkpoints/last-state.pt    optimiser, schedule, grad scaler and RNG states
    train_log.csv                step, epoch, loss, lr, samples/s of every step
    val_metrics.csv              validation recalls of every epoch
    tensorboard/                 the same scalars as TensorBoard event files
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from dsran.train.config import TrainConfig, load_config
from dsran.train.model import DSRAN
from dsran.train.text import build_backbone_from_config, load_tokenizer
from safetensors.torch import load_file, save_file
from torch import nn

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METADATA_FILE = "metadata.json"
TEXT_MODEL_DIR = "text_model"
CHECKPOINT_DIR = "checkpoints"
TRAIN_LOG = "train_log.csv"
VAL_LOG = "val_metrics.csv"


class RunError(RuntimeError):
    """A run folder is missing, incomplete or inconsistent."""


@dataclass
class TrainedRun:
    """A trained model loaded from a run folder, ready to encode."""

    path: Path
    model: DSRAN  # eval mode, on the requested device
    config: TrainConfig
    tokenizer: Any  # a transformers tokenizer
    metadata: dict[str, Any]


def write_json(path: Path, values: dict[str, Any]) -> None:
    """Write JSON through a temporary file, so that a crash never leaves half a file."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as error:
        raise RunError(f"run file not found: {path}") from error
    except json.JSONDecodeError as error:
        raise RunError(f"run file {path} is not valid JSON: {error}") from error


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper."""
    return model.module if hasattr(model, "module") else model


def save_weights(model: nn.Module, path: Path, metadata: dict[str, Any]) -> None:
    """Write the model's state dict as safetensors and ``metadata`` beside it as JSON."""
    state = {
        name: tensor.detach().contiguous().cpu()
        for name, tensor in unwrap(model).state_dict().items()
    }
    temporary = path.with_suffix(".safetensors.tmp")
    save_file(state, str(temporary))
    os.replace(temporary, path.with_suffix(".safetensors"))
    write_json(path.with_suffix(".json"), metadata)


def load_weights(model: nn.Module, path: Path) -> dict[str, Any]:
    """Load safetensors weights into ``model``; returns the checkpoint's JSON metadata."""
    weights = path.with_suffix(".safetensors")
    if not weights.is_file():
        raise RunError(f"checkpoint not found: {weights}")
    state = load_file(str(weights))
    missing, unexpected = unwrap(model).load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RunError(
            f"checkpoint {weights} does not fit the model of its config.yaml: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    return read_json(path.with_suffix(".json"))


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    temporary = path.with_suffix(".pt.tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def load_training_state(path: Path) -> dict[str, Any]:
    """Read optimiser, schedule and RNG states; only tensors and plain containers load."""
    if not path.is_file():
        raise RunError(f"training state not found: {path}; the run cannot be resumed")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_run(
    path: str | Path, device: str | torch.device = "cpu", checkpoint: str = "best"
) -> TrainedRun:
    """Load the ``best`` (or ``last``) checkpoint of a run folder in eval mode on ``device``."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise RunError(
            f"run folder {path} has no {CONFIG_FILE}; pass the --out folder of `dsran train`"
        )
    if checkpoint not in ("best", "last"):
        raise ValueError(f"invalid checkpoint {checkpoint!r}; valid values: 'best', 'last'")
    config = load_config(path / CONFIG_FILE)
    text_folder = path / TEXT_MODEL_DIR
    if not (text_folder / "config.json").is_file():
        raise RunError(
            f"run folder {path} has no {TEXT_MODEL_DIR}/config.json (text model architecture)"
        )
    weights = path / CHECKPOINT_DIR / f"{checkpoint}.safetensors"
    if not weights.is_file():
        raise RunError(
            f"run folder {path} has no {CHECKPOINT_DIR}/{checkpoint}.safetensors; training has not "
            "finished an epoch yet. Resume it with `dsran train --out RUN --resume`."
        )

    model = DSRAN(config.model, build_backbone_from_config(text_folder))
    checkpoint_metadata = load_weights(model, weights)
    model.to(torch.device(device)).eval()
    metadata = read_json(path / METADATA_FILE)
    metadata["checkpoint"] = checkpoint_metadata
    tokenizer = load_tokenizer(str(text_folder))
    logger.info(
        "loaded run %s (%s checkpoint, epoch %s)",
        path,
        checkpoint,
        checkpoint_metadata.get("epoch"),
    )
    return TrainedRun(path=path, model=model, config=config, tokenizer=tokenizer, metadata=metadata)
