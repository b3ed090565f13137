"""Converting the authors' published DSRAN checkpoints into dsran run folders.

The authors' training script saves ``{"epoch", "model", "best_rsum", "opt", "Eiters"}``
with ``torch.save``: ``model`` is the state dict of ``nn.DataParallel(DSRAN(opt))`` (every
name starts with ``module.``) and ``opt`` the ``argparse.Namespace`` of the run. The
converter reads ``opt`` into a :class:`TrainConfig` of the official variant, renames every
parameter to dsran's names and writes a run folder that :func:`load_run` reads.

Name changes, from the authors' modules (``model_bert.py``, ``GAT.py``) to dsran's:

- ``img_enc.fc.0`` (Linear after the ResNet) -> ``image_encoder.grid_encoder.fc``;
  ``img_enc.cnn.*`` (their ResNet152) is not part of dsran's model, because the store
  contains its outputs. It is compared with the store's grid weights instead.
- ``rcnn_enc.fc_image.{0,2}`` -> ``image_encoder.region_encoder.feature_mlp.{0,2}``,
  ``rcnn_enc.fc_pos.0`` -> ``image_encoder.region_encoder.box_fc.0``; ``rcnn_enc.fc`` is
  never used in the authors' forward pass and is left out.
- ``gat_1``, ``gat_2`` (SSR on grid and regions) -> ``image_encoder.grid_ssr`` and
  ``region_ssr``; ``gat_cat``, ``gat_cat_1..3`` -> ``image_encoder.jsr_branches.0..3``;
  ``gat_cap`` -> ``text_encoder.gat``. In each layer ``mha.query/key/value`` are stacked
  into ``qkv``, and ``fc_in, bn_in, fc_int, fc_out, bn_out`` become ``attention_out,
  attention_norm, ffn_in, ffn_out, ffn_norm``.
- Fusion modules: ``gate0, gate1, fusion0, fusion1`` -> ``project_a, project_b, gate_a,
  gate_b``. K = 2: ``fusion`` -> ``fusion.pairs.0``. K = 4: ``fusion_1`` (branches 1, 2)
  -> ``pairs.0``, ``fusion_2`` (branches 3, 4) -> ``pairs.1``, ``fusion`` -> ``root``.
- ``txt_enc.bert.*`` (pytorch_pretrained_bert) -> ``text_encoder.backbone.*``
  (transformers), with LayerNorm ``gamma``/``beta`` -> ``weight``/``bias``;
  ``txt_enc.fc.0`` -> ``text_encoder.project.0``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import logging
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from dsran.train import run as run_files
from dsran.train.config import ConfigError, TrainConfig, build_config, save_config
from dsran.train.model import DSRAN
from dsran.train.text import save_text_model_files
from torch import Tensor, nn

from dsran import __version__

logger = logging.getLogger(__name__)

PICKLE_RISK = (
    "an official DSRAN checkpoint is a Python pickle (it stores an argparse.Namespace next "
    "to the weights), and unpickling runs whatever code the file names. Load only files "
    "from a source you trust"
)

DATA_PARALLEL_PREFIX = "module."
CNN_PREFIX = "img_enc.cnn."
# File name of the ImageNet ResNet152 that the authors' resnet.py loads (torchvision's
# IMAGENET1K_V1 checkpoint).
OFFICIAL_RESNET_FILE = "resnet152-b121ed2d.pth"
# Captions are cut at this many tokens in the authors' data loader.
OFFICIAL_MAX_LENGTH = 32
# Parameters that the authors' model contains but never uses in its forward pass.
UNUSED_PARAMETERS = {
    "rcnn_enc.fc.weight": "Linear(2D, D) of RcnnEncoder, never called in its forward",
    "rcnn_enc.fc.bias": "Linear(2D, D) of RcnnEncoder, never called in its forward",
    # The authors' TextEncoder reads BERT's last hidden layer only; dsran's text model
    # drops the pooler, because DistributedDataParallel rejects parameters without grads.
    "txt_enc.bert.pooler.dense.weight": "BERT pooler, its output is never used",
    "txt_enc.bert.pooler.dense.bias": "BERT pooler, its output is never used",
}

GAT_LAYER_NAMES = {
    "fc_in": "attention_out",
    "bn_in": "attention_norm",
    "fc_int": "ffn_in",
    "fc_out": "ffn_out",
    "bn_out": "ffn_norm",
}
QKV_PARTS = {"query": 0, "key": 1, "value": 2}
FUSION_PARAMETER_NAMES = {
    "gate0": "project_a",
    "gate1": "project_b",
    "fusion0": "gate_a",
    "fusion1": "gate_b",
}
FUSION_MODULES = {
    2: {"fusion": "image_encoder.fusion.pairs.0"},
    4: {
        "fusion_1": "image_encoder.fusion.pairs.0",
        "fusion_2": "image_encoder.fusion.pairs.1",
        "fusion": "image_encoder.fusion.root",
    },
}

_GAT_PATTERN = re.compile(r"^(gat_1|gat_2|gat_cap|gat_cat(?:_(\d+))?)\.encoder\.(\d+)\.(.+)$")
_FUSION_PATTERN = re.compile(r"^(fusion(?:_\d+)?)\.(gate0|gate1|fusion0|fusion1)\.(weight|bias)$")
_DIRECT_NAMES = {
    "img_enc.fc.0.": "image_encoder.grid_encoder.fc.",
    "rcnn_enc.fc_image.0.": "image_encoder.region_encoder.feature_mlp.0.",
    "rcnn_enc.fc_image.2.": "image_encoder.region_encoder.feature_mlp.2.",
    "rcnn_enc.fc_pos.0.": "image_encoder.region_encoder.box_fc.0.",
    "txt_enc.fc.0.": "text_encoder.project.0.",
}


class ConversionError(RuntimeError):
    """An official checkpoint cannot be converted: untrusted, unreadable or not matching."""


@dataclass
class OfficialCheckpoint:
    """The contents of an official ``model_best.pth.tar``."""

    path: Path
    state: dict[str, Tensor]  # names without the DataParallel ``module.`` prefix
    opt: dict[str, Any]  # the argparse options of the authors' run
    epoch: int | None  # epochs trained when the file was saved (1-based)
    best_rsum: float | None  # validation Rsum the authors' script recorded
    iterations: int | None  # optimiser steps (``Eiters``)


@dataclass
class MappedState:
    """Checkpoint tensors under dsran's names, and what did not map."""

    state: dict[str, Tensor] = field(default_factory=dict)
    cnn: dict[str, Tensor] = field(default_factory=dict)  # torchvision ResNet152 names
    ignored: list[str] = field(default_factory=list)  # known-unused checkpoint names
    unknown: list[str] = field(default_factory=list)  # checkpoint names with no rule
    incomplete: list[str] = field(default_factory=list)  # qkv targets lacking a part


@dataclass
class ConversionResult:
    """Run folder, config, metadata and warnings of one :func:`convert_official` call."""

    out: Path
    config: TrainConfig
    metadata: dict[str, Any]
    warnings: list[str]


# ---------------------------------------------------------------------- reading


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_official_checkpoint(path: str | Path, trust_pickle: bool) -> OfficialCheckpoint:
    """Unpickle an official checkpoint, or raise ConversionError unless ``trust_pickle``."""
    path = Path(path)
    if not trust_pickle:
        raise ConversionError(
            f"not loading {path}: {PICKLE_RISK}. If you trust it, pass --trust-pickle."
        )
    if not path.is_file():
        raise ConversionError(f"checkpoint file not found: {path}")
    logger.warning("unpickling %s as requested (--trust-pickle): %s", path, PICKLE_RISK)
    try:
        content = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises pickle, zip and unpickling errors here
        raise ConversionError(f"failed to read checkpoint {path}: {error}") from error
    if not isinstance(content, Mapping) or "model" not in content:
        keys = sorted(content) if isinstance(content, Mapping) else type(content).__name__
        raise ConversionError(
            f"{path} is not an official DSRAN checkpoint: expected a dict with 'model' and "
            f"'opt', got {keys}"
        )
    state = content["model"]
    if not isinstance(state, Mapping):
        raise ConversionError(f"{path}: 'model' is a {type(state).__name__}, not a state dict")
    prefixed = all(name.startswith(DATA_PARALLEL_PREFIX) for name in state)
    if not prefixed:
        logger.info("%s: parameter names have no %r prefix", path, DATA_PARALLEL_PREFIX)
    start = len(DATA_PARALLEL_PREFIX) if prefixed else 0
    opt = content.get("opt")
    if isinstance(opt, argparse.Namespace):
        opt = vars(opt)
    if not isinstance(opt, Mapping):
        raise ConversionError(
            f"{path}: 'opt' is a {type(opt).__name__}, not the argparse options of the run"
        )
    best_rsum = content.get("best_rsum")
    return OfficialCheckpoint(
        path=path,
        state={name[start:]: tensor for name, tensor in state.items()},
        opt=dict(opt),
        epoch=_optional_int(content.get("epoch")),
        best_rsum=None if best_rsum is None else float(best_rsum),
        iterations=_optional_int(content.get("Eiters")),
    )


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


# ---------------------------------------------------------------------- names


def _bert_name(name: str) -> str:
    """Rename a pytorch_pretrained_bert BertModel parameter to transformers' name."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] == "LayerNorm":
        parts[-1] = {"gamma": "weight", "beta": "bias"}.get(parts[-1], parts[-1])
    return ".".join(parts)


def _gat_module(group: str, branch: str | None, layer: int, branches: int) -> str | None:
    """dsran module of layer ``layer`` of the authors' GAT ``group``; None when it has none."""
    if group == "gat_1":
        return f"image_encoder.grid_ssr.layers.{layer}"
    if group == "gat_2":
        return f"image_encoder.region_ssr.layers.{layer}"
    if layer != 0:
        return None  # dsran's text and JSR graph attention are one layer each
    if group == "gat_cap":
        return "text_encoder.gat"
    index = 0 if branch is None else int(branch)
    return f"image_encoder.jsr_branches.{index}" if index < branches else None


def _gat_parameter(rest: str) -> tuple[str, int | None] | None:
    attention = re.fullmatch(r"mha\.(query|key|value)\.(weight|bias)", rest)
    if attention:
        return f"qkv.{attention.group(2)}", QKV_PARTS[attention.group(1)]
    module, _, parameter = rest.partition(".")
    if module in GAT_LAYER_NAMES and parameter:
        return f"{GAT_LAYER_NAMES[module]}.{parameter}", None
    return None


def translate_name(name: str, branches: int) -> tuple[str, int | None] | None:
    """Map one official name (without ``module.``) to ``(dsran name, qkv part or None)``.

    Returns None for a name with no dsran counterpart. ResNet and known-unused names
    are sorted out before this is called.
    """
    if name.startswith("txt_enc.bert."):
        return "text_encoder.backbone." + _bert_name(name[len("txt_enc.bert.") :]), None
    for official, dsran in _DIRECT_NAMES.items():
        if name.startswith(official) and name[len(official) :] in ("weight", "bias"):
            return dsran + name[len(official) :], None
    gat = _GAT_PATTERN.match(name)
    if gat:
        module = _gat_module(gat.group(1), gat.group(2), int(gat.group(3)), branches)
        parameter = _gat_parameter(gat.group(4))
        if module is None or parameter is None:
            return None
        return f"{module}.{parameter[0]}", parameter[1]
    fusion = _FUSION_PATTERN.match(name)
    if fusion:
        module = FUSION_MODULES.get(branches, {}).get(fusion.group(1))
        if module is None:
            return None
        return f"{module}.{FUSION_PARAMETER_NAMES[fusion.group(2)]}.{fusion.group(3)}", None
    return None


def map_official_state(state: Mapping[str, Tensor], branches: int) -> MappedState:
    """Rename every checkpoint tensor to dsran's names; query, key and value are stacked."""
    mapped = MappedState()
    qkv_parts: dict[str, dict[int, Tensor]] = {}
    for name, tensor in state.items():
        if name.startswith(CNN_PREFIX):
            mapped.cnn[name[len(CNN_PREFIX) :]] = tensor
            continue
        if name in UNUSED_PARAMETERS:
            mapped.ignored.append(name)
            continue
        target = translate_name(name, branches)
        if target is None:
            mapped.unknown.append(name)
        elif target[1] is None:
            mapped.state[target[0]] = tensor
        else:
            qkv_parts.setdefault(target[0], {})[target[1]] = tensor
    for target, parts in sorted(qkv_parts.items()):
        if sorted(parts) != [0, 1, 2]:
            absent = [key for key, part in QKV_PARTS.items() if part not in parts]
            mapped.incomplete.append(f"{target} (no mha.{'/'.join(absent)})")
            continue
        mapped.state[target] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    return mapped


def count_layers(state: Mapping[str, Tensor], group: str) -> int:
    """Number of layers of the authors' GAT ``group`` (e.g. ``gat_1``) in ``state``."""
    pattern = re.compile(rf"^{re.escape(group)}\.encoder\.(\d+)\.")
    indices = [int(match.group(1)) for name in state if (match := pattern.match(name))]
    return max(indices) + 1 if indices else 0


def count_branches(state: Mapping[str, Tensor]) -> int:
    """Number of JSR branches (``gat_cat``, ``gat_cat_1``, ...) in ``state``."""
    pattern = re.compile(r"^gat_cat(?:_(\d+))?\.")
    found = {int(match.group(1) or 0) for name in state if (match := pattern.match(name))}
    return len(found)


# ---------------------------------------------------------------------- configuration


def official_config(
    opt: Mapping[str, Any], state: Mapping[str, Tensor], text_model: str
) -> tuple[TrainConfig, list[str]]:
    """Build the TrainConfig of the official variant from the authors' ``opt``.

    Returns the config and notes on values that ``opt`` lacked. SSR depth comes from the
    checkpoint (the authors' code builds one layer).
    """
    notes: list[str] = []

    def option(name: str, default: Any) -> Any:
        if name in opt and opt[name] is not None:
            return opt[name]
        notes.append(f"opt has no {name}; using {default!r}")
        return default

    branches = option("K", count_branches(state))
    if option("img_dim", 2048) != 2048:
        raise ConversionError(
            f"checkpoint opt.img_dim is {opt['img_dim']}; dsran stores 2048-d CNN features"
        )
    warmup = float(option("warmup", -1))
    data_name = str(option("data_name", "f30k"))
    values = {
        "model": {
            "embed_size": int(option("embed_size", 1024)),
            "gat_heads": 8,
            "gat_dropout": 0.2,
            "ssr_layers": count_layers(state, "gat_1"),
            "jsr_branches": int(branches),
            "use_grid": True,
            "use_regions": True,
            "grid_encoder": "official",
            "region_encoder": "official",
            "text_model": str(text_model),
            "finetune_text": bool(option("ft_bert", False)),
            "text_dropout": 0.1,
            "text_pooling": "official",
            "official_masking": True,
            # The authors divide by the bare norm. The default norm_eps of 1e-8 moves an
            # embedding by about 1e-8 / norm, far below the 1e-5 the tests check, and keeps
            # an all-zero row finite, so it stays.
        },
        "data": {
            "train_splits": ["train", "restval"] if "coco" in data_name else ["train"],
            "val_split": "val",
            "batch_size": int(option("batch_size", 128)),
            "max_length": OFFICIAL_MAX_LENGTH,
        },
        "optim": {
            "epochs": int(option("num_epochs", 12)),
            "lr": float(option("learning_rate", 2e-5)),
            "lr_update": int(option("lr_update", 6)),
            # warmup -1 turns BertAdam's schedule off: a constant learning rate.
            "warmup_fraction": 0.0 if warmup < 0 else warmup,
        },
        "loss": {"margin": float(option("margin", 0.2))},
    }
    try:
        return build_config(values), notes
    except ConfigError as error:
        raise ConversionError(
            f"checkpoint options do not give a valid dsran config: {error}"
        ) from error


def json_options(opt: Mapping[str, Any]) -> dict[str, Any]:
    """``opt`` with values JSON cannot hold written as their repr."""
    plain = (str, int, float, bool, type(None))
    return {
        name: value
        if isinstance(value, plain)
        or (isinstance(value, list) and all(isinstance(v, plain) for v in value))
        else repr(value)
        for name, value in sorted(opt.items())
    }


# ---------------------------------------------------------------------- text model


def _text_files(folder: Path):
    """BertConfig and tokenizer of a BERT folder: config.json or Google's bert_config.json,
    tokenizer files or vocab.txt."""
    from transformers import AutoConfig, AutoTokenizer, BertConfig, BertTokenizerFast

    if not folder.is_dir():
        raise ConversionError(
            f"text model folder not found: {folder}. Pass --text-model with the BERT folder "
            "(config.json or bert_config.json, and vocab.txt) of the checkpoint's bert_path."
        )
    if (folder / "config.json").is_file():
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    elif (folder / "bert_config.json").is_file():
        config = BertConfig.from_json_file(str(folder / "bert_config.json"))
    else:
        raise ConversionError(
            f"text model folder {folder} has neither config.json nor bert_config.json"
        )
    if config.model_type != "bert":
        raise ConversionError(
            f"text model {folder} is a {config.model_type!r} model; the official checkpoints "
            "hold a BERT encoder, so pass a BERT folder"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError):
        if not (folder / "vocab.txt").is_file():
            raise ConversionError(
                f"text model folder {folder} has no tokenizer files and no vocab.txt"
            ) from None
        tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    return config, tokenizer


def build_official_model(config: TrainConfig, bert_config) -> DSRAN:
    from transformers import AutoModel

    torch.manual_seed(0)  # values are all overwritten; the seed only makes builds repeatable
    return DSRAN(config.model, AutoModel.from_config(bert_config))


def load_mapped_state(model: nn.Module, mapped: MappedState) -> list[str]:
    """Copy ``mapped`` into ``model``, or raise ConversionError listing every mismatch.

    Returns the names of BatchNorm step counters that the checkpoint lacks, because files
    of PyTorch before 0.4.1 have none. They keep their value 0 and matter only in training.
    """
    expected = model.state_dict()
    missing = [name for name in expected if name not in mapped.state]
    filled = [name for name in missing if name.endswith("num_batches_tracked")]
    missing = [name for name in missing if name not in filled]
    unexpected = [name for name in mapped.state if name not in expected]
    wrong_shape = [
        f"{name} {tuple(tensor.shape)} (model: {tuple(expected[name].shape)})"
        for name, tensor in mapped.state.items()
        if name in expected and tuple(tensor.shape) != tuple(expected[name].shape)
    ]
    problems = []
    if mapped.unknown:
        problems.append(_listing("checkpoint names with no dsran counterpart", mapped.unknown))
    if mapped.incomplete:
        problems.append(_listing("attention projections lacking a part", mapped.incomplete))
    if missing:
        problems.append(_listing("dsran parameters the checkpoint does not provide", missing))
    if unexpected:
        problems.append(_listing("mapped names the dsran model does not have", unexpected))
    if wrong_shape:
        problems.append(_listing("tensors whose shape differs", wrong_shape))
    if problems:
        raise ConversionError(
            "the checkpoint does not map onto the official dsran model: "
            + "; ".join(problems)
            + ". Check --text-model (BERT size and layers) and the checkpoint's opt.K and "
            "opt.embed_size; only BERT checkpoints of the authors' model_bert.py convert."
        )
    with torch.no_grad():
        for name, tensor in mapped.state.items():
            expected[name].copy_(tensor)
    return filled


def _listing(title: str, names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{len(names)} {title}: {shown}{more}"


# ---------------------------------------------------------------------- ResNet152


def compare_resnet(
    cnn: Mapping[str, Tensor], store_settings: Mapping[str, Any] | None, grid_weights: Path | None
) -> dict[str, Any]:
    """Compare the checkpoint's ResNet152 with the weights the store's grid features used.

    Returns ``{"status": "match" | "mismatch" | "not_compared", "message": str, ...}``.
    Tensors are compared when the store records a weights file that is found (in
    torchvision's cache or at ``grid_weights``) with the recorded sha256.
    """
    from dsran.extract.grid import read_state_dict, torchvision_cache_dir

    if not cnn:
        return _not_compared("the checkpoint contains no ResNet152 (no img_enc.cnn.* names)")
    if store_settings is None:
        return _not_compared("no --feats store was given")
    grid = store_settings.get("grid")
    if not grid:
        return _not_compared("the store has no grid features")
    if grid.get("random_weights"):
        return {
            "status": "mismatch",
            "message": "the store's grid features come from random ResNet152 weights, not the "
            "checkpoint's trained ResNet152, so scores cannot match the authors'",
        }
    name, recorded = grid.get("weights"), grid.get("weights_sha256")
    same_name = (
        f"; it has the file name the authors' code loads ({OFFICIAL_RESNET_FILE})"
        if name == OFFICIAL_RESNET_FILE
        else ""
    )
    candidates = [grid_weights] if grid_weights is not None else []
    if name:
        candidates.append(torchvision_cache_dir() / name)
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        return _not_compared(
            f"the store's grid weights file {name} (sha256 {recorded}) was not found in "
            f"{torchvision_cache_dir()}; pass --grid-weights FILE to compare{same_name}",
            weights=name,
            weights_sha256=recorded,
        )
    actual = sha256_of(found)
    if recorded and actual != recorded:
        return _not_compared(
            f"{found} has sha256 {actual}, but the store's grid features were extracted with "
            f"{name} of sha256 {recorded}",
            weights=name,
            weights_sha256=recorded,
        )
    return _compare_tensors(cnn, read_state_dict(found), found)


def _not_compared(reason: str, **details: Any) -> dict[str, Any]:
    return {
        "status": "not_compared",
        "message": f"the checkpoint's ResNet152 was not compared with the store's grid "
        f"weights: {reason}",
        **details,
    }


def _compare_tensors(
    cnn: Mapping[str, Tensor], reference: Mapping[str, Tensor], path: Path
) -> dict[str, Any]:
    missing = sorted(set(reference) - set(cnn))
    extra = sorted(set(cnn) - set(reference))
    differing_parameters, differing_statistics = [], []
    max_difference = 0.0
    for name, tensor in reference.items():
        # A step counter counts BatchNorm updates and does not change what the network computes.
        if name not in cnn or name.endswith("num_batches_tracked"):
            continue
        other = cnn[name]
        if tuple(other.shape) == tuple(tensor.shape) and torch.equal(other.float(), tensor.float()):
            continue
        if tuple(other.shape) == tuple(tensor.shape):
            difference = float((other.float() - tensor.float()).abs().max())
            max_difference = max(max_difference, difference)
        statistic = name.endswith(("running_mean", "running_var"))
        (differing_statistics if statistic else differing_parameters).append(name)
    details = {
        "weights": str(path),
        "missing": missing,
        "extra": extra,
        "differing_parameters": differing_parameters,
        "differing_batchnorm_statistics": differing_statistics,
        "max_abs_difference": max_difference,
    }
    if not (missing or extra or differing_parameters or differing_statistics):
        return {
            "status": "match",
            "message": f"the checkpoint's ResNet152 equals the store's grid weights {path}",
            **details,
        }
    message = (
        f"the checkpoint's ResNet152 differs from the store's grid weights {path}: "
        f"{len(differing_parameters)} parameters and {len(differing_statistics)} BatchNorm "
        f"running statistics differ (max abs difference {max_difference:.3g}), "
        f"{len(missing)} missing, {len(extra)} extra"
    )
    if differing_statistics and not (differing_parameters or missing or extra):
        message += (
            ". Only BatchNorm statistics differ: the authors' training keeps the ResNet in "
            "train mode, so its statistics change even when its weights are frozen. For the "
            "authors' grid features, extract with the checkpoint's ResNet152 "
            "(`dsran convert-official --export-resnet FILE`, then `dsran extract "
            "--grid-weights FILE`)"
        )
    return {"status": "mismatch", "message": message, **details}


def export_resnet(cnn: Mapping[str, Tensor], path: Path) -> None:
    """Save the checkpoint's ResNet152 as a torchvision state dict for ``--grid-weights``."""
    from dsran.extract.grid import read_state_dict

    if not cnn:
        raise ConversionError("the checkpoint contains no ResNet152 (no img_enc.cnn.* names)")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({name: tensor.contiguous() for name, tensor in cnn.items()}, path)
    read_state_dict(path)  # raises when the names or shapes are not torchvision's
    logger.info("wrote the checkpoint's ResNet152 to %s", path)


# ---------------------------------------------------------------------- conversion


def convert_official(
    checkpoint: str | Path,
    out: str | Path,
    text_model: str | Path,
    feats: str | Path | None = None,
    trust_pickle: bool = False,
    grid_weights: str | Path | None = None,
    export_resnet_path: str | Path | None = None,
) -> ConversionResult:
    """Convert an official checkpoint into the run folder ``out`` (see :mod:`dsran.train.run`)."""
    from dsran.extract.store import FeatureStore

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConversionError(
            f"run folder {out} already exists and is not empty; choose another --out"
        )
    store = FeatureStore.open(feats) if feats is not None else None
    official = read_official_checkpoint(checkpoint, trust_pickle)

    # 1. Configuration and model of the official variant.
    bert_config, tokenizer = _text_files(Path(text_model))
    config, notes = official_config(official.opt, official.state, str(text_model))
    for note in notes:
        logger.info("%s: %s", official.path, note)
    if "bert_size" in official.opt and int(official.opt["bert_size"]) != bert_config.hidden_size:
        raise ConversionError(
            f"checkpoint opt.bert_size is {official.opt['bert_size']}, but the text model "
            f"{text_model} has hidden size {bert_config.hidden_size}; pass the checkpoint's BERT"
        )
    model = build_official_model(config, bert_config)

    # 2. Every tensor renamed and copied; anything left over is an error.
    mapped = map_official_state(official.state, config.model.jsr_branches)
    filled = load_mapped_state(model, mapped)
    for name in mapped.ignored:
        logger.info("left out %s: %s", name, UNUSED_PARAMETERS[name])
    if filled:
        logger.info("%d BatchNorm step counters absent from the checkpoint are 0", len(filled))
    logger.info(
        "mapped %d checkpoint tensors onto %d dsran tensors",
        len(official.state) - len(mapped.cnn) - len(mapped.ignored),
        len(mapped.state),
    )

    # 3. The ResNet152 inside the checkpoint against the store's grid weights.
    comparison = compare_resnet(
        mapped.cnn,
        store.settings if store is not None else None,
        Path(grid_weights) if grid_weights is not None else None,
    )
    warnings = []
    if comparison["status"] == "match":
        logger.info("%s", comparison["message"])
    else:
        logger.warning("%s", comparison["message"])
    if comparison["status"] == "mismatch":
        warnings.append(comparison["message"])
    if export_resnet_path is not None:
        export_resnet(mapped.cnn, Path(export_resnet_path))

    # 4. The run folder.
    metadata = {
        "feats": str(store.path.resolve()) if store is not None else None,
        "random_cnn_weights": bool(store.random_weights) if store is not None else False,
        "warnings": warnings,
        "best_epoch": official.epoch if official.epoch is not None else -1,
        "val_rsum": official.best_rsum,
        "finished": True,
        "text_model": str(text_model),
        "store_settings": store.settings if store is not None else None,
        "converted_from": {
            "path": str(official.path.resolve()),
            "sha256": sha256_of(official.path),
            "epoch": official.epoch,
            "best_rsum": official.best_rsum,
            "iterations": official.iterations,
            "opt": json_options(official.opt),
            "opt_notes": notes,
            "ignored_parameters": mapped.ignored,
            "zero_batchnorm_counters": len(filled),
        },
        "resnet_comparison": comparison,
        "dsran_version": __version__,
        "torch_version": torch.__version__,
        "updated_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    _write_run(out, config, model, tokenizer, metadata, official)
    return ConversionResult(out=out, config=config, metadata=metadata, warnings=warnings)


def _write_run(
    out: Path,
    config: TrainConfig,
    model: DSRAN,
    tokenizer,
    metadata: dict[str, Any],
    official: OfficialCheckpoint,
) -> None:
    checkpoints = out / run_files.CHECKPOINT_DIR
    try:
        checkpoints.mkdir(parents=True, exist_ok=True)
        save_config(config, out / run_files.CONFIG_FILE)
        save_text_model_files(
            model.text_encoder.backbone, tokenizer, out / run_files.TEXT_MODEL_DIR
        )
        run_files.write_json(out / run_files.METADATA_FILE, metadata)
        run_files.save_weights(
            model,
            checkpoints / "best",
            {
                "epoch": official.epoch,
                "best_rsum": official.best_rsum,
                "converted_from": str(official.path.resolve()),
                "dsran_version": __version__,
            },
        )
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    logger.info("wrote run folder %s", out)
