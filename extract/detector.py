"""The bottom-up-attention Visual Genome Faster R-CNN on torchvision operators, without detectron2.

The network is the Caffe model of Anderson et al. (2018), in the form that
MILVLG/bottom-up-attention.pytorch converted (``configs/caffe/test-caffe-r101.yaml``).
It has a Caffe-style ResNet-101 C4 backbone and an RPN with 512 hidden channels and 12
anchors per cell. The box head max-pools 14x14 RoIs on res4 and runs res5 at stride 1
with dilation 2, then mean-pools 2048-d features for 1601 object classes and 401
attribute classes. :func:`select_regions` keeps the boxes the published extractors keep.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from dsran.extract.detector_backbone import BACKBONE_STRIDE, RES4_CHANNELS, ResNetC4Backbone
from dsran.extract.detector_heads import NUM_ATTRIBUTE_CLASSES, NUM_CLASSES, Res5RoIHeads
from dsran.extract.detector_rpn import RegionProposalNetwork, legacy_nms
from PIL import Image
from torch import nn

logger = logging.getLogger(__name__)

# Caffe's BGR pixel mean of the published model; the input is not divided by a std.
PIXEL_MEAN_BGR = (102.9801, 115.9465, 122.7717)
RPN_HIDDEN_CHANNELS = 512


@dataclass
class DetectorConfig:
    """Test-time settings of the detector; the defaults are the published ones."""

    min_size: int = 600  # shorter image side after resizing, in pixels
    max_size: int = 1000  # upper bound of the longer side after resizing, in pixels
    rpn_pre_nms_topk: int = 6000  # proposals kept by objectness before the RPN NMS
    rpn_post_nms_topk: int = 300  # proposals kept after the RPN NMS; each runs through res5
    rpn_nms_threshold: float = 0.7  # IoU threshold of the RPN NMS
    rpn_min_box_size: float = 16.0  # smallest proposal side, in original-image pixels
    box_nms_threshold: float = 0.3  # IoU threshold of the per-class NMS in box selection
    confidence_threshold: float = 0.2  # boxes whose best class score reaches this are kept
    min_boxes: int = 100  # keep at least this many boxes (the best by confidence)
    max_boxes: int = 100  # keep at most this many boxes; also the stored K

    def validate(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        if self.min_size < 1 or self.max_size < self.min_size:
            raise ValueError(
                f"invalid detector input size: min_size={self.min_size}, max_size={self.max_size}; "
                "both must be positive with max_size >= min_size (published: 600 and 1000)"
            )
        if not 1 <= self.min_boxes <= self.max_boxes:
            raise ValueError(
                f"invalid box counts: min_boxes={self.min_boxes}, max_boxes={self.max_boxes}; "
                "need 1 <= min_boxes <= max_boxes (the DSRAN paper uses 100 and 100)"
            )
        if (
            self.rpn_post_nms_topk < self.max_boxes
            or self.rpn_pre_nms_topk < self.rpn_post_nms_topk
        ):
            raise ValueError(
                f"invalid proposal counts: rpn_pre_nms_topk={self.rpn_pre_nms_topk}, "
                f"rpn_post_nms_topk={self.rpn_post_nms_topk}, max_boxes={self.max_boxes}; "
                "need rpn_pre_nms_topk >= rpn_post_nms_topk >= max_boxes (published: 6000, 300)"
            )
        for name in ("rpn_nms_threshold", "box_nms_threshold", "confidence_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"invalid {name}={value}: it must lie in [0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DetectorInput:
    """One image prepared for the detector; picklable, so DataLoader workers can build it."""

    image: torch.Tensor  # (3, h, w) float32, BGR minus PIXEL_MEAN_BGR, resized
    scale: float  # resized size / original size
    height: int  # original height in pixels, after EXIF orientation
    width: int  # original width in pixels, after EXIF orientation


def detector_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """Return the resize factor: shorter side to ``min_size`` unless the longer side would pass ``max_size``."""
    scale = min_size / min(height, width)
    if round(scale * max(height, width)) > max_size:
        scale = max_size / max(height, width)
    return scale


def prepare_image(image: Image.Image, config: DetectorConfig) -> DetectorInput:
    """Convert an RGB image to the detector's BGR, mean-subtracted, resized (3, h, w) tensor.

    The published extractor subtracts the mean, then resizes with OpenCV's bilinear
    interpolation; torch's bilinear interpolation without antialiasing uses the same
    half-pixel sampling.

    NOTE: OpenCV derives the sampling step from the scale factor, torch from the
    rounded output size, so pixels can differ slightly from MILVLG's, and features are
    close to, not bit-equal to, theirs.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())  # (H, W, 3) RGB
    bgr = pixels.flip(-1) - torch.tensor(PIXEL_MEAN_BGR, dtype=torch.float32)
    scale = detector_scale(height, width, config.min_size, config.max_size)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    resized = F.interpolate(
        bgr.permute(2, 0, 1).unsqueeze(0), size=size, mode="bilinear", align_corners=False
    )
    return DetectorInput(resized[0].contiguous(), scale, height, width)


@dataclass
class Detections:
    """Every proposal of one image with the box head's outputs (P proposals)."""

    boxes: torch.Tensor  # (P, 4) float32, x1, y1, x2, y2 in original-image pixels
    features: torch.Tensor  # (P, 2048) float32
    class_probs: torch.Tensor  # (P, 1601) float32, background first
    attribute_probs: torch.Tensor  # (P, 401) float32, "no attribute" first


class VisualGenomeDetector(nn.Module):
    """Backbone, RPN and box head, with the parameter names of the published detectron2 conversion."""

    def __init__(self, config: DetectorConfig | None = None):
        super().__init__()
        self.config = config or DetectorConfig()
        self.config.validate()
        self.backbone = ResNetC4Backbone()
        self.proposal_generator = RegionProposalNetwork(
            RES4_CHANNELS,
            RPN_HIDDEN_CHANNELS,
            stride=BACKBONE_STRIDE,
            pre_nms_topk=self.config.rpn_pre_nms_topk,
            post_nms_topk=self.config.rpn_post_nms_topk,
            nms_threshold=self.config.rpn_nms_threshold,
            min_box_size=self.config.rpn_min_box_size,
        )
        self.roi_heads = Res5RoIHeads()

    @torch.no_grad()
    def forward(self, item: DetectorInput) -> Detections:
        """Detect regions in one prepared image; boxes come back in original-image pixels.

        Images go through one at a time, so no padding changes their features and the
        result does not depend on which images share a batch.
        """
        image = item.image.unsqueeze(0).to(self._device())
        if self._channels_last():
            image = image.contiguous(memory_format=torch.channels_last)
        res4 = self.backbone(image)
        _, _, height, width = image.shape
        proposals, _ = self.proposal_generator(res4, height, width, item.scale)
        head = self.roi_heads(res4, proposals)

        # The published extractors divide the clipped proposals by the scale; the clip
        # to the original size below only guards against rounding.
        boxes = proposals.float() / item.scale
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, item.width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, item.height)
        return Detections(boxes, head.features, head.class_probs, head.attribute_probs)

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def _channels_last(self) -> bool:
        return self.backbone.stem.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def per_class_max_confidence(
    boxes: torch.Tensor, class_probs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Return each box's best foreground score among the classes whose NMS keeps it: (P,).

    For every class 1..1600 separately, NMS at ``iou_threshold`` runs over all boxes with
    that class's scores; a box's confidence is the highest score of a class that kept
    it (0 if none did). This is the published selection (generate_tsv.py of
    bottom-up-attention and MILVLG's save_roi_features), run on the proposal boxes.

    The result is computed lazily: each box walks down its own classes by score until
    one keeps it, and a class's NMS runs only when some box asks for it. Most boxes stop
    at their first or second class, so far fewer than 1600 NMS calls run.
    """
    num_boxes = len(boxes)
    confidence = torch.zeros(num_boxes, dtype=torch.float32)
    if num_boxes == 0:
        return confidence
    boxes = boxes.float().cpu()
    scores = class_probs.float().cpu()[:, 1:]  # (P, C) foreground classes
    num_classes = scores.shape[1]
    class_order = torch.argsort(scores, dim=1, descending=True, stable=True)  # (P, C)
    kept_by_class = torch.zeros(num_classes, num_boxes, dtype=torch.bool)
    nms_done = torch.zeros(num_classes, dtype=torch.bool)

    pending = torch.arange(num_boxes)
    for position in range(num_classes):
        if len(pending) == 0:
            break
        candidate_classes = class_order[pending, position]
        for class_index in torch.unique(candidate_classes[~nms_done[candidate_classes]]).tolist():
            keep = legacy_nms(boxes, scores[:, class_index], iou_threshold)
            kept_by_class[class_index, keep] = True
            nms_done[class_index] = True
        is_kept = kept_by_class[candidate_classes, pending]
        confidence[pending[is_kept]] = scores[pending[is_kept], candidate_classes[is_kept]]
        pending = pending[~is_kept]
    return confidence


def select_regions(detections: Detections, config: DetectorConfig) -> torch.Tensor:
    """Return the indices of the kept proposals, in the published order.

    Boxes whose confidence (:func:`per_class_max_confidence`) reaches the threshold are
    kept in proposal order; when fewer than ``min_boxes`` or more than ``max_boxes``
    pass, the best ``min_boxes`` or ``max_boxes`` by confidence are kept instead, best
    first. Fewer proposals than ``min_boxes`` keeps them all.
    """
    confidence = per_class_max_confidence(
        detections.boxes, detections.class_probs, config.box_nms_threshold
    )
    keep = torch.nonzero(confidence >= config.confidence_threshold).flatten()
    if len(keep) < config.min_boxes:
        keep = torch.argsort(confidence, descending=True, stable=True)[: config.min_boxes]
    elif len(keep) > config.max_boxes:
        keep = torch.argsort(confidence, descending=True, stable=True)[: config.max_boxes]
    return keep


def region_arrays(
    detections: Detections, keep: torch.Tensor, max_boxes: int, class_probs: bool
) -> dict[str, np.ndarray]:
    """Build one image's store rows from the kept proposals, padded to ``max_boxes``.

    Padding rows hold zero features and boxes, id -1 and score 0; ``count`` says how many
    rows are real. Object and attribute ids skip the background / "no attribute" output,
    so they index the 1600 and 400 names of the Visual Genome vocabularies.
    """
    count = len(keep)
    if count > max_boxes:
        raise ValueError(f"{count} regions kept but the store holds at most {max_boxes}")
    object_probs = detections.class_probs[keep][:, 1:]
    attribute_probs = detections.attribute_probs[keep][:, 1:]
    object_scores, object_ids = (
        object_probs.max(dim=1) if count else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
    )
    attribute_scores, attribute_ids = (
        attribute_probs.max(dim=1) if count else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
    )

    def padded(values: torch.Tensor, row_shape: tuple[int, ...], dtype, fill) -> np.ndarray:
        array = np.full((max_boxes, *row_shape), fill, dtype=dtype)
        array[:count] = values.cpu().numpy().astype(dtype, copy=False)
        return array

    rows = {
        "regions/features": padded(
            detections.features[keep], (detections.features.shape[1],), np.float32, 0.0
        ),
        "regions/boxes": padded(detections.boxes[keep], (4,), np.float32, 0.0),
        "regions/count": np.asarray(count, dtype=np.int32),
        "regions/object_ids": padded(object_ids, (), np.int16, -1),
        "regions/object_scores": padded(object_scores, (), np.float32, 0.0),
        "regions/attribute_ids": padded(attribute_ids, (), np.int16, -1),
        "regions/attribute_scores": padded(attribute_scores, (), np.float32, 0.0),
    }
    if class_probs:
        rows["regions/class_probs"] = padded(
            detections.class_probs[keep], (NUM_CLASSES,), np.float32, 0.0
        )
    return rows


__all__ = [
    "NUM_ATTRIBUTE_CLASSES",
    "NUM_CLASSES",
    "PIXEL_MEAN_BGR",
    "DetectorConfig",
    "DetectorInput",
    "Detections",
    "VisualGenomeDetector",
    "detector_scale",
    "per_class_max_confidence",
    "prepare_image",
    "region_arrays",
    "select_regions",
]
