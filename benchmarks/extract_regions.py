"""Seconds per image of the region extractor on sample images, fp32 against bf16.

Decoding and resizing are not timed. Each configuration runs one warm-up image first,
then times backbone, RPN, box head and box selection of every image separately.
Random weights give the same amount of work as the published ones, except that
selection time depends on the class scores.

    python benchmarks/extract_regions.py                       # published settings
    python benchmarks/extract_regions.py --min-size 300 --max-size 500 --proposals 36 --boxes 36
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from dsran.extract.detector import Detections, DetectorConfig, select_regions
from dsran.extract.regions import RegionExtractor
from PIL import Image, ImageOps

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "coco-mini" / "images"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--images", type=Path, default=SAMPLE, help="image folder (default: the sample)"
    )
    parser.add_argument("--count", type=int, default=4, help="images timed per configuration")
    parser.add_argument(
        "--min-size", type=int, default=600, help="shorter side after resizing, pixels"
    )
    parser.add_argument("--max-size", type=int, default=1000, help="longer side cap, pixels")
    parser.add_argument("--proposals", type=int, default=300, help="RPN proposals kept per image")
    parser.add_argument("--boxes", type=int, default=100, help="regions kept per image (min = max)")
    parser.add_argument(
        "--precisions", nargs="+", default=["fp32", "bf16"], help="precisions to compare"
    )
    parser.add_argument(
        "--contiguous", action="store_true", help="also time the NCHW memory format"
    )
    return parser.parse_args()


def time_image(extractor: RegionExtractor, image: Image.Image) -> dict[str, float]:
    """Run one image through the extractor's stages; returns seconds per stage."""
    network = extractor.network
    item = extractor.preprocess(image)
    memory_format = torch.channels_last if extractor.channels_last else torch.contiguous_format
    times = {}
    with torch.inference_mode(), extractor_autocast(extractor):
        start = time.perf_counter()
        pixels = item.image.unsqueeze(0).contiguous(memory_format=memory_format)
        res4 = network.backbone(pixels)
        times["backbone"] = time.perf_counter() - start

        start = time.perf_counter()
        _, _, height, width = pixels.shape
        proposals, _ = network.proposal_generator(res4, height, width, item.scale)
        times["rpn"] = time.perf_counter() - start

        start = time.perf_counter()
        head = network.roi_heads(res4, proposals)
        times["head"] = time.perf_counter() - start

    start = time.perf_counter()
    detections = Detections(
        proposals.float() / item.scale, head.features, head.class_probs, head.attribute_probs
    )
    select_regions(detections, extractor.config)
    times["select"] = time.perf_counter() - start
    return times


def extractor_autocast(extractor: RegionExtractor):
    if extractor.precision == "fp32":
        return torch.autocast("cpu", enabled=False)
    return torch.autocast("cpu", dtype=torch.bfloat16)


def main() -> None:
    args = parse_args()
    paths = sorted(args.images.rglob("*.jpg"))[: args.count + 1]
    images = [ImageOps.exif_transpose(Image.open(path)).convert("RGB") for path in paths]
    config = DetectorConfig(
        min_size=args.min_size,
        max_size=args.max_size,
        rpn_post_nms_topk=args.proposals,
        min_boxes=args.boxes,
        max_boxes=args.boxes,
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(f"torch {torch.__version__}, {len(images) - 1} images timed, config {config}")
    layouts = [True, False] if args.contiguous else [True]
    print("precision  layout         backbone    rpn   head  select  total s/image")
    for precision in args.precisions:
        for channels_last in layouts:
            extractor = RegionExtractor(config, precision=precision, channels_last=channels_last)
            time_image(extractor, images[0])
            totals = {"backbone": 0.0, "rpn": 0.0, "head": 0.0, "select": 0.0}
            for image in images[1:]:
                for stage, seconds in time_image(extractor, image).items():
                    totals[stage] += seconds
            count = len(images) - 1
            per_image = {stage: seconds / count for stage, seconds in totals.items()}
            layout = "channels_last" if channels_last else "contiguous"
            print(
                f"{precision:<10} {layout:<14} {per_image['backbone']:8.2f} {per_image['rpn']:6.2f} "
                f"{per_image['head']:6.2f} {per_image['select']:7.2f} {sum(per_image.values()):8.2f}"
            )


if __name__ == "__main__":
    main()
