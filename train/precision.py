"""Device and mixed-precision choices shared by training and encoding."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from dsran.train.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU; other names go to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def autocast_context(device: torch.device, precision: str = "auto"):
    """Autocast for ``precision`` on ``device`` (see :func:`resolve_autocast_dtype`)."""
    dtype = resolve_autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX-512 BF16 or AMX, where bf16 matrix products beat fp32."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX512", "AMX"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """Return the autocast dtype of ``precision`` on ``device``, or None for fp32.

    "auto" picks bf16 on CUDA devices that support it and fp16 on older ones, bf16 on
    CPUs with native bf16 instructions, and fp32 elsewhere.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError("precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        return torch.float16
    if precision != "auto":
        raise ConfigError(f"invalid precision {precision!r}; valid values: auto, fp32, bf16, fp16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None
