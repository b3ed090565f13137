"""Throughput of the grid extractor on the sample: batched fp32 and bf16 vs a plain loop.

Usage: python benchmarks/extract_grid.py [--images 32] [--batch-size 16]

Three ways to run ResNet152 up to layer4 on the same preprocessed images (decoding and
preprocessing are done once beforehand and not timed):

- plain: fp32, default (NCHW) memory format, one image per forward pass;
- fp32: GridExtractor at fp32, channels_last, batches of --batch-size;
- bf16: GridExtractor with bf16 autocast, channels_last, batches of --batch-size.

It prints images/s of each and the bf16 error, mean |bf16 - fp32| / mean |fp32| over
all features. Random CNN weights are used (seeded, as in `--random-weights`), because
no trained ResNet152 weights are available here.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from dsran.extract.base import ExtractorOptions, cpu_supports_bf16
from dsran.extract.grid import GridExtractor
from dsran.extract.images import discover_images, load_rgb

SAMPLE_IMAGES = Path(__file__).resolve().parents[1] / "data" / "coco-mini" / "images"


def time_batches(run, items: list[torch.Tensor], batch_size: int) -> tuple[float, np.ndarray]:
    """Run `run` over `items` in batches after one warm-up batch; returns (images/s, features)."""
    run(items[:batch_size])
    outputs = []
    started = time.perf_counter()
    for start in range(0, len(items), batch_size):
        outputs.append(run(items[start : start + batch_size]))
    elapsed = time.perf_counter() - started
    return len(items) / elapsed, np.concatenate(outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32, help="number of sample images")
    parser.add_argument("--batch-size", type=int, default=16, help="batch of the batched runs")
    args = parser.parse_args()

    paths = discover_images(SAMPLE_IMAGES)[: args.images]
    fp32 = GridExtractor.from_options(
        ExtractorOptions(device="cpu", precision="fp32", random_weights=True)
    )
    items = [fp32.preprocess(load_rgb(SAMPLE_IMAGES / path)) for path in paths]

    # The plain loop: the same weights, NCHW, no autocast, one image at a time.
    plain_network = GridExtractor(None, torch.device("cpu"), "fp32").network
    plain_network = plain_network.to(memory_format=torch.contiguous_format)

    def run_plain(batch: list[torch.Tensor]) -> np.ndarray:
        with torch.no_grad():
            maps = plain_network(torch.stack(batch))
        return maps.flatten(2).transpose(1, 2).numpy()

    results = {}
    results["plain"], plain_features = time_batches(run_plain, items, batch_size=1)
    results["fp32"], fp32_features = time_batches(
        lambda batch: fp32.extract(batch)["grid/features"], items, args.batch_size
    )
    bf16 = GridExtractor(None, torch.device("cpu"), "bf16")
    results["bf16"], bf16_features = time_batches(
        lambda batch: bf16.extract(batch)["grid/features"], items, args.batch_size
    )

    error = float(np.abs(bf16_features - fp32_features).mean() / np.abs(fp32_features).mean())
    plain_gap = float(np.abs(plain_features - fp32_features).max())
    report = {
        "images": len(items),
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "cpu_bf16": cpu_supports_bf16(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "images_per_s": {name: round(value, 3) for name, value in results.items()},
        "speedup_vs_plain": {
            name: round(value / results["plain"], 2) for name, value in results.items()
        },
        "bf16_relative_error": round(error, 5),
        "max_abs_plain_vs_fp32": plain_gap,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
