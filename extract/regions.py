"""Region features: the bottom-up-attention detector behind the feature-extractor interface.

Each image yields ``max_boxes`` rows (K) of the store's ``regions/*`` arrays: 2048-d
features of the kept boxes, the boxes in original-image pixels, and their object and
attribute predictions. ``count`` is the number of real rows, and the rest is padding
with zero features and boxes and ids -1.
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
from dsran.extract.detector import (
    PIXEL_MEAN_BGR,
    DetectorConfig,
    DetectorInput,
    VisualGenomeDetector,
    prepare_image,
    region_arrays,
    select_regions,
)
from dsran.extract.detector_weights import init_random_weights, load_detector_weights
from PIL import Image

logger = logging.getLogger(__name__)

REGION_PRECISIONS = ("fp32", "bf16", "fp16")
# Scale of the last batch norm of each residual branch under random weights (see
# init_random_weights); recorded in the settings because it changes the features.
RANDOM_RESIDUAL_SCALE = 0.2
PUBLISHED_WEIGHTS = "bua-caffe-frcn-r101-k10-100.pth"
# File names looked up in torchvision's checkpoint cache when --region-weights is not
# given: MILVLG's current and older release names of the same converted model.
CACHED_WEIGHTS = (PUBLISHED_WEIGHTS, "bua-caffe-frcn-r101_with_attributes.pth")


def region_weights_cache_dir() -> Path:
    """torchvision's checkpoint cache, ``torch.hub.get_dir()/checkpoints``, also searched for the detector."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_region_weights(path: str | None) -> str | None:
    """Return the detector weights to load: ``path`` when given, else a file in the cache."""
    if path is not None:
        if not Path(path).is_file():
            raise ExtractorError(
                f"region weights file not found: {path}. Pass --region-weights a MILVLG "
                f"detector checkpoint ({PUBLISHED_WEIGHTS}) that exists."
            )
        return path
    for name in CACHED_WEIGHTS:
        cached = region_weights_cache_dir() / name
        if cached.is_file():
            return str(cached)
    return None


def missing_weights_message() -> str:
    return (
        f"no region detector weights given or found in {region_weights_cache_dir()}. "
        "Pass --region-weights PATH to MILVLG's "
        f"{PUBLISHED_WEIGHTS} (the bottom-up-attention Caffe ResNet-101 with attributes, "
        "model zoo of MILVLG/bottom-up-attention.pytorch; older releases name it "
        "bua-caffe-frcn-r101_with_attributes.pth), or pass --random-weights for a test run "
        "with random CNN weights, or --no-regions to skip region features."
    )


class RegionExtractor:
    """Visual Genome Faster R-CNN regions: ``regions/features`` (B, K, 2048) and the other region arrays.

    The network is built on the first :meth:`extract` call, so processes that only
    preprocess images (DataLoader workers, a distributed driver) never hold it.
    """

    kind = "regions"

    def __init__(
        self,
        config: DetectorConfig | None = None,
        weights: str | Path | None = None,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        channels_last: bool = True,
        class_probs: bool = False,
        seed: int = 0,
    ):
        """Set up a region extractor; ``weights=None`` means seeded random weights.

        Args:
            config: detector test settings; the published ones by default (K = 100).
            weights: the published detectron2 checkpoint of the detector.
            device: torch device the network runs on.
            precision: "fp32", or "bf16" / "fp16" autocast (fp16 only on CUDA).
            channels_last: run convolutions in channels-last memory format.
            class_probs: also return ``regions/class_probs`` (B, K, 1601).
            seed: seed of the random weights when ``weights`` is None.
        """
        self.config = config or DetectorConfig()
        self.config.validate()
        self.device = torch.device(device)
        if precision not in REGION_PRECISIONS:
            raise ExtractorError(
                f"unknown precision {precision!r}; valid precisions are {', '.join(REGION_PRECISIONS)}"
            )
        if precision == "fp16" and self.device.type != "cuda":
            raise ExtractorError("precision 'fp16' needs a CUDA device; on CPU use bf16 or fp32")
        self.precision = precision
        self.channels_last = channels_last
        self.class_probs = class_probs
        self.seed = seed
        self.weights = Path(weights) if weights is not None else None
        if self.weights is not None and not self.weights.is_file():
            raise ExtractorError(
                f"region detector weights not found: {self.weights}. Pass --region-weights "
                f"the path of MILVLG's {PUBLISHED_WEIGHTS} that exists."
            )
        self.weights_sha256 = sha256_file(self.weights) if self.weights is not None else None
        self._network: VisualGenomeDetector | None = None

    @classmethod
    def from_options(cls, options: ExtractorOptions) -> RegionExtractor:
        """Build the extractor of ``dsran extract`` from its options."""
        device = resolve_device(options.device)
        precision = resolve_precision(options.precision, device)
        if options.random_weights and options.region_weights is not None:
            raise ExtractorError(
                f"--random-weights and --region-weights {options.region_weights} exclude each "
                "other; pass one of them"
            )
        weights = None if options.random_weights else find_region_weights(options.region_weights)
        if weights is None and not options.random_weights:
            if not options.random_if_missing:
                raise ExtractorError(missing_weights_message())
            logger.warning("%s Using random weights instead.", missing_weights_message())
        config = DetectorConfig(
            min_size=options.region_min_size,
            max_size=options.region_max_size,
            rpn_post_nms_topk=options.region_proposals,
            min_boxes=options.min_boxes,
            max_boxes=options.max_boxes,
        )
        try:
            config.validate()
        except ValueError as error:
            raise ExtractorError(str(error)) from error
        return cls(
            config,
            weights=weights,
            device=device,
            precision=precision,
            class_probs=options.class_probs,
            seed=options.seed,
        )

    @property
    def max_boxes(self) -> int:
        return self.config.max_boxes

    def settings(self) -> dict[str, Any]:
        """Everything that changes the stored numbers; the store rejects a run with other settings."""
        settings: dict[str, Any] = {
            "network": "bottom-up-attention Visual Genome Faster R-CNN, Caffe ResNet-101 C4",
            "dim": 2048,
            "precision": self.precision,
            "memory_format": "channels_last" if self.channels_last else "contiguous",
            "pixel_mean_bgr": list(PIXEL_MEAN_BGR),
            "box_source": "rpn proposals",
            "class_probs": self.class_probs,
            **self.config.to_dict(),
        }
        settings.update(
            weights_settings(self.weights, self.weights_sha256, self.seed, RANDOM_RESIDUAL_SCALE)
        )
        return settings

    def preprocess(self, image: Image.Image) -> DetectorInput:
        """Resize an RGB image for the detector and record the scale back to original pixels."""
        return prepare_image(image, self.config)

    @property
    def network(self) -> VisualGenomeDetector:
        if self._network is None:
            network = VisualGenomeDetector(self.config)
            if self.weights is None:
                init_random_weights(network, self.seed, residual_scale=RANDOM_RESIDUAL_SCALE)
            else:
                load_detector_weights(network, self.weights)
            network.eval().requires_grad_(False)
            memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
            self._network = network.to(self.device, memory_format=memory_format)
            logger.info(
                "region extractor: detector on %s, %s, %s, K=%d",
                self.device,
                self.precision,
                self.weights or f"random weights (seed {self.seed})",
                self.config.max_boxes,
            )
        return self._network

    def extract(self, batch: list[DetectorInput]) -> dict[str, np.ndarray]:
        """Detect and select regions in each image; returns ``regions/*`` arrays with B rows."""
        if not batch:
            raise ValueError("extract() needs at least one image")
        rows = []
        network = self.network
        for item in batch:
            with torch.inference_mode(), autocast(self.device, self.precision):
                detections = network(item)
            keep = select_regions(detections, self.config)
            rows.append(region_arrays(detections, keep, self.config.max_boxes, self.class_probs))
        return {name: np.stack([row[name] for row in rows]) for name in rows[0]}
