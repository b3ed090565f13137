"""The box head of the bottom-up-attention detector: RoI pooling, res5, classifiers.

Names follow MILVLG's ``BUACaffeRes5ROIHeads`` and ``BUACaffeFastRCNNOutputLayers`` so the
converted weights load by name (``roi_heads.res5.0.conv1.weight``,
``roi_heads.box_predictor.cls_score.weight``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from dsran.extract.detector_backbone import BACKBONE_STRIDE, RES5_CHANNELS, make_res5_head
from torch import nn
from torchvision.ops import roi_pool

NUM_CLASSES = 1601  # 1600 Visual Genome objects + background at index 0
NUM_ATTRIBUTE_CLASSES = 401  # 400 Visual Genome attributes + "no attribute" at index 0
CLASS_EMBEDDING_DIM = 256
ATTRIBUTE_HIDDEN_DIM = 512
POOLER_RESOLUTION = 14


class BoxPredictor(nn.Module):
    """Object classifier, class-specific box regression and the attribute head.

    The attribute head embeds the arg-max class of each box (background included),
    concatenates the embedding with the pooled feature, and applies Linear-ReLU-Linear,
    as the Caffe layers ``cls_embedding``, ``concat_pool5``, ``fc_attr`` and ``attr_score``.
    """

    def __init__(self, in_features: int = RES5_CHANNELS):
        super().__init__()
        self.cls_score = nn.Linear(in_features, NUM_CLASSES)
        self.bbox_pred = nn.Linear(in_features, NUM_CLASSES * 4)
        self.cls_embed = nn.Embedding(NUM_CLASSES, CLASS_EMBEDDING_DIM)
        self.attr_linear1 = nn.Linear(in_features + CLASS_EMBEDDING_DIM, ATTRIBUTE_HIDDEN_DIM)
        self.attr_linear2 = nn.Linear(ATTRIBUTE_HIDDEN_DIM, NUM_ATTRIBUTE_CLASSES)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, 2048) pooled features -> class probabilities (R, 1601), attribute probabilities (R, 401)."""
        class_logits = self.cls_score(features).float()
        predicted = class_logits.argmax(dim=1)
        embedded = self.cls_embed(predicted).to(features.dtype)
        hidden = F.relu(self.attr_linear1(torch.cat([features, embedded], dim=1)))
        attribute_logits = self.attr_linear2(hidden).float()
        return torch.softmax(class_logits, dim=1), torch.softmax(attribute_logits, dim=1)


@dataclass
class BoxHeadOutput:
    """Per-proposal outputs of the box head for one image (R proposals)."""

    features: torch.Tensor  # (R, 2048) float32, res5 output mean-pooled over 14x14
    class_probs: torch.Tensor  # (R, 1601) float32 softmax, background first
    attribute_probs: torch.Tensor  # (R, 401) float32 softmax, "no attribute" first


class Res5RoIHeads(nn.Module):
    """RoI max pooling 14x14 on res4, the res5 stage, spatial mean, then the predictors.

    ``roi_chunk`` proposals go through res5 at a time to bound memory: 300 RoIs of
    1024x14x14 float32 are about 240 MB before res5 widens them to 2048 channels.
    The bbox_pred layer is part of the published weights but box selection uses the
    proposal boxes, as the published extractors do, so regression is not computed.
    """

    def __init__(self, roi_chunk: int = 100):
        super().__init__()
        self.res5 = make_res5_head()
        self.box_predictor = BoxPredictor()
        self.roi_chunk = roi_chunk

    def forward(self, features: torch.Tensor, boxes: torch.Tensor) -> BoxHeadOutput:
        """Run the head on (P, 4) proposal boxes (resized-image pixels) of one (1, C, H, W) image."""
        # roi_pool has no reduced-precision CPU kernel; Caffe's ROIPooling rounds box
        # corners to feature cells the same way.
        res4 = features.float().contiguous()
        pooled_chunks = []
        for start in range(0, len(boxes), self.roi_chunk):
            chunk = boxes[start : start + self.roi_chunk].float()
            rois = torch.cat([chunk.new_zeros(len(chunk), 1), chunk], dim=1)
            pooled = roi_pool(res4, rois, POOLER_RESOLUTION, spatial_scale=1.0 / BACKBONE_STRIDE)
            if features.is_contiguous(memory_format=torch.channels_last):
                pooled = pooled.contiguous(memory_format=torch.channels_last)
            # Average in float32: 196 bfloat16 values would lose about 3 significant bits.
            pooled_chunks.append(self.res5(pooled).float().mean(dim=(2, 3)))
        if pooled_chunks:
            pooled_features = torch.cat(pooled_chunks)
        else:
            pooled_features = res4.new_zeros(0, RES5_CHANNELS)
        class_probs, attribute_probs = self.box_predictor(pooled_features)
        return BoxHeadOutput(pooled_features.float(), class_probs, attribute_probs)
