"""The DSRAN network: feature encoders, graph attention, SSR, JSR, gated fusion, text branch.

Shapes use B for the batch, N for nodes of a graph, D for the embedding size. A node
mask ``(B, N)`` is True on real nodes and False on padding (regions beyond
``regions/count``, text padding). Padding is excluded from attention keys, from
BatchNorm statistics and from mean pooling, so a padded set gives the numbers of the
unpadded set.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from dsran.train.batchnorm import MaskedBatchNorm
from dsran.train.config import ModelConfig
from torch import Tensor, nn

logger = logging.getLogger(__name__)

STORE_FEATURE_DIM = 2048
# Object classes of the Visual Genome detector, background included (regions/class_probs).
NUM_OBJECT_CLASSES = 1601
# Box values per region that the authors' region encoder reads: x1, y1, x2, y2 scaled by
# the largest coordinate, relative area, confidence.
NUM_BOX_VALUES = 6
# The authors' region encoder adds this to the largest box coordinate before dividing.
BOX_SCALE_EPS = 1e-5


def l2_normalize(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Divide rows by their L2 norm plus ``eps`` in fp32, so that an all-zero row stays zero."""
    x = x.float()
    return x / (x.norm(dim=-1, keepdim=True) + eps)


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over real nodes: ``(B, N, D)`` with mask ``(B, N)`` -> ``(B, D)``.

    A row with no real node gives zeros.
    """
    if mask is None:
        return x.mean(dim=1)
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def _all_real(mask: Tensor | None) -> bool:
    return mask is None or bool(mask.all())


class GraphAttentionLayer(nn.Module):
    """Multi-head attention over a fully connected graph, in the authors' published form.

    ``h = BN(x + Dropout(Linear(Attention(x))))``, then
    ``out = BN(h + Dropout(Linear(ReLU(Linear(h)))))``; attention weights are dropped out
    with the same rate. Query, key and value share one fused projection.
    """

    def __init__(self, dim: int, heads: int = 8, dropout: float = 0.2):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} does not divide by heads {heads}")
        self.dim, self.heads, self.dropout = dim, heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attention_out = nn.Linear(dim, dim)
        self.attention_norm = MaskedBatchNorm(dim)
        self.ffn_in = nn.Linear(dim, dim)
        self.ffn_out = nn.Linear(dim, dim)
        self.ffn_norm = MaskedBatchNorm(dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``(B, N, D)`` nodes and a ``(B, N)`` mask of real nodes -> ``(B, N, D)``."""
        if _all_real(mask):
            mask = None
        batch, nodes, dim = x.shape
        head_dim = dim // self.heads

        # 1. Scaled dot-product attention of every node over the real nodes of its set.
        qkv = self.qkv(x).view(batch, nodes, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        attention_mask = None
        if mask is not None:
            # A set with no real node would give a softmax over nothing (NaN); let it
            # attend to its padding instead, whose outputs are then discarded.
            empty = ~mask.any(dim=1, keepdim=True)
            attention_mask = (mask | empty)[:, None, None, :]
        # NOTE: with dropout in training, PyTorch's CPU attention leaves its fused kernel
        # for the unfused path, about a quarter of this layer's time on a 2-core CPU.
        attended = F.scaled_dot_product_attention(
            qkv[0],
            qkv[1],
            qkv[2],
            attn_mask=attention_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        attended = attended.transpose(1, 2).reshape(batch, nodes, dim)

        # 2. Projection, dropout and BatchNorm over the residual sum.
        h = F.dropout(self.attention_out(attended), self.dropout, self.training)
        h = self.attention_norm(h + x, mask)

        # 3. Feed-forward block with the same residual form.
        out = self.ffn_out(F.relu(self.ffn_in(h)))
        out = F.dropout(out, self.dropout, self.training)
        return self.ffn_norm(out + h, mask)


class GraphAttentionStack(nn.Module):
    """``layers`` graph-attention layers applied in sequence; zero layers is the identity."""

    def __init__(self, layers: int, dim: int, heads: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(GraphAttentionLayer(dim, heads, dropout) for _ in range(layers))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x


class GatedFusion(nn.Module):
    """Fuse two vectors: ``a' = Wa a``, ``b' = Wb b``, ``t = sigmoid(W0 a' + W1 b')``,
    result ``t * a' + (1 - t) * b'``. Inputs and output are ``(B, D)``."""

    def __init__(self, dim: int):
        super().__init__()
        self.project_a = nn.Linear(dim, dim)
        self.project_b = nn.Linear(dim, dim)
        self.gate_a = nn.Linear(dim, dim)
        self.gate_b = nn.Linear(dim, dim)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        a, b = self.project_a(a), self.project_b(b)
        gate = torch.sigmoid(self.gate_a(a) + self.gate_b(b))
        return gate * a + (1.0 - gate) * b


class FusionTree(nn.Module):
    """Combine K branch vectors: K = 1 passes it through, K = 2 fuses the pair, and K = 4
    fuses branches (1, 2) and (3, 4) and then the two results."""

    def __init__(self, branches: int, dim: int):
        super().__init__()
        if branches not in (1, 2, 4):
            raise ValueError(f"invalid number of branches {branches}; valid: 1, 2, 4")
        self.branches = branches
        self.pairs = nn.ModuleList(GatedFusion(dim) for _ in range(branches // 2))
        self.root = GatedFusion(dim) if branches == 4 else None

    def forward(self, vectors: list[Tensor]) -> Tensor:
        """``K`` tensors ``(B, D)`` -> ``(B, D)``."""
        if len(vectors) != self.branches:
            raise ValueError(f"expected {self.branches} branch vectors, got {len(vectors)}")
        if self.branches == 1:
            return vectors[0]
        fused = [pair(vectors[2 * i], vectors[2 * i + 1]) for i, pair in enumerate(self.pairs)]
        return fused[0] if self.root is None else self.root(fused[0], fused[1])


# ---------------------------------------------------------------------- feature encoders
#
# Encoders map store arrays of one image set to ``(B, N, D)`` nodes. Each declares the
# store arrays it reads, so the data loader reads exactly those (any per-image array of
# the store, e.g. regions/boxes, regions/class_probs, images/width). A new variant is one
# class and one registry entry. Region encoders must list regions/count, which masks
# the padding.


class LinearGridEncoder(nn.Module):
    """Grid cells ``(B, 49, 2048)`` -> ``(B, 49, D)`` with one Linear layer."""

    store_arrays = ("grid/features",)

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(STORE_FEATURE_DIM, dim)

    def forward(self, arrays: Mapping[str, Tensor]) -> Tensor:
        return self.fc(arrays["grid/features"])


class OfficialGridEncoder(LinearGridEncoder):
    """The authors' grid encoder: Linear, ReLU and Dropout 0.1."""

    def __init__(self, dim: int, dropout: float = 0.1):
        super().__init__(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, arrays: Mapping[str, Tensor]) -> Tensor:
        return self.dropout(F.relu(super().forward(arrays)))


class LinearRegionEncoder(nn.Module):
    """Region features ``(B, K, 2048)`` -> ``(B, K, D)`` with one Linear layer."""

    store_arrays = ("regions/features", "regions/count")

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(STORE_FEATURE_DIM, dim)

    def forward(self, arrays: Mapping[str, Tensor]) -> Tensor:
        return self.fc(arrays["regions/features"])


def official_box_inputs(
    boxes: Tensor, object_scores: Tensor, class_probs: Tensor, count: Tensor
) -> Tensor:
    """Build the authors' per-region input of box values and class probabilities.

    ``boxes`` ``(B, K, 4)`` x1, y1, x2, y2 in pixels, ``object_scores`` ``(B, K)``,
    ``class_probs`` ``(B, K, 1601)`` and ``count`` ``(B,)`` -> ``(B, K, 6 + 1601)``.
    x and y are divided by the largest x and y coordinate of the image's real boxes
    (plus 1e-5), not by the image size. The six values are the scaled box, its area after
    scaling (clamped at 0) and the confidence, each row layer-normalised on its own, as
    are the class probabilities. Padded regions get the values of an all-zero box.

    NOTE: the store keeps class probabilities in float16 (relative error up to about
    5e-4), so these inputs differ slightly from the authors' float32 ones.
    """
    boxes = boxes.float()
    real = region_mask(count, boxes.shape[1]).unsqueeze(-1)
    real_boxes = boxes.masked_fill(~real, 0.0)
    width = real_boxes[..., 0::2].amax(dim=(1, 2)) + BOX_SCALE_EPS
    height = real_boxes[..., 1::2].amax(dim=(1, 2)) + BOX_SCALE_EPS
    scale = torch.stack([width, height, width, height], dim=-1).unsqueeze(1)
    scaled = real_boxes / scale
    area = ((scaled[..., 3] - scaled[..., 1]) * (scaled[..., 2] - scaled[..., 0])).clamp(min=0.0)
    confidence = object_scores.float().masked_fill(~real.squeeze(-1), 0.0)
    values = torch.cat([scaled, area.unsqueeze(-1), confidence.unsqueeze(-1)], dim=-1)
    probabilities = class_probs.float().masked_fill(~real, 0.0)
    return torch.cat(
        [
            F.layer_norm(values, (NUM_BOX_VALUES,)),
            F.layer_norm(probabilities, (probabilities.shape[-1],)),
        ],
        dim=-1,
    )


class OfficialRegionEncoder(nn.Module):
    """The authors' region encoder: ``MLP(features) + Linear(box values, class probs)``.

    Features ``(B, K, 2048)`` go through Linear 2048-2048, ReLU, Linear 2048-D, ReLU and
    Dropout 0.1; the ``(B, K, 6 + 1601)`` inputs of :func:`official_box_inputs` go
    through Linear, ReLU and Dropout 0.1; the sum is ``(B, K, D)``.
    """

    store_arrays = (
        "regions/features",
        "regions/count",
        "regions/boxes",
        "regions/object_scores",
        "regions/class_probs",
    )

    def __init__(self, dim: int, dropout: float = 0.1):
        super().__init__()
        self.feature_mlp = nn.Sequential(
            nn.Linear(STORE_FEATURE_DIM, STORE_FEATURE_DIM),
            nn.ReLU(),
            nn.Linear(STORE_FEATURE_DIM, dim),
            nn.ReLU(),
            nn.Dropout(dropout),
        )
        self.box_fc = nn.Sequential(
            nn.Linear(NUM_BOX_VALUES + NUM_OBJECT_CLASSES, dim), nn.ReLU(), nn.Dropout(dropout)
        )

    def forward(self, arrays: Mapping[str, Tensor]) -> Tensor:
        box_inputs = official_box_inputs(
            arrays["regions/boxes"],
            arrays["regions/object_scores"],
            arrays["regions/class_probs"],
            arrays["regions/count"],
        )
        return self.feature_mlp(arrays["regions/features"]) + self.box_fc(box_inputs)


GRID_ENCODERS: dict[str, type[nn.Module]] = {
    "paper": LinearGridEncoder,
    "official": OfficialGridEncoder,
}
REGION_ENCODERS: dict[str, type[nn.Module]] = {
    "paper": LinearRegionEncoder,
    "official": OfficialRegionEncoder,
}


def build_grid_encoder(name: str, dim: int) -> nn.Module:
    if name not in GRID_ENCODERS:
        raise ValueError(f"unknown grid encoder {name!r}; valid names: {', '.join(GRID_ENCODERS)}")
    return GRID_ENCODERS[name](dim)


def build_region_encoder(name: str, dim: int) -> nn.Module:
    if name not in REGION_ENCODERS:
        raise ValueError(
            f"unknown region encoder {name!r}; valid names: {', '.join(REGION_ENCODERS)}"
        )
    return REGION_ENCODERS[name](dim)


def required_store_arrays(config: ModelConfig) -> tuple[str, ...]:
    """Store arrays that the image encoders of ``config`` read; rejects unknown encoder names."""
    names: list[str] = []
    if config.use_grid:
        if config.grid_encoder not in GRID_ENCODERS:
            raise ValueError(
                f"unknown grid encoder {config.grid_encoder!r}; valid names: {', '.join(GRID_ENCODERS)}"
            )
        names += GRID_ENCODERS[config.grid_encoder].store_arrays
    if config.use_regions:
        if config.region_encoder not in REGION_ENCODERS:
            raise ValueError(
                f"unknown region encoder {config.region_encoder!r}; valid names: {', '.join(REGION_ENCODERS)}"
            )
        names += REGION_ENCODERS[config.region_encoder].store_arrays
    return tuple(names)


def region_mask(count: Tensor, max_regions: int) -> Tensor:
    """``(B,)`` region counts -> ``(B, K)`` mask, True on the first ``count`` regions."""
    positions = torch.arange(max_regions, device=count.device)
    return positions.unsqueeze(0) < count.unsqueeze(1)


# ---------------------------------------------------------------------- image and text


class ImageEncoder(nn.Module):
    """Grid and region sets -> SSR -> joint graph -> K JSR branches -> fused ``(B, D)``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim, heads, dropout = config.embed_size, config.gat_heads, config.gat_dropout
        self.grid_encoder = (
            build_grid_encoder(config.grid_encoder, dim) if config.use_grid else None
        )
        self.region_encoder = (
            build_region_encoder(config.region_encoder, dim) if config.use_regions else None
        )
        self.grid_ssr = (
            GraphAttentionStack(config.ssr_layers, dim, heads, dropout) if config.use_grid else None
        )
        self.region_ssr = (
            GraphAttentionStack(config.ssr_layers, dim, heads, dropout)
            if config.use_regions
            else None
        )
        self.jsr_branches = nn.ModuleList(
            GraphAttentionLayer(dim, heads, dropout) for _ in range(config.jsr_branches)
        )
        self.fusion = FusionTree(config.jsr_branches, dim)
        self.official_masking = config.official_masking

    @property
    def store_arrays(self) -> tuple[str, ...]:
        """Store arrays of one image that :meth:`forward` reads."""
        names: list[str] = []
        for encoder in (self.grid_encoder, self.region_encoder):
            if encoder is not None:
                names += encoder.store_arrays
        return tuple(names)

    def forward(self, arrays: Mapping[str, Tensor]) -> Tensor:
        """Store arrays of B images (``grid/features`` ``(B, 49, 2048)``,
        ``regions/features`` ``(B, K, 2048)``, ``regions/count`` ``(B,)``) -> ``(B, D)``."""
        node_sets: list[Tensor] = []
        masks: list[Tensor | None] = []
        if self.grid_encoder is not None:
            node_sets.append(self.grid_ssr(self.grid_encoder(arrays)))
            masks.append(None)
        if self.region_encoder is not None:
            regions = self.region_encoder(arrays)
            mask = None
            # NOTE: the authors' features have the same number of boxes for every image, so
            # with official_masking an image with fewer boxes gets padded nodes they never saw.
            if not self.official_masking:
                mask = region_mask(arrays["regions/count"], regions.shape[1])
            node_sets.append(self.region_ssr(regions, mask))
            masks.append(mask)

        # The joint graph: grid and region nodes concatenated along the node axis.
        joint = torch.cat(node_sets, dim=1)
        joint_mask = None
        if any(mask is not None for mask in masks):
            joint_mask = torch.cat(
                [
                    mask if mask is not None else nodes.new_ones(nodes.shape[:2], dtype=torch.bool)
                    for nodes, mask in zip(node_sets, masks, strict=True)
                ],
                dim=1,
            )
        branches = [
            masked_mean(layer(joint, joint_mask), joint_mask) for layer in self.jsr_branches
        ]
        return self.fusion(branches)


class TextEncoder(nn.Module):
    """A transformers encoder, Linear + ReLU + Dropout, one graph-attention layer, pooling."""

    def __init__(self, config: ModelConfig, backbone: nn.Module):
        super().__init__()
        dim = config.embed_size
        if getattr(backbone, "pooler", None) is not None:
            # The pooled [CLS] output is unused. Its parameters would get no gradient,
            # which DistributedDataParallel rejects.
            backbone.pooler = None
        self.backbone = backbone
        hidden = int(backbone.config.hidden_size)
        self.project = nn.Sequential(
            nn.Linear(hidden, dim), nn.ReLU(), nn.Dropout(config.text_dropout)
        )
        self.gat = GraphAttentionLayer(dim, config.gat_heads, config.gat_dropout)
        self.pooling = config.text_pooling
        if self.pooling not in ("official", "paper"):
            raise ValueError(f"unknown text pooling {self.pooling!r}; valid: 'official', 'paper'")
        self.fusion = GatedFusion(dim) if self.pooling == "paper" else None
        self.official_masking = config.official_masking
        if not config.finetune_text:
            for parameter in self.backbone.parameters():
                parameter.requires_grad_(False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token ids and mask ``(B, L)`` -> ``(B, D)``.

        With ``official_masking`` the mask is ignored: every position is attended to and
        pooled, padding included.
        """
        if self.official_masking:
            states = self.backbone(input_ids=input_ids).last_hidden_state
            mask = None
        else:
            states = self.backbone(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state
            mask = attention_mask.bool()
        words = self.project(states)
        attended = self.gat(words, mask)
        if self.fusion is None:
            return masked_mean(attended, mask)
        # Fusion of the means before and after the graph-attention layer.
        return self.fusion(masked_mean(words, mask), masked_mean(attended, mask))


class DSRAN(nn.Module):
    """Image and caption embeddings in one space; similarity is their dot product."""

    def __init__(self, config: ModelConfig, text_backbone: nn.Module):
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder(config)
        self.text_encoder = TextEncoder(config, text_backbone)

    @property
    def store_arrays(self) -> tuple[str, ...]:
        return self.image_encoder.store_arrays

    def encode_images(self, arrays: Mapping[str, Tensor]) -> Tensor:
        """Store arrays of B images -> L2-normalised ``(B, D)``."""
        return l2_normalize(self.image_encoder(arrays), self.config.norm_eps)

    def encode_captions(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token ids and mask ``(B, L)`` -> L2-normalised ``(B, D)``."""
        return l2_normalize(self.text_encoder(input_ids, attention_mask), self.config.norm_eps)

    def forward(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Embed a training batch: ``(image embeddings (B, D), caption embeddings (B, D))``."""
        images = self.encode_images(batch)
        captions = self.encode_captions(batch["input_ids"], batch["attention_mask"])
        return images, captions


def cosine_similarity(images: Tensor, captions: Tensor, eps: float = 1e-8) -> Tensor:
    """Cosine similarity of every image with every caption: ``(I, D), (C, D) -> (I, C)``."""
    return l2_normalize(images.float(), eps) @ l2_normalize(captions.float(), eps).T
