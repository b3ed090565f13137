"""Grid features: torchvision ResNet152 up to layer4, one 2048-d vector per 7x7 cell.

Weights come from ``--grid-weights PATH`` (a torchvision ResNet152 state dict) or from
torchvision's download cache, ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/
checkpoints``), under the file names of ``ResNet152_Weights``. Nothing is downloaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dsran.extract.base import (
    ExtractorError,
    ExtractorOptions,
    autocast,
    resolve_device,
    resolve_precision,
    sha256_file,
    weights_settings,
)
from dsran.extract.store import FEATURE_DIM, GRID_CELLS
from PIL import Image
from torch import nn
from torchvision import transforms
from torchvision.models import ResNet152_Weights, resnet152
from torchvision.models.resnet import Bottleneck

logger = logging.getLogger(__name__)

RESIZE = 256  # shorter image side after resizing, in pixels
CROP = 224  # side of the center crop fed to the network; layer4 then has 7x7 cells
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Cached weight files in order of preference. IMAGENET1K_V1 is the checkpoint that
# torchvision's `pretrained=True` loaded before version 0.13, which is what published
# image-text matching code used; IMAGENET1K_V2 is accepted as well.
CACHED_WEIGHTS = (ResNet152_Weights.IMAGENET1K_V1, ResNet152_Weights.IMAGENET1K_V2)

# Scale of the last BatchNorm of every bottleneck under random weights. With torchvision's
# default init (scale 1) layer4 activations reach about 1e8 and overflow float16; at 0.2
# their mean magnitude on noise input is about 0.2, near that of trained weights.
RANDOM_RESIDUAL_SCALE = 0.2


def weights_file_name(weights: ResNet152_Weights) -> str:
    """Return the file name under which torchvision caches a ResNet152 checkpoint."""
    return weights.url.rsplit("/", 1)[-1]


def torchvision_cache_dir() -> Path:
    """torchvision's checkpoint cache: ``torch.hub.get_dir()/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_grid_weights(path: str | None) -> Path | None:
    """Return the weights file to load: ``path`` when given, else a cached torchvision file."""
    if path is not None:
        weights = Path(path)
        if not weights.is_file():
            raise ExtractorError(
                f"grid weights file not found: {weights}. Pass --grid-weights a torchvision "
                "ResNet152 state dict file that exists."
            )
        return weights
    for candidate in CACHED_WEIGHTS:
        cached = torchvision_cache_dir() / weights_file_name(candidate)
        if cached.is_file():
            return cached
    return None


def missing_weights_message() -> str:
    preferred = CACHED_WEIGHTS[0]
    return (
        f"no ResNet152 weights found: {torchvision_cache_dir() / weights_file_name(preferred)} "
        f"does not exist. Put {weights_file_name(preferred)} (torchvision "
        f"ResNet152_Weights.IMAGENET1K_V1, from {preferred.url}) in {torchvision_cache_dir()} "
        "(set TORCH_HOME to use another cache), or pass --grid-weights PATH, or pass "
        "--random-weights for a test run with random CNN weights."
    )


def build_resnet152_body(weights: Path | None, seed: int) -> nn.Sequential:
    """Build ResNet152 without its pooling and classifier: (B, 3, H, W) -> (B, 2048, H/32, W/32)."""
    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network = resnet152()
        for module in network.modules():
            if isinstance(module, Bottleneck):
                nn.init.constant_(module.bn3.weight, RANDOM_RESIDUAL_SCALE)
    else:
        network = resnet152()
        network.load_state_dict(read_state_dict(weights))
    return nn.Sequential(
        network.conv1,
        network.bn1,
        network.relu,
        network.maxpool,
        network.layer1,
        network.layer2,
        network.layer3,
        network.layer4,
    )


def read_state_dict(weights: Path) -> dict[str, torch.Tensor]:
    """Read a ResNet152 state dict file and check its names and shapes against torchvision's."""
    try:
        # mmap reads only what is used, so checking a file before the run costs little.
        state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        state = None  # files in the legacy (non-zip) format cannot be memory-mapped
    except Exception as error:  # torch raises pickle, zip and unpickling errors here
        raise _unreadable(weights, error) from error
    if state is None:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as error:
            raise _unreadable(weights, error) from error
    if not isinstance(state, dict):
        raise ExtractorError(
            f"grid weights {weights} hold a {type(state).__name__}, not a state dict; "
            "save them with torch.save(model.state_dict(), PATH)"
        )
    with torch.device("meta"):
        expected = resnet152().state_dict()
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    wrong_shape = [
        f"{name} {tuple(state[name].shape)} (expected {tuple(expected[name].shape)})"
        for name in expected
        if name in state and tuple(state[name].shape) != tuple(expected[name].shape)
    ]
    if missing or unexpected or wrong_shape:
        raise ExtractorError(
            f"grid weights {weights} do not match torchvision's ResNet152: "
            f"{len(missing)} missing parameters (first: {missing[:3]}), "
            f"{len(unexpected)} unexpected (first: {unexpected[:3]}), "
            f"{len(wrong_shape)} with another shape (first: {wrong_shape[:3]})"
        )
    return state


def _unreadable(weights: Path, error: Exception) -> ExtractorError:
    return ExtractorError(
        f"cannot read grid weights {weights}: {error}. Pass a torchvision ResNet152 "
        "state dict saved with torch.save(model.state_dict(), PATH)."
    )


class GridExtractor:
    """ResNet152 layer4 features on a 7x7 grid: ``grid/features`` (B, 49, 2048).

    The network is built on the first :meth:`extract` call, so the driver of a
    distributed run and DataLoader workers never hold it.
    """

    kind = "grid"

    def __init__(
        self,
        weights: Path | None,
        device: torch.device,
        precision: str,
        seed: int = 0,
    ):
        self.weights = weights
        self.device = device
        self.precision = precision
        self.seed = seed
        self.weights_sha256 = None
        if weights is not None:
            read_state_dict(weights)  # fail before any image is processed
            self.weights_sha256 = sha256_file(weights)
        self.transform = transforms.Compose(
            [
                transforms.Resize(RESIZE, interpolation=transforms.InterpolationMode.BILINEAR),
                transforms.CenterCrop(CROP),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        self._network: nn.Module | None = None

    @classmethod
    def from_options(cls, options: ExtractorOptions) -> GridExtractor:
        device = resolve_device(options.device)
        precision = resolve_precision(options.precision, device)
        if options.random_weights:
            if options.grid_weights is not None:
                raise ExtractorError(
                    f"--random-weights and --grid-weights {options.grid_weights} exclude each "
                    "other; pass one of them"
                )
            weights = None
        else:
            weights = find_grid_weights(options.grid_weights)
            if weights is None and not options.random_if_missing:
                raise ExtractorError(missing_weights_message())
            if weights is None:
                logger.warning("%s Using random weights instead.", missing_weights_message())
        return cls(weights, device, precision, seed=options.seed)

    def settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "network": "torchvision resnet152",
            "output": "layer4",
            "cells": GRID_CELLS,
            "dim": FEATURE_DIM,
            "precision": self.precision,
            "memory_format": "channels_last",
            "transform": {
                "resize": RESIZE,
                "interpolation": "bilinear",
                "center_crop": CROP,
                "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD),
            },
        }
        settings.update(
            weights_settings(self.weights, self.weights_sha256, self.seed, RANDOM_RESIDUAL_SCALE)
        )
        return settings

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Resize, center-crop and normalise an RGB image to a (3, 224, 224) tensor."""
        return self.transform(image)

    @property
    def network(self) -> nn.Module:
        if self._network is None:
            body = build_resnet152_body(self.weights, self.seed)
            body.eval().requires_grad_(False)
            self._network = body.to(self.device, memory_format=torch.channels_last)
            logger.info(
                "grid extractor: ResNet152 on %s, %s, %s",
                self.device,
                self.precision,
                self.weights or f"random weights (seed {self.seed})",
            )
        return self._network

    def extract(self, batch: list[torch.Tensor]) -> dict[str, np.ndarray]:
        """Run ResNet152 on (3, 224, 224) tensors; returns ``grid/features`` (B, 49, 2048) float32."""
        images = torch.stack(batch).to(self.device, memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.device, self.precision):
            maps = self.network(images)
        # (B, 2048, 7, 7) -> (B, 49, 2048), cells in row-major order over the grid.
        features = maps.float().flatten(2).transpose(1, 2)
        return {"grid/features": features.cpu().numpy()}
