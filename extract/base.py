"""The feature-extractor interface and the helpers every extractor shares.

A feature extractor owns one settings section of the store (``kind``: "grid" or
"regions") and the arrays under that name. The runner drives it in two steps:
:meth:`FeatureExtractor.preprocess` runs in DataLoader worker processes on each decoded
RGB image, and :meth:`FeatureExtractor.extract` runs the network on a batch of those
results in the main process. Extractors are built by :func:`build_extractor` from
:class:`ExtractorOptions`, which is what crosses process boundaries (dask workers build
their own extractors from it).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class ExtractorError(ValueError):
    """An extractor cannot be built from the given options (weights, device, precision)."""


@runtime_checkable
class FeatureExtractor(Protocol):
    """A frozen network that turns decoded images into store arrays of one feature kind."""

    kind: str  # store settings section and array group it owns: "grid" or "regions"

    def settings(self) -> dict[str, Any]:
        """Return the JSON-serialisable settings recorded in the store under ``kind``.

        Two runs whose settings differ must not write into one store, so this includes
        everything that changes the numbers: weights file name and sha256 (or
        ``random_weights``), precision, transform, thresholds.
        """
        ...

    def preprocess(self, image: Image.Image) -> Any:
        """Turn a decoded RGB image (EXIF orientation applied) into one batch item.

        Runs in DataLoader worker processes, so it must not use the network or the GPU.
        """
        ...

    def extract(self, batch: list[Any]) -> dict[str, np.ndarray]:
        """Run the network on a batch of :meth:`preprocess` results.

        Returns store arrays keyed by store name (``"grid/features"`` -> (B, 49, 2048)),
        one row per batch item, boxes in original image pixels.
        """
        ...


@dataclass(frozen=True)
class ExtractorOptions:
    """Options that every extractor factory receives; hashable so workers can cache models."""

    device: str = "auto"  # "auto" (CUDA when available), "cpu" or "cuda"
    precision: str = "auto"  # "auto", "fp32", "bf16" or "fp16"; see resolve_precision
    grid_weights: str | None = None  # torchvision ResNet152 state dict file, or None for the cache
    random_weights: bool = False  # use seeded random CNN weights, never a weights file
    # Use trained weights where a file is found, seeded random weights (with a warning)
    # where none is: the demo's mode, so it uses real weights when a machine has them.
    random_if_missing: bool = False
    seed: int = 0  # seed of the random weights
    region_weights: str | None = None  # the detector's detectron2 checkpoint (MILVLG .pth)
    min_boxes: int = 100  # regions kept per image at least (published: 10 to 100; DSRAN: 100)
    max_boxes: int = 100  # regions kept per image at most; the store's K
    class_probs: bool = False  # also store regions/class_probs (N, K, 1601)
    region_proposals: int = 300  # RPN proposals per image that run through the box head
    region_min_size: int = 600  # shorter image side for the detector, in pixels
    region_max_size: int = 1000  # longer image side cap for the detector, in pixels


def _build_grid(options: ExtractorOptions) -> FeatureExtractor:
    from dsran.extract.grid import GridExtractor

    return GridExtractor.from_options(options)


def _build_regions(options: ExtractorOptions) -> FeatureExtractor:
    from dsran.extract.regions import RegionExtractor

    return RegionExtractor.from_options(options)


# Factories by feature kind, in the order the runner runs them.
EXTRACTOR_FACTORIES: dict[str, Callable[[ExtractorOptions], FeatureExtractor]] = {
    "grid": _build_grid,
    "regions": _build_regions,
}


def build_extractor(kind: str, options: ExtractorOptions) -> FeatureExtractor:
    """Build the extractor of feature kind ``kind``; unknown kinds list the valid ones."""
    if kind not in EXTRACTOR_FACTORIES:
        raise ExtractorError(
            f"unknown feature kind {kind!r}; valid kinds are {', '.join(EXTRACTOR_FACTORIES)}"
        )
    return EXTRACTOR_FACTORIES[kind](options)


def resolve_device(name: str) -> torch.device:
    """Map ``--device`` to a torch device: auto picks CUDA when it is available."""
    if name not in DEVICES:
        raise ExtractorError(f"unknown device {name!r}; valid devices are {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ExtractorError(
            "device 'cuda' was requested but torch finds no CUDA device "
            f"(torch {torch.__version__}); use --device cpu or auto"
        )
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bfloat16 instructions (AVX512-BF16 or AMX)."""
    checker = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if checker is not None:
        with contextlib.suppress(RuntimeError):
            return bool(checker())
    return _cpuinfo_flags() & {"avx512_bf16", "amx_bf16"} != set()


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def resolve_precision(name: str, device: torch.device) -> str:
    """Map ``--precision`` to "fp32", "bf16" or "fp16" for ``device``.

    auto: fp16 autocast on CUDA, bf16 autocast on CPUs with native bfloat16, else fp32.
    fp16 on CPU is rejected because PyTorch's CPU fp16 kernels are slower than fp32.
    """
    if name not in PRECISIONS:
        raise ExtractorError(
            f"unknown precision {name!r}; valid precisions are {', '.join(PRECISIONS)}"
        )
    if name == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if cpu_supports_bf16() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ExtractorError(
            "precision 'fp16' needs a CUDA device; on CPU use --precision bf16 or fp32"
        )
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ExtractorError(
            "precision 'bf16' is not supported by this CUDA device; use --precision fp16 or fp32"
        )
    return name


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Run the block under autocast for bf16/fp16, or unchanged for fp32."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision]):
        yield


def weights_settings(
    weights: Path | None, weights_sha256: str | None, seed: int, residual_scale: float
) -> dict[str, Any]:
    """Return the store settings that identify an extractor's weights.

    Trained weights are named by file name and sha256; random ones by their seed and
    the residual scale of their initialisation, because both change the features.
    """
    if weights is None:
        return {
            "random_weights": True,
            "random_seed": seed,
            "random_residual_scale": residual_scale,
        }
    return {"random_weights": False, "weights": weights.name, "weights_sha256": weights_sha256}


def sha256_file(path: str | Path, block_size: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(block_size), b""):
            digest.update(block)
    return digest.hexdigest()
