"""The hinge triplet loss of VSE++ (Faghri et al. 2018) over a batch of matching pairs."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def triplet_loss(
    image_embeddings: Tensor,
    caption_embeddings: Tensor,
    image_ids: Tensor | None = None,
    margin: float = 0.2,
    negatives: str = "max",
) -> Tensor:
    """Sum over the batch of the hinge losses of every positive pair ``(i, i)``.

    ``image_embeddings`` and ``caption_embeddings`` are ``(B, D)``, L2-normalised, row
    ``i`` of each forming a positive pair; ``image_ids`` ``(B,)`` names the image of
    each pair, and pairs of the same image are never negatives of each other (with
    ``None`` every off-diagonal pair is a negative). For each pair the caption-side term
    is ``[margin - s(i, i) + s(i, j)]+`` over negative captions ``j`` and the image-side
    term ``[margin - s(i, i) + s(j, i)]+`` over negative images ``j``; ``negatives="max"``
    keeps the hardest negative of each term and ``"sum"`` adds them all.
    """
    if negatives not in ("max", "sum"):
        raise ValueError(f"invalid negatives {negatives!r}; valid values: 'max', 'sum'")
    scores = image_embeddings.float() @ caption_embeddings.float().T
    positive = scores.diagonal()
    if image_ids is None:
        same_image = torch.eye(len(scores), dtype=torch.bool, device=scores.device)
    else:
        same_image = image_ids.unsqueeze(0) == image_ids.unsqueeze(1)

    # Row i: image i against every caption; column i: caption i against every image.
    caption_cost = (margin + scores - positive.unsqueeze(1)).clamp(min=0).masked_fill(same_image, 0)
    image_cost = (margin + scores - positive.unsqueeze(0)).clamp(min=0).masked_fill(same_image, 0)
    if negatives == "max":
        return caption_cost.max(dim=1).values.sum() + image_cost.max(dim=0).values.sum()
    return caption_cost.sum() + image_cost.sum()


class TripletLoss(nn.Module):
    """:func:`triplet_loss` with a fixed margin and negatives rule."""

    def __init__(self, margin: float = 0.2, negatives: str = "max"):
        super().__init__()
        if negatives not in ("max", "sum"):
            raise ValueError(f"invalid negatives {negatives!r}; valid values: 'max', 'sum'")
        self.margin, self.negatives = margin, negatives

    def forward(
        self, image_embeddings: Tensor, caption_embeddings: Tensor, image_ids: Tensor | None = None
    ):
        return triplet_loss(
            image_embeddings, caption_embeddings, image_ids, self.margin, self.negatives
        )
