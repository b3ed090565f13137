"""The DSRAN network: graph attention, BatchNorm, fusion, masks and the text branch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from dsran.train.batchnorm import MaskedBatchNorm
from dsran.train.loss import triplet_loss
from dsran.train.model import (
    FusionTree,
    GatedFusion,
    GraphAttentionLayer,
    build_grid_encoder,
    build_region_encoder,
    masked_mean,
)
from torch import nn


def reference_layer_forward(layer: GraphAttentionLayer, x: torch.Tensor) -> torch.Tensor:
    """The published layer written out step by step, with separate query, key and value
    projections and torch's BatchNorm1d over (B, D, N), reusing ``layer``'s parameters."""
    batch, nodes, dim = x.shape
    heads, head_dim = layer.heads, dim // layer.heads
    wq, wk, wv = layer.qkv.weight.chunk(3)
    bq, bk, bv = layer.qkv.bias.chunk(3)

    def split(t):
        return t.view(batch, nodes, heads, head_dim).permute(0, 2, 1, 3)

    q, k, v = split(x @ wq.T + bq), split(x @ wk.T + bk), split(x @ wv.T + bv)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    attended = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(batch, nodes, dim)

    def batch_norm(norm, t):
        reference = nn.BatchNorm1d(dim)
        reference.load_state_dict(norm.state_dict())
        reference.train(norm.training)
        return reference(t.permute(0, 2, 1)).permute(0, 2, 1)

    h = batch_norm(layer.attention_norm, layer.attention_out(attended) + x)
    out = layer.ffn_out(F.relu(layer.ffn_in(h)))
    return batch_norm(layer.ffn_norm, out + h)


@pytest.mark.parametrize("training", [True, False])
def test_gat_layer_matches_reference(training):
    torch.manual_seed(0)
    layer = GraphAttentionLayer(32, heads=8, dropout=0.0)
    with torch.no_grad():
        for norm in (layer.attention_norm, layer.ffn_norm):
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.normal_()
            norm.bias.normal_()
    layer.train(training)
    x = torch.randn(3, 7, 32, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)

    out = layer(x)
    expected = reference_layer_forward(layer, x_ref)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)


def test_gat_layer_golden_values():
    torch.manual_seed(0)
    layer = GraphAttentionLayer(16, heads=8, dropout=0.2).eval()
    x = torch.randn(2, 5, 16)
    out = layer(x)
    assert out.shape == (2, 5, 16)
    # Eval mode: BatchNorm uses its initial running statistics (mean 0, var 1).
    torch.testing.assert_close(out.sum(), torch.tensor(GOLDEN_GAT_SUM), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0, 0, :4], torch.tensor(GOLDEN_GAT_ROW), rtol=1e-5, atol=1e-5)

    layer.train()
    torch.manual_seed(1)
    out = layer(x)
    torch.testing.assert_close(
        out.abs().sum(), torch.tensor(GOLDEN_GAT_TRAIN_ABS_SUM), rtol=1e-5, atol=1e-4
    )


GOLDEN_GAT_SUM = 12.387092590332031
GOLDEN_GAT_ROW = [1.297890543937683, 0.8203868865966797, 0.09762774407863617, 0.3368958532810211]
GOLDEN_GAT_TRAIN_ABS_SUM = 129.00473022460938


def test_masked_batchnorm_matches_torch_on_real_nodes():
    torch.manual_seed(0)
    ours, reference = MaskedBatchNorm(8), nn.BatchNorm1d(8)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(4, 6, 8, requires_grad=True)
    mask = torch.arange(6).unsqueeze(0) < torch.tensor([[6], [3], [1], [5]])
    x_real = x.detach()[mask].clone().requires_grad_(True)

    out = ours(x, mask)
    expected = reference(x_real)
    torch.testing.assert_close(out[mask], expected, rtol=1e-5, atol=1e-5)
    assert out[~mask].abs().max() == 0

    weights = torch.randn_like(expected)
    (out[mask] * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(x.grad[mask], x_real.grad, rtol=1e-4, atol=1e-5)
    assert x.grad[~mask].abs().max() == 0
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.bias.grad, reference.bias.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, reference.running_mean)
    torch.testing.assert_close(ours.running_var, reference.running_var)

    ours.eval(), reference.eval()
    torch.testing.assert_close(ours(x.detach())[0], reference(x.detach()[0]), rtol=1e-5, atol=1e-5)


def test_masked_batchnorm_bf16_close_to_fp32():
    torch.manual_seed(0)
    norm = MaskedBatchNorm(16)
    x = torch.randn(8, 10, 16) * 3 + 1
    out32 = norm(x)
    out16 = norm(x.bfloat16())
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), out32, rtol=0.02, atol=0.05)


def test_gated_fusion_golden_values():
    torch.manual_seed(0)
    fusion = GatedFusion(6)
    a, b = torch.randn(2, 6), torch.randn(2, 6)
    out = fusion(a, b)
    a2, b2 = fusion.project_a(a), fusion.project_b(b)
    gate = torch.sigmoid(fusion.gate_a(a2) + fusion.gate_b(b2))
    torch.testing.assert_close(out, gate * a2 + (1 - gate) * b2)
    torch.testing.assert_close(out.sum(), torch.tensor(GOLDEN_FUSION_SUM), rtol=1e-5, atol=1e-5)


GOLDEN_FUSION_SUM = 0.5695145726203918


def test_fusion_tree_structure():
    torch.manual_seed(0)
    vectors = [torch.randn(3, 8) for _ in range(4)]
    assert FusionTree(1, 8)(vectors[:1]) is vectors[0]
    two = FusionTree(2, 8)
    torch.testing.assert_close(two(vectors[:2]), two.pairs[0](vectors[0], vectors[1]))
    four = FusionTree(4, 8)
    left = four.pairs[0](vectors[0], vectors[1])
    right = four.pairs[1](vectors[2], vectors[3])
    torch.testing.assert_close(four(vectors), four.root(left, right))
    assert sum(p.numel() for p in four.parameters()) == 3 * 4 * (8 * 8 + 8)
    with pytest.raises(ValueError, match="valid: 1, 2, 4"):
        FusionTree(3, 8)


def test_encoder_factories_reject_unknown_names():
    with pytest.raises(ValueError, match="valid names: paper, official"):
        build_grid_encoder("resnet", 8)
    with pytest.raises(ValueError, match="valid names: paper"):
        build_region_encoder("mlp", 8)


def test_masked_mean_ignores_padding_and_empty_sets():
    x = torch.tensor([[[1.0], [3.0], [100.0]], [[5.0], [7.0], [9.0]], [[2.0], [2.0], [2.0]]])
    mask = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor([[2.0], [7.0], [0.0]]))


def _image_arrays(
    regions: torch.Tensor, count: torch.Tensor, grid: torch.Tensor
) -> dict[str, torch.Tensor]:
    return {"grid/features": grid, "regions/features": regions, "regions/count": count}


@pytest.mark.parametrize("training", [True, False])
def test_region_padding_to_100_changes_nothing(small_model, training):
    model = small_model(gat_dropout=0.0, jsr_branches=4, ssr_layers=2)
    model.train(training)
    torch.manual_seed(1)
    counts = torch.tensor([37, 12])
    grid = torch.randn(2, 49, 2048)
    padded = torch.zeros(2, 100, 2048)
    for i, count in enumerate(counts):
        padded[i, :count] = torch.randn(int(count), 2048)
    # Padding rows hold garbage, which the mask must hide.
    garbage = padded.clone()
    garbage[0, 37:] = 1e3
    garbage[1, 12:] = -7.0

    if training:
        # Training-mode BatchNorm statistics depend on the batch: compare one image.
        unpadded = model.encode_images(_image_arrays(padded[:1, :37], counts[:1], grid[:1]))
        full = model.encode_images(_image_arrays(garbage[:1], counts[:1], grid[:1]))
        torch.testing.assert_close(full, unpadded, rtol=1e-4, atol=1e-5)
        return
    with torch.no_grad():
        together = model.encode_images(_image_arrays(garbage, counts, grid))
        for i, count in enumerate(counts.tolist()):
            alone = model.encode_images(
                _image_arrays(padded[i : i + 1, :count], counts[i : i + 1], grid[i : i + 1])
            )
            torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-4, atol=1e-5)


def test_caption_alone_equals_caption_in_longer_batch(small_model, tokenizer):
    from dsran.train.encode import encode_captions

    for pooling in ("official", "paper"):
        model = small_model(text_pooling=pooling)
        short = "a dog on a beach"
        long = "a large brown dog runs along a sandy beach next to the blue ocean waves at sunset"
        alone = encode_captions(model, tokenizer, [short], max_length=32, precision="fp32")
        batched = encode_captions(model, tokenizer, [long, short], max_length=32, precision="fp32")
        torch.testing.assert_close(batched[1:], alone, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(batched[0], batched[1])
        torch.testing.assert_close(alone.norm(dim=1), torch.ones(1))


def test_paper_pooling_fuses_means_before_and_after_attention(small_model, tokenizer):
    model = small_model(text_pooling="paper").eval()
    encoded = tokenizer(["two cats on a sofa", "a cat"], padding=True, return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    text = model.text_encoder
    with torch.no_grad():
        words = text.project(text.backbone(input_ids=ids, attention_mask=mask).last_hidden_state)
        attended = text.gat(words, mask.bool())
        expected = text.fusion(masked_mean(words, mask.bool()), masked_mean(attended, mask.bool()))
        torch.testing.assert_close(text(ids, mask), expected)


def test_all_zero_image_keeps_loss_and_gradients_finite(small_model, tokenizer):
    model = small_model().train()
    torch.manual_seed(2)
    grid = torch.randn(4, 49, 2048)
    regions = torch.randn(4, 100, 2048)
    counts = torch.tensor([100, 20, 0, 55])
    grid[2] = 0
    regions[2] = 0
    encoded = tokenizer(
        ["a dog", "a red car", "nothing", "two birds"], padding=True, return_tensors="pt"
    )
    batch = {
        **_image_arrays(regions, counts, grid),
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
    }
    images, captions = model(batch)
    assert torch.isfinite(images).all()
    loss = triplet_loss(images, captions, torch.arange(4))
    assert torch.isfinite(loss)
    loss.backward()
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert torch.isfinite(parameter.grad).all(), name


def test_grid_only_and_region_only_models(small_model):
    torch.manual_seed(0)
    arrays = _image_arrays(
        torch.randn(3, 100, 2048), torch.tensor([5, 100, 40]), torch.randn(3, 49, 2048)
    )
    for use_grid, use_regions, expected in [
        (True, False, ("grid/features",)),
        (False, True, ("regions/features", "regions/count")),
    ]:
        model = small_model(use_grid=use_grid, use_regions=use_regions).eval()
        assert model.store_arrays == expected
        with torch.no_grad():
            embeddings = model.encode_images(arrays)
        assert embeddings.shape == (3, 64)
        torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(3))
