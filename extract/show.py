"""Drawing an image's stored regions with "attribute object" labels, to judge a detector by eye."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from dsran.extract.images import load_rgb
from dsran.extract.store import FeatureStore, StoreError
from dsran.extract.vocabulary import load_vocabulary
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

# Distinct, readable outline colours, cycled over the drawn boxes.
PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
)


@dataclass
class Region:
    """One stored region to draw."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in original pixels
    label: str  # "attribute object score", or "region i" when the store has no predictions


def find_image_row(store: FeatureStore, key: str) -> int:
    """Return the store row of ``key``: an ``images/path`` value, a unique file stem, or a row number."""
    paths = [str(path) for path in store.image_paths()]
    if key in paths:
        return paths.index(key)
    matches = [row for row, path in enumerate(paths) if Path(path).stem == key]
    if len(matches) > 1:
        raise StoreError(
            f"image {key!r} matches {len(matches)} images of {store.path} "
            f"({', '.join(paths[row] for row in matches[:3])}); give its path instead"
        )
    if matches:
        return matches[0]
    if key.isdigit() and int(key) < len(paths):
        return int(key)
    if not paths:
        raise StoreError(f"image {key!r} not found: feature store {store.path} has no images")
    raise StoreError(
        f"image {key!r} not found in {store.path}: give a path such as {paths[0]!r}, "
        f"a file stem, or a row number (0..{len(paths) - 1})"
    )


def stored_regions(
    store: FeatureStore, row: int, max_regions: int, attribute_threshold: float
) -> list[Region]:
    """Read the ``max_regions`` most confident regions of one image, best first.

    The attribute name joins the label only when its score reaches ``attribute_threshold``.
    """
    if not store.has_regions:
        raise StoreError(f"feature store {store.path} has no region features to show")
    if not store.done()[row]:
        raise StoreError(
            f"image {store.image_paths()[row]} has no features in {store.path} yet "
            "(failed or not extracted); run `dsran extract` to finish the store"
        )
    count = int(store.array("regions/count")[row])
    boxes = store.array("regions/boxes")[row][:count]
    object_ids = store.array("regions/object_ids")[row][:count]
    object_scores = store.array("regions/object_scores")[row][:count]
    attribute_ids = store.array("regions/attribute_ids")[row][:count]
    attribute_scores = store.array("regions/attribute_scores")[row][:count]

    order = np.argsort(-object_scores, kind="stable")[:max_regions]
    vocabulary = load_vocabulary()
    regions = []
    for index in order:
        if object_ids[index] < 0:
            label = f"region {index}"
        else:
            attribute = (
                int(attribute_ids[index])
                if attribute_scores[index] >= attribute_threshold
                else None
            )
            label = vocabulary.label(int(object_ids[index]), attribute)
            label += f" {object_scores[index]:.2f}"
        regions.append(Region(tuple(float(value) for value in boxes[index]), label))
    return regions


def _font(image_height: int) -> ImageFont.ImageFont:
    size = max(12, image_height // 45)
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType only has the fixed bitmap font
        return ImageFont.load_default()


def draw_regions(image: Image.Image, regions: list[Region]) -> Image.Image:
    """Return a copy of ``image`` with each region's box and label drawn on it."""
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    font = _font(canvas.height)
    line_width = max(2, canvas.height // 250)
    for index, region in enumerate(regions):
        colour = PALETTE[index % len(PALETTE)]
        draw.rectangle(region.box, outline=colour, width=line_width)
        left, top = region.box[0], region.box[1]
        text_box = draw.textbbox((left, top), region.label, font=font)
        height = text_box[3] - text_box[1]
        # Labels sit above the box, or inside it when the box touches the top edge.
        text_top = top - height - 2 if top - height - 2 >= 0 else top
        text_box = draw.textbbox((left + 2, text_top), region.label, font=font)
        draw.rectangle(text_box, fill=colour)
        draw.text((left + 2, text_top), region.label, fill=(0, 0, 0), font=font)
    return canvas


def render_store_image(
    store: FeatureStore,
    key: str,
    images_root: str | Path,
    max_regions: int = 20,
    attribute_threshold: float = 0.0,
) -> Image.Image:
    """Draw the stored regions of image ``key`` on the image file under ``images_root``."""
    row = find_image_row(store, key)
    regions = stored_regions(store, row, max_regions, attribute_threshold)
    relative = str(store.image_paths()[row])
    path = Path(images_root) / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"image file not found: {path}. Pass --images the folder the store was extracted "
            f"from (images/path is {relative!r})."
        )
    # The same decoding as `dsran extract`, so boxes and pixels agree after EXIF orientation.
    image = load_rgb(path)
    stored_size = (int(store.array("images/width")[row]), int(store.array("images/height")[row]))
    if image.size != stored_size:
        logger.warning(
            "%s is %dx%d but the store recorded %dx%d; the boxes may not line up",
            path,
            *image.size,
            *stored_size,
        )
    return draw_regions(image, regions)
