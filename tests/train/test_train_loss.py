"""The VSE++ hinge triplet loss."""

from __future__ import annotations

import pytest
import torch
from dsran.train.loss import TripletLoss, triplet_loss
from dsran.train.model import l2_normalize


def reference_loss(images, captions, image_ids, margin, negatives):
    """The loss written as loops over pairs."""
    scores = images @ captions.T
    total = 0.0
    n = len(scores)
    for i in range(n):
        caption_costs = [
            max(0.0, margin - scores[i, i].item() + scores[i, j].item())
            for j in range(n)
            if image_ids[j] != image_ids[i]
        ]
        image_costs = [
            max(0.0, margin - scores[i, i].item() + scores[j, i].item())
            for j in range(n)
            if image_ids[j] != image_ids[i]
        ]
        if negatives == "max":
            total += max(caption_costs, default=0.0) + max(image_costs, default=0.0)
        else:
            total += sum(caption_costs) + sum(image_costs)
    return total


def seeded_embeddings(n=6, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = l2_normalize(torch.randn(n, dim, generator=generator))
    captions = l2_normalize(images + 0.8 * torch.randn(n, dim, generator=generator))
    return images, captions


def test_identical_embeddings_give_twice_batch_times_margin():
    embeddings = l2_normalize(torch.ones(5, 4))
    loss = triplet_loss(embeddings, embeddings, margin=0.2)
    torch.testing.assert_close(loss, torch.tensor(2 * 5 * 0.2))


@pytest.mark.parametrize("negatives", ["max", "sum"])
def test_loss_matches_pairwise_reference(negatives):
    images, captions = seeded_embeddings()
    image_ids = torch.tensor([0, 1, 1, 2, 3, 3])
    loss = triplet_loss(images, captions, image_ids, margin=0.2, negatives=negatives)
    expected = reference_loss(images, captions, image_ids.tolist(), 0.2, negatives)
    torch.testing.assert_close(loss, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_loss_golden_values():
    images, captions = seeded_embeddings()
    torch.testing.assert_close(
        triplet_loss(images, captions), torch.tensor(GOLDEN_MAX), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        triplet_loss(images, captions, negatives="sum"),
        torch.tensor(GOLDEN_SUM),
        rtol=1e-5,
        atol=1e-6,
    )


GOLDEN_MAX = 1.943265438079834
GOLDEN_SUM = 4.120600700378418


def test_two_captions_of_one_image_are_not_negatives():
    # Captions 0 and 1 both describe image 0 and match it perfectly; image 1 is far away.
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    captions = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    same_image = torch.tensor([0, 0, 1])
    assert triplet_loss(images, captions, same_image, margin=0.2) == 0
    # Counted as negatives, the duplicates would each cost the full margin twice.
    torch.testing.assert_close(triplet_loss(images, captions, margin=0.2), torch.tensor(4 * 0.2))


def test_zero_embedding_row_keeps_loss_and_gradients_finite():
    raw = torch.randn(4, 8)
    raw[1] = 0
    raw.requires_grad_(True)
    captions = l2_normalize(torch.randn(4, 8))
    loss = triplet_loss(l2_normalize(raw), captions, torch.arange(4))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(raw.grad).all()


def test_module_and_invalid_negatives():
    images, captions = seeded_embeddings()
    torch.testing.assert_close(
        TripletLoss(0.2, "sum")(images, captions), triplet_loss(images, captions, negatives="sum")
    )
    with pytest.raises(ValueError, match="valid values: 'max', 'sum'"):
        TripletLoss(0.2, "mean")
    with pytest.raises(ValueError, match="invalid negatives 'all'"):
        triplet_loss(images, captions, negatives="all")
