"""The detector's box arithmetic, proposal and selection rules, on small seeded inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dsran.extract.detector import (
    Detections,
    DetectorConfig,
    detector_scale,
    per_class_max_confidence,
    prepare_image,
    region_arrays,
    select_regions,
)
from dsran.extract.detector_backbone import ConvNorm, ResNetC4Backbone
from dsran.extract.detector_rpn import (
    caffe_cell_anchors,
    clip_boxes,
    decode_boxes,
    grid_anchors,
    legacy_nms,
)
from PIL import Image


def test_cell_anchors_match_caffe_generate_anchors():
    # py-faster-rcnn's generate_anchors() gives [-84, -40, 99, 55] first for scales 8, 16
    # and 32. With scale 4 in front, that anchor moves to the second row.
    anchors = caffe_cell_anchors()
    assert anchors.shape == (12, 4)
    assert anchors[0].tolist() == [-38.0, -16.0, 53.0, 31.0]  # ratio 0.5, scale 4: 92x48
    assert anchors[1].tolist() == [-84.0, -40.0, 99.0, 55.0]  # ratio 0.5, scale 8
    assert anchors[5].tolist() == [-56.0, -56.0, 71.0, 71.0]  # ratio 1, scale 8: 128x128
    assert anchors[11].tolist() == [-168.0, -344.0, 183.0, 359.0]  # ratio 2, scale 32
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    assert torch.equal(centers, torch.full((12, 2), 7.5))


def test_grid_anchors_order_is_y_x_anchor():
    cells = caffe_cell_anchors()
    anchors = grid_anchors(cells, height=2, width=3, stride=16)
    assert anchors.shape == (2 * 3 * 12, 4)
    # Row (y=1, x=2, anchor=5) sits at ((1 * 3) + 2) * 12 + 5.
    expected = cells[5] + torch.tensor([32.0, 16.0, 32.0, 16.0])
    assert torch.equal(anchors[(1 * 3 + 2) * 12 + 5], expected)


def test_decode_zero_deltas_returns_box():
    boxes = torch.tensor([[10.0, 20.0, 49.0, 39.0]])
    assert torch.allclose(
        decode_boxes(torch.zeros(1, 4), boxes), boxes + torch.tensor([0, 0, 1, 1])
    )


def test_decode_clamps_large_scale():
    boxes = torch.tensor([[0.0, 0.0, 15.0, 15.0]])
    decoded = decode_boxes(torch.tensor([[0.0, 0.0, 50.0, 50.0]]), boxes)
    width = decoded[0, 2] - decoded[0, 0]
    assert width == pytest.approx(1000.0, rel=1e-4)


def test_clip_boxes_to_pixel_indices():
    boxes = torch.tensor([[-5.0, -3.0, 120.0, 90.0]])
    assert clip_boxes(boxes, height=50, width=100).tolist() == [[0.0, 0.0, 99.0, 49.0]]


def test_legacy_nms_uses_plus_one_areas():
    # Two 10-pixel boxes (0..9 and 5..14): legacy IoU 5*10 / (200 - 50) = 1/3, while
    # torchvision's own arithmetic on the raw corners gives 4*9 / (81 + 81 - 36) = 0.286.
    boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0], [5.0, 0.0, 14.0, 9.0]])
    scores = torch.tensor([0.9, 0.8])
    assert legacy_nms(boxes, scores, 0.3).tolist() == [0]
    assert legacy_nms(boxes, scores, 0.34).tolist() == [0, 1]


def _reference_max_confidence(boxes, class_probs, threshold):
    """The published loop: one NMS per foreground class, max of the kept scores."""
    confidence = torch.zeros(len(boxes))
    for class_index in range(1, class_probs.shape[1]):
        scores = class_probs[:, class_index]
        keep = legacy_nms(boxes, scores, threshold)
        confidence[keep] = torch.maximum(confidence[keep], scores[keep])
    return confidence


def _random_boxes(generator, count):
    corners = torch.rand(count, 2, generator=generator) * 300
    sizes = torch.rand(count, 2, generator=generator) * 150 + 1
    return torch.cat([corners, corners + sizes], dim=1)


@pytest.mark.parametrize("temperature", [0.01, 3.0, 12.0])
def test_max_confidence_equals_per_class_loop(temperature):
    generator = torch.Generator().manual_seed(int(temperature * 100))
    boxes = _random_boxes(generator, 60)
    class_probs = torch.softmax(torch.randn(60, 1601, generator=generator) * temperature, dim=1)
    expected = _reference_max_confidence(boxes, class_probs, 0.3)
    actual = per_class_max_confidence(boxes, class_probs, 0.3)
    assert torch.equal(actual, expected)


def test_max_confidence_of_no_boxes_is_empty():
    confidence = per_class_max_confidence(torch.zeros(0, 4), torch.zeros(0, 1601), 0.3)
    assert confidence.shape == (0,)


def _detections(confidences: list[float]) -> Detections:
    """Disjoint boxes whose best foreground class score is ``confidences[i]``."""
    count = len(confidences)
    boxes = torch.tensor([[20.0 * i, 0.0, 20.0 * i + 10, 10.0] for i in range(count)]).reshape(
        -1, 4
    )
    class_probs = torch.zeros(count, 1601)
    class_probs[:, 0] = 1.0 - torch.tensor(confidences)
    class_probs[torch.arange(count), 1 + torch.arange(count) % 1600] = torch.tensor(confidences)
    attribute_probs = torch.full((count, 401), 1.0 / 401)
    features = torch.arange(count, dtype=torch.float32)[:, None].repeat(1, 2048)
    return Detections(boxes, features, class_probs, attribute_probs)


def test_select_keeps_passing_boxes_in_proposal_order():
    detections = _detections([0.1, 0.5, 0.3, 0.9, 0.05])
    config = DetectorConfig(min_boxes=1, max_boxes=3, rpn_post_nms_topk=300)
    assert select_regions(detections, config).tolist() == [1, 2, 3]


def test_select_fills_to_min_boxes_by_confidence():
    detections = _detections([0.1, 0.5, 0.15, 0.05])
    config = DetectorConfig(min_boxes=3, max_boxes=4)
    assert select_regions(detections, config).tolist() == [1, 2, 0]


def test_select_caps_at_max_boxes_by_confidence():
    detections = _detections([0.3, 0.5, 0.4, 0.9])
    config = DetectorConfig(min_boxes=1, max_boxes=2)
    assert select_regions(detections, config).tolist() == [3, 1]


def test_select_keeps_all_when_fewer_proposals():
    detections = _detections([0.01, 0.02])
    assert select_regions(detections, DetectorConfig()).tolist() == [1, 0]


def test_region_arrays_pad_without_fillers():
    detections = _detections([0.6, 0.7, 0.8])
    rows = region_arrays(detections, torch.tensor([2, 0]), max_boxes=4, class_probs=True)
    assert rows["regions/count"] == 2
    assert rows["regions/features"].shape == (4, 2048)
    assert rows["regions/features"][:2, 0].tolist() == [2.0, 0.0]
    assert not rows["regions/features"][2:].any()
    assert not rows["regions/boxes"][2:].any()
    assert rows["regions/object_ids"].tolist() == [2, 0, -1, -1]
    assert rows["regions/object_ids"].dtype == np.int16
    assert rows["regions/object_scores"].tolist() == pytest.approx([0.8, 0.6, 0.0, 0.0])
    assert rows["regions/attribute_ids"].tolist() == [0, 0, -1, -1]
    assert rows["regions/class_probs"].shape == (4, 1601)
    assert not rows["regions/class_probs"][2:].any()


def test_region_arrays_of_no_boxes():
    detections = _detections([])
    rows = region_arrays(
        detections, torch.zeros(0, dtype=torch.long), max_boxes=3, class_probs=False
    )
    assert rows["regions/count"] == 0
    assert rows["regions/object_ids"].tolist() == [-1, -1, -1]
    assert "regions/class_probs" not in rows


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [(480, 640, 600 / 480), (600, 1600, 1000 / 1600), (30, 30, 20.0), (1000, 1000, 0.6)],
)
def test_detector_scale(height, width, expected):
    assert detector_scale(height, width, 600, 1000) == pytest.approx(expected)


def test_prepare_image_is_bgr_minus_mean():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    prepared = prepare_image(image, DetectorConfig())
    # 600 / 20 would make the long side 1200, so the 1000-pixel cap sets the scale.
    assert prepared.image.shape == (3, 500, 1000)
    assert (prepared.height, prepared.width) == (20, 40)
    assert prepared.scale == pytest.approx(25.0)
    blue, green, red = prepared.image[:, 250, 500].tolist()
    assert (blue, green, red) == pytest.approx((-102.9801, -115.9465, 255 - 122.7717), abs=1e-3)


def test_prepare_image_converts_grayscale():
    prepared = prepare_image(Image.new("L", (20, 20), 128), DetectorConfig())
    assert prepared.image.shape == (3, 600, 600)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"min_boxes": 0}, "min_boxes=0"),
        ({"min_boxes": 20, "max_boxes": 10}, "min_boxes=20, max_boxes=10"),
        ({"rpn_post_nms_topk": 50}, "rpn_post_nms_topk=50"),
        ({"max_size": 500}, "max_size=500"),
        ({"confidence_threshold": 1.5}, "confidence_threshold=1.5"),
    ],
)
def test_config_rejects_invalid_values(changes, message):
    with pytest.raises(ValueError, match=message):
        DetectorConfig(**changes).validate()


def test_backbone_output_stride():
    backbone = ResNetC4Backbone().eval()
    with torch.no_grad():
        res4 = backbone(torch.zeros(1, 3, 64, 96))
    assert res4.shape == (1, 1024, 4, 6)


def test_conv_norm_folds_and_refreshes():
    torch.manual_seed(0)
    layer = ConvNorm(4, 6, 3, padding=1)
    layer.norm.running_mean.uniform_(-1, 1)
    layer.norm.running_var.uniform_(0.5, 2)
    inputs = torch.randn(2, 4, 5, 5)

    def reference() -> torch.Tensor:
        return layer.norm(F.conv2d(inputs, layer.weight, None, padding=1))

    with torch.no_grad():
        assert torch.allclose(layer(inputs), reference(), atol=1e-5)
        layer.load_state_dict({**layer.state_dict(), "norm.weight": torch.full((6,), 3.0)})
        assert torch.allclose(layer(inputs), reference(), atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reduced = layer(inputs)
    assert reduced.dtype == torch.bfloat16
    assert torch.allclose(reduced.float(), reference(), rtol=0.05, atol=0.05)
