"""Weights of the region detector: the published detectron2 checkpoint, or seeded random ones.

The published PyTorch conversion of the bottom-up-attention Caffe model
(MILVLG's ``bua-caffe-frcn-r101-k10-100.pth``, called
``bua-caffe-frcn-r101_with_attributes.pth`` in older releases) is a ``torch.save``'d dict
whose ``"model"`` entry maps detectron2 parameter names (``backbone.res2.0.conv1.weight``,
``proposal_generator.rpn_head.conv.weight``, ``roi_heads.box_predictor.cls_score.weight``,
...) to tensors. :func:`load_detector_weights` matches every name of
:class:`~dsran.extract.detector.VisualGenomeDetector` or raises :class:`DetectorWeightsError`.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dsran.extract.base import sha256_file
from dsran.extract.detector_backbone import ConvNorm
from dsran.extract.detector_heads import BoxPredictor
from dsran.extract.detector_rpn import RPNHead
from torch import nn

logger = logging.getLogger(__name__)

# Entries a detectron2 checkpoint may carry that this model computes itself: batch-norm
# step counters of trainable BN layers, persistent anchor buffers of 2020-era detectron2
# and the pixel normalisation buffers of GeneralizedRCNN.
_IGNORED_SUFFIXES = (".num_batches_tracked",)
_IGNORED_PREFIXES = ("proposal_generator.anchor_generator.", "pixel_mean", "pixel_std")
_RUNNING_STATS = (".norm.running_mean", ".norm.running_var")
_NAMES_SHOWN = 20


class DetectorWeightsError(RuntimeError):
    """A detector checkpoint is missing, unreadable or does not match the network."""


def _numpy_safe_globals() -> list:
    """List the numpy functions and classes that unpickling an ndarray needs under ``weights_only``.

    Pickles name ``numpy.core.multiarray._reconstruct`` (numpy 1) or
    ``numpy._core.multiarray._reconstruct`` (numpy 2); both are listed. These only build
    arrays from raw bytes, so the restricted unpickler stays closed to arbitrary code.
    """
    reconstruct = np._core.multiarray._reconstruct
    scalar = np._core.multiarray.scalar
    allowed: list = [
        reconstruct,
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        scalar,
        (scalar, "numpy.core.multiarray.scalar"),
        np.ndarray,
        np.dtype,
    ]
    allowed += [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return allowed


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a detectron2-style checkpoint into a name -> float32 tensor dict.

    Accepts ``{"model": state_dict, ...}`` (what detectron2 and MILVLG save) or a bare
    state dict. Values may be tensors or numpy arrays: detectron2 checkpoints converted
    from Caffe2 or Caffe often hold numpy arrays, which the restricted unpickler of
    ``torch.load(weights_only=True)`` rejects unless numpy's array constructors are
    allowed, so a second attempt allows exactly those. Nothing else in the file can run.
    """
    path = Path(path)
    if not path.is_file():
        raise DetectorWeightsError(
            f"region detector weights not found: {path}. Download MILVLG's "
            "bua-caffe-frcn-r101-k10-100.pth (bottom-up-attention.pytorch, model zoo) and pass "
            "its path, or use random weights for a test run."
        )
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "numpy" not in str(error):
            raise DetectorWeightsError(
                f"cannot read region detector weights {path}: {error}"
            ) from error
        logger.info(
            "%s contains numpy arrays; reading it again with numpy's array types allowed", path
        )
        try:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                content = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as second_error:
            raise DetectorWeightsError(
                f"cannot read region detector weights {path}: {second_error}"
            ) from second_error
    except (RuntimeError, EOFError, OSError) as error:
        raise DetectorWeightsError(
            f"cannot read region detector weights {path}: {error}. The file must be a "
            "torch.save'd detectron2 checkpoint (a dict with a 'model' state dict)."
        ) from error

    state = content.get("model", content) if isinstance(content, Mapping) else None
    if not isinstance(state, Mapping):
        raise DetectorWeightsError(
            f"region detector weights {path} hold a {type(content).__name__}, expected a dict "
            "with a 'model' state dict (detectron2 checkpoint format)"
        )
    tensors = {}
    for name, value in state.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise DetectorWeightsError(
                f"region detector weights {path}: entry {name!r} is a {type(value).__name__}, "
                "not a tensor or numpy array"
            )
        tensors[str(name)] = value
    return tensors


def _shown(names: list[str]) -> str:
    listed = ", ".join(names[:_NAMES_SHOWN])
    if len(names) > _NAMES_SHOWN:
        listed += f", ... ({len(names) - _NAMES_SHOWN} more)"
    return listed


def match_state_dict(
    model: nn.Module, checkpoint: Mapping[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """Pair every entry of ``model.state_dict()`` with a checkpoint tensor of the same shape.

    Raises DetectorWeightsError listing the missing, unexpected and mis-shaped names.
    One exception: a checkpoint with no batch-norm running statistics at all (the
    folded format of Caffe and Caffe2 conversions, where ``norm.weight`` and
    ``norm.bias`` already hold the scale and shift) keeps mean 0 and variance 1.
    """
    expected = model.state_dict()
    ignored = sorted(
        name
        for name in checkpoint
        if name not in expected
        and (name.endswith(_IGNORED_SUFFIXES) or name.startswith(_IGNORED_PREFIXES))
    )
    unexpected = sorted(name for name in checkpoint if name not in expected and name not in ignored)
    missing = sorted(name for name in expected if name not in checkpoint)
    stats = [name for name in expected if name.endswith(_RUNNING_STATS)]
    folded_norms = bool(stats) and all(name in missing for name in stats)
    if folded_norms:
        logger.info(
            "%s has no batch-norm running statistics; treating norm.weight/norm.bias as folded "
            "scale and shift (mean 0, variance 1)",
            source,
        )
        missing = [name for name in missing if not name.endswith(_RUNNING_STATS)]
    mis_shaped = sorted(
        f"{name} {tuple(checkpoint[name].shape)} (expected {tuple(value.shape)})"
        for name, value in expected.items()
        if name in checkpoint and tuple(checkpoint[name].shape) != tuple(value.shape)
    )
    if missing or unexpected or mis_shaped:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing: {_shown(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected: {_shown(unexpected)}")
        if mis_shaped:
            problems.append(f"{len(mis_shaped)} mis-shaped: {_shown(mis_shaped)}")
        raise DetectorWeightsError(
            f"region detector weights {source} do not match the bottom-up-attention "
            f"ResNet-101 detector with attributes: {'; '.join(problems)}. Use MILVLG's "
            "bua-caffe-frcn-r101-k10-100.pth (or the k36 / with_attributes variants of "
            "the same network)."
        )
    if ignored:
        logger.debug("ignored %d checkpoint entries: %s", len(ignored), _shown(ignored))
    matched = {name: checkpoint[name].to(torch.float32) for name in expected if name in checkpoint}
    if folded_norms:
        for name in stats:
            matched[name] = (
                torch.zeros_like(expected[name])
                if name.endswith("running_mean")
                else torch.ones_like(expected[name])
            )
    return matched


def load_detector_weights(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load a published detector checkpoint into ``model`` by name; return the settings to record.

    Every parameter and batch-norm statistic must be found with the right shape, or
    DetectorWeightsError lists the missing, unexpected and mis-shaped names.

    NOTE: tested with files built from the names and shapes of MILVLG's model code and
    config, not with the published file itself, which was not available here.
    """
    path = Path(path)
    checkpoint = read_checkpoint(path)
    matched = match_state_dict(model, checkpoint, str(path))
    model.load_state_dict(matched, strict=True)
    sha256 = sha256_file(path)
    logger.info("loaded region detector weights %s (sha256 %s)", path.name, sha256[:12])
    return {"weights": path.name, "weights_sha256": sha256}


def init_random_weights(model: nn.Module, seed: int, residual_scale: float = 0.2) -> None:
    """Initialise ``model`` from ``seed`` alone, independent of torch's global generator.

    Convolutions get He initialisation (fan out) with identity batch norms, except the
    last batch norm of each residual branch, which scales by ``residual_scale``. At 1.0
    activations double block after block and overflow float16 long before res5. At 0.2
    the pooled features of a COCO image stay below about 50. Predictors use the
    published initial standard deviations (0.01, bbox_pred 0.001) and zero biases.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, ConvNorm):
                nn.init.kaiming_normal_(
                    module.weight, mode="fan_out", nonlinearity="relu", generator=generator
                )
                module.norm.weight.fill_(residual_scale if name.endswith("conv3") else 1.0)
                module.norm.bias.zero_()
                module.norm.running_mean.zero_()
                module.norm.running_var.fill_(1.0)
            elif isinstance(module, RPNHead):
                for layer in (module.conv, module.objectness_logits, module.anchor_deltas):
                    nn.init.normal_(layer.weight, std=0.01, generator=generator)
                    nn.init.zeros_(layer.bias)
            elif isinstance(module, BoxPredictor):
                for layer, std in (
                    (module.cls_score, 0.01),
                    (module.bbox_pred, 0.001),
                    (module.attr_linear1, 0.01),
                    (module.attr_linear2, 0.01),
                ):
                    nn.init.normal_(layer.weight, std=std, generator=generator)
                    nn.init.zeros_(layer.bias)
                nn.init.normal_(module.cls_embed.weight, std=0.01, generator=generator)
