"""The region extractor on real sample images and hard cases, with seeded random weights.

A small detector configuration (shorter side 128, 10 proposals, K = 6) keeps the
whole module to a few seconds per image on two CPU cores; the published configuration
only changes sizes and counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from dsran.extract.base import ExtractorError
from dsran.extract.detector import DetectorConfig
from dsran.extract.regions import RegionExtractor
from dsran.extract.store import NUM_OBJECT_CLASSES
from dsran.extract.vocabulary import NUM_ATTRIBUTES, NUM_OBJECTS
from PIL import Image, ImageOps

SAMPLE_IMAGES = Path(__file__).resolve().parents[2] / "data" / "coco-mini" / "images"
K = 6
# A 25-pixel smallest proposal side leaves the 30x30 image only boxes close to its full
# size, which the RPN NMS merges to fewer than K: that row must end in padding.
SMALL = DetectorConfig(
    min_size=128,
    max_size=213,
    rpn_post_nms_topk=10,
    rpn_min_box_size=25,
    min_boxes=K,
    max_boxes=K,
)


def _exif_rotated(tmp_path: Path) -> Image.Image:
    """A sample image stored sideways with EXIF orientation 6, decoded upright."""
    source = Image.open(sorted((SAMPLE_IMAGES / "val2017").glob("*.jpg"))[1]).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    source.save(path, exif=exif)
    return ImageOps.exif_transpose(Image.open(path)).convert("RGB")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Image.Image]:
    sample = sorted((SAMPLE_IMAGES / "train2017").glob("*.jpg"))[0]
    return {
        "coco": Image.open(sample).convert("RGB"),
        "blank": Image.new("RGB", (320, 240), (0, 0, 0)),
        "tiny": Image.new("RGB", (30, 30), (200, 120, 40)),
        "wide": Image.new("RGB", (1600, 600), (255, 255, 255)),
        "rotated": _exif_rotated(tmp_path_factory.mktemp("exif")),
    }


@pytest.fixture(scope="module")
def extractor() -> RegionExtractor:
    return RegionExtractor(SMALL, precision="fp32", class_probs=True, seed=3)


@pytest.fixture(scope="module")
def extracted(extractor, images) -> dict[str, np.ndarray]:
    return extractor.extract([extractor.preprocess(image) for image in images.values()])


EXPECTED = {
    "regions/features": ((K, 2048), np.float32),
    "regions/boxes": ((K, 4), np.float32),
    "regions/count": ((), np.int32),
    "regions/object_ids": ((K,), np.int16),
    "regions/object_scores": ((K,), np.float32),
    "regions/attribute_ids": ((K,), np.int16),
    "regions/attribute_scores": ((K,), np.float32),
    "regions/class_probs": ((K, NUM_OBJECT_CLASSES), np.float32),
}


def test_shapes_and_dtypes(extracted, images):
    assert set(extracted) == set(EXPECTED)
    for name, (row_shape, dtype) in EXPECTED.items():
        assert extracted[name].shape == (len(images), *row_shape), name
        assert extracted[name].dtype == dtype, name


def test_rows_are_valid_for_every_image(extracted, images):
    for row, name in enumerate(images):
        count = int(extracted["regions/count"][row])
        assert 1 <= count <= K, name
        features = extracted["regions/features"][row]
        assert np.isfinite(features).all(), name
        assert np.abs(features[:count]).sum(axis=1).min() > 0, name
        object_ids = extracted["regions/object_ids"][row]
        attribute_ids = extracted["regions/attribute_ids"][row]
        assert ((object_ids[:count] >= 0) & (object_ids[:count] < NUM_OBJECTS)).all(), name
        assert ((attribute_ids[:count] >= 0) & (attribute_ids[:count] < NUM_ATTRIBUTES)).all(), name
        scores = extracted["regions/object_scores"][row][:count]
        assert ((scores > 0) & (scores <= 1)).all(), name
        probs = extracted["regions/class_probs"][row][:count]
        assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4), name


def test_padding_is_zero_not_duplicated(extracted, images):
    row = list(images).index("tiny")
    count = int(extracted["regions/count"][row])
    assert count < K
    assert not extracted["regions/features"][row, count:].any()
    assert not extracted["regions/boxes"][row, count:].any()
    assert (extracted["regions/object_ids"][row, count:] == -1).all()
    assert (extracted["regions/attribute_ids"][row, count:] == -1).all()
    assert not extracted["regions/object_scores"][row, count:].any()
    assert not extracted["regions/class_probs"][row, count:].any()
    boxes = extracted["regions/boxes"][row, :count]
    assert len(np.unique(boxes, axis=0)) == count


def test_boxes_inside_original_image(extracted, images):
    for row, (name, image) in enumerate(images.items()):
        width, height = image.size
        count = int(extracted["regions/count"][row])
        boxes = extracted["regions/boxes"][row, :count]
        assert (boxes[:, 0] >= 0).all(), name
        assert (boxes[:, 1] >= 0).all(), name
        assert (boxes[:, 2] <= width).all(), name
        assert (boxes[:, 3] <= height).all(), name
        assert (boxes[:, 2] > boxes[:, 0]).all(), name
        assert (boxes[:, 3] > boxes[:, 1]).all(), name


def test_wide_and_rotated_boxes_span_their_size(extracted, images):
    # Boxes reach beyond the short side only if they live in original pixels.
    wide = list(images).index("wide")
    assert extracted["regions/boxes"][wide, :, 2].max() > 600
    rotated = list(images).index("rotated")
    width, height = images["rotated"].size
    source = Image.open(sorted((SAMPLE_IMAGES / "val2017").glob("*.jpg"))[1])
    assert (width, height) == (source.height, source.width)
    boxes = extracted["regions/boxes"][rotated]
    long_axis_end = boxes[:, 2] if width > height else boxes[:, 3]
    assert long_axis_end.max() > min(width, height)


def test_same_input_same_output(extractor, images, extracted):
    names = ["blank", "coco"]
    again = extractor.extract([extractor.preprocess(images[name]) for name in names])
    for name, values in again.items():
        rows = [list(images).index(image_name) for image_name in names]
        assert np.array_equal(values, extracted[name][rows]), name


def test_bf16_rows_are_valid(images):
    extractor = RegionExtractor(SMALL, precision="bf16", channels_last=True, seed=3)
    rows = extractor.extract([extractor.preprocess(images["coco"])])
    count = int(rows["regions/count"][0])
    assert count == K
    assert np.isfinite(rows["regions/features"]).all()
    assert "regions/class_probs" not in rows


def test_settings_are_recorded(extractor):
    settings = extractor.settings()
    json.dumps(settings)
    assert settings["random_weights"] is True
    assert settings["random_seed"] == 3
    assert settings["max_boxes"] == K
    assert settings["class_probs"] is True
    assert settings["precision"] == "fp32"
    assert settings["min_size"] == 128


def test_default_settings_are_published():
    settings = RegionExtractor().settings()
    assert (settings["min_boxes"], settings["max_boxes"]) == (100, 100)
    assert (settings["min_size"], settings["max_size"]) == (600, 1000)
    assert (settings["rpn_pre_nms_topk"], settings["rpn_post_nms_topk"]) == (6000, 300)
    assert settings["box_nms_threshold"] == 0.3
    assert settings["confidence_threshold"] == 0.2


def test_seeds_change_features(images, extracted):
    other = RegionExtractor(SMALL, precision="fp32", seed=4)
    rows = other.extract([other.preprocess(images["coco"])])
    assert not np.array_equal(rows["regions/features"][0], extracted["regions/features"][0])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"precision": "int8"}, "unknown precision 'int8'; valid precisions are fp32, bf16, fp16"),
        ({"precision": "fp16"}, "precision 'fp16' needs a CUDA device"),
        ({"weights": "/nonexistent/detector.pth"}, "region detector weights not found"),
    ],
)
def test_invalid_options_are_rejected(options, message):
    with pytest.raises(ExtractorError, match=message):
        RegionExtractor(**options)


def test_empty_batch_is_rejected(extractor):
    with pytest.raises(ValueError, match="at least one image"):
        extractor.extract([])
