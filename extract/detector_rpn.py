"""The region proposal network of the bottom-up-attention detector, with Caffe's box conventions.

The Caffe model was trained with the py-faster-rcnn box arithmetic: a box from x1 to x2
is ``x2 - x1 + 1`` pixels wide, and anchors come from ``generate_anchors`` (a 16-pixel
base box, rounded aspect ratios, ratio-major order). The converted weights keep Caffe's
channel layout, so the anchor order below must stay as it is.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import nms

# Largest log-scale change of a box side that decoding allows (a 16-pixel anchor grows
# to at most 1000 pixels), the clamp of MILVLG's BUABox2BoxTransform.
SCALE_CLAMP = math.log(1000.0 / 16)


def caffe_cell_anchors(
    base_size: int = 16,
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
    scales: tuple[int, ...] = (4, 8, 16, 32),
) -> torch.Tensor:
    """Return the (A, 4) anchors of one feature cell as py-faster-rcnn's ``generate_anchors`` builds them.

    Order: aspect ratio major, scale minor. Sides are rounded per aspect ratio before
    scaling (ratio 0.5 gives 23x12 base pixels, not 22.6x11.3), and every anchor is
    centred on pixel 7.5 of the first 16x16 cell.

    NOTE: MILVLG's config lists anchor SIZES [[4, 8, 16, 32]], which detectron2's
    DefaultAnchorGenerator would read as pixel sides in size-major order. These anchors
    follow the Caffe proposal layer the weights were trained with (scales of a 16-pixel
    base, ratio-major), and no real checkpoint was available here to confirm which of
    the two the converted weights expect.
    """
    center = (base_size - 1) / 2
    anchors = []
    for ratio in aspect_ratios:
        # np.round rounds half to even, like the numpy code the model was trained with.
        width = float(np.round(np.sqrt(base_size * base_size / ratio)))
        height = float(np.round(width * ratio))
        for scale in scales:
            w, h = width * scale, height * scale
            anchors.append(
                [
                    center - 0.5 * (w - 1),
                    center - 0.5 * (h - 1),
                    center + 0.5 * (w - 1),
                    center + 0.5 * (h - 1),
                ]
            )
    return torch.tensor(anchors, dtype=torch.float32)


def grid_anchors(cell_anchors: torch.Tensor, height: int, width: int, stride: int) -> torch.Tensor:
    """Tile (A, 4) cell anchors over a (height, width) feature map: (height * width * A, 4).

    Rows run over y, then x, then anchor, the order of the flattened RPN outputs.
    """
    shifts_x = torch.arange(width, dtype=torch.float32) * stride
    shifts_y = torch.arange(height, dtype=torch.float32) * stride
    shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=-1).reshape(-1, 1, 4)
    return (shifts + cell_anchors.view(1, -1, 4)).reshape(-1, 4)


def decode_boxes(deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Apply (N, 4) deltas (dx, dy, dw, dh) to (N, 4) boxes with Caffe's +1 widths.

    The weights of the deltas are (1, 1, 1, 1) in both the RPN and the box head of the
    published model, so none are applied.
    """
    widths = boxes[:, 2] - boxes[:, 0] + 1.0
    heights = boxes[:, 3] - boxes[:, 1] + 1.0
    center_x = boxes[:, 0] + 0.5 * widths
    center_y = boxes[:, 1] + 0.5 * heights

    dx, dy = deltas[:, 0], deltas[:, 1]
    dw = deltas[:, 2].clamp(max=SCALE_CLAMP)
    dh = deltas[:, 3].clamp(max=SCALE_CLAMP)

    new_center_x = dx * widths + center_x
    new_center_y = dy * heights + center_y
    new_widths = torch.exp(dw) * widths
    new_heights = torch.exp(dh) * heights
    return torch.stack(
        [
            new_center_x - 0.5 * new_widths,
            new_center_y - 0.5 * new_heights,
            new_center_x + 0.5 * new_widths,
            new_center_y + 0.5 * new_heights,
        ],
        dim=1,
    )


def clip_boxes(boxes: torch.Tensor, height: float, width: float) -> torch.Tensor:
    """Clip (N, 4) boxes to pixel indices 0..width - 1 and 0..height - 1 (Caffe's clip)."""
    x = boxes[:, 0::2].clamp(min=0, max=width - 1)
    y = boxes[:, 1::2].clamp(min=0, max=height - 1)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


def legacy_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Non-maximum suppression with Caffe's +1 box areas; returns kept indices by decreasing score.

    Adding one pixel to x2 and y2 makes torchvision's IoU equal the legacy one exactly.
    torchvision suppresses at IoU > threshold where the Caffe kernel used >=, which only
    differs for an IoU of exactly the threshold.
    """
    widened = boxes.clone()
    widened[:, 2:] += 1.0
    return nms(widened, scores, iou_threshold)


class RPNHead(nn.Module):
    """3x3 convolution with ReLU, then 1x1 convolutions for objectness and anchor deltas.

    Objectness has two channels per anchor laid out as Caffe's ``rpn_cls_score``: the A
    background logits first, then the A foreground logits.
    """

    def __init__(self, in_channels: int, hidden_channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden_channels, kernel_size=3, padding=1)
        self.objectness_logits = nn.Conv2d(hidden_channels, 2 * num_anchors, kernel_size=1)
        self.anchor_deltas = nn.Conv2d(hidden_channels, 4 * num_anchors, kernel_size=1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> objectness logits (B, 2A, H, W) and deltas (B, 4A, H, W)."""
        hidden = F.relu(self.conv(features))
        return self.objectness_logits(hidden), self.anchor_deltas(hidden)


class RegionProposalNetwork(nn.Module):
    """Turn res4 features into at most ``post_nms_topk`` proposals per image.

    Steps per image, as in the Caffe proposal layer and MILVLG's ``BUARPN``: decode every
    anchor, clip to the image, drop boxes narrower or shorter than ``min_box_size``
    (scaled to the resized image), keep the ``pre_nms_topk`` best by foreground
    probability, run NMS at ``nms_threshold`` and keep the ``post_nms_topk`` best.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        stride: int,
        pre_nms_topk: int,
        post_nms_topk: int,
        nms_threshold: float,
        min_box_size: float,
    ):
        super().__init__()
        self.register_buffer("cell_anchors", caffe_cell_anchors(), persistent=False)
        self.rpn_head = RPNHead(in_channels, hidden_channels, len(self.cell_anchors))
        self.stride = stride
        self.pre_nms_topk = pre_nms_topk
        self.post_nms_topk = post_nms_topk
        self.nms_threshold = nms_threshold
        self.min_box_size = min_box_size

    def forward(
        self, features: torch.Tensor, image_height: int, image_width: int, image_scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Propose boxes for one image.

        Args:
            features: (1, C, H, W) res4 features of the resized image.
            image_height, image_width: size of the resized image, before any padding.
            image_scale: resized size / original size, which scales ``min_box_size``.

        Returns:
            boxes (P, 4) float32 in resized-image pixels and their foreground
            probabilities (P,), best first, P <= post_nms_topk.
        """
        logits, deltas = self.rpn_head(features)
        num_anchors = len(self.cell_anchors)
        _, _, height, width = logits.shape
        logits = logits.float().view(2, num_anchors, height, width)
        foreground = torch.softmax(logits, dim=0)[1].permute(1, 2, 0).reshape(-1)
        deltas = deltas.float().view(num_anchors, 4, height, width).permute(2, 3, 0, 1)
        deltas = deltas.reshape(-1, 4)

        anchors = grid_anchors(self.cell_anchors.cpu(), height, width, self.stride)
        boxes = decode_boxes(deltas, anchors.to(deltas.device))
        boxes = clip_boxes(boxes, image_height, image_width)

        min_side = self.min_box_size * image_scale
        box_widths = boxes[:, 2] - boxes[:, 0]
        box_heights = boxes[:, 3] - boxes[:, 1]
        valid = (box_widths > 0) & (box_heights > 0)
        valid &= (box_widths + 1 > min_side) & (box_heights + 1 > min_side)
        boxes, foreground = boxes[valid], foreground[valid]

        order = torch.argsort(foreground, descending=True, stable=True)[: self.pre_nms_topk]
        boxes, foreground = boxes[order], foreground[order]
        keep = legacy_nms(boxes, foreground, self.nms_threshold)[: self.post_nms_topk]
        return boxes[keep], foreground[keep]
