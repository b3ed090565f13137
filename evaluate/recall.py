"""Recall@K, median and mean rank for image-text retrieval, as pure functions.

Ranks come from counting, never from sorting: the rank of a query is one plus the
number of candidates whose score is strictly greater than the score of its positive.
The similarity matrix is visited in blocks of image rows, so the extra memory is one
block of ``chunk_size`` rows plus a few vectors, whatever the matrix size.

Tie rule: a candidate whose score equals the positive's score does not count against
the query, so ties are resolved in the query's favour (optimistic ranks). With
continuous embeddings ties almost never occur, and then these ranks equal those of a
per-query argsort.

Image-to-text: an image is scored by its best-ranked caption. Its rank is one plus the
number of captions scoring strictly above its highest-scoring positive caption, which
equals the minimum over its captions of their individual ranks. The caption-to-image
map is explicit, so images with any number of captions (4, 6, 7 ...) are scored right.

Text-to-image: each caption is a query over all images; its positive is the image that
``caption_image`` names.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

DEFAULT_KS = (1, 5, 10)
# Elements of one block of similarity rows when ``chunk_size`` is not given: 2**24
# float32 scores are 64 MiB, plus a boolean comparison of a quarter of that.
BLOCK_ELEMENTS = 2**24


@dataclass(frozen=True)
class RetrievalRanks:
    """Per-query ranks (1-based) and the top-scoring candidate of every query.

    N images, M captions.
    """

    i2t: np.ndarray  # (N,) int64, rank of each image's best-ranked caption
    t2i: np.ndarray  # (M,) int64, rank of each caption's image
    i2t_best_caption: np.ndarray  # (N,) int64, the caption of each image that set its rank
    i2t_top1: np.ndarray  # (N,) int64, the caption that scores highest for each image
    t2i_top1: np.ndarray  # (M,) int64, the image that scores highest for each caption


def default_device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _as_tensor(similarity: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(similarity, np.ndarray):
        similarity = torch.from_numpy(similarity)
    if not isinstance(similarity, torch.Tensor):
        raise TypeError(
            f"similarity must be a torch.Tensor or numpy.ndarray, got {type(similarity).__name__}"
        )
    if similarity.ndim != 2:
        raise ValueError(
            f"similarity must be a 2-D (N_images, N_captions) matrix, got shape {tuple(similarity.shape)}"
        )
    if not similarity.is_floating_point():
        similarity = similarity.float()
    return similarity


def check_caption_image(caption_image: Sequence[int] | np.ndarray, num_images: int) -> np.ndarray:
    """Validate the caption-to-image map and return it as an int64 array (M,).

    Raises ValueError when a value lies outside 0..num_images-1 or when an image has
    no caption, because image-to-text recall is undefined for such an image.
    """
    caption_image = np.asarray(caption_image)
    if caption_image.ndim != 1:
        raise ValueError(
            f"caption_image must be 1-D (N_captions,), got shape {caption_image.shape}"
        )
    if caption_image.size and not np.issubdtype(caption_image.dtype, np.integer):
        raise ValueError(
            f"caption_image must hold integer image indices, got {caption_image.dtype}"
        )
    caption_image = caption_image.astype(np.int64, copy=False)
    if caption_image.size and (caption_image.min() < 0 or caption_image.max() >= num_images):
        raise ValueError(
            f"caption_image has image indices outside 0..{num_images - 1} "
            f"(min {caption_image.min()}, max {caption_image.max()})"
        )
    counts = np.bincount(caption_image, minlength=num_images)
    without = np.flatnonzero(counts == 0)
    if without.size:
        raise ValueError(
            f"{without.size} of {num_images} images have no caption (first indices: "
            f"{without[:5].tolist()}); image-to-text recall needs at least one caption per image. "
            "Drop those images from the evaluated set."
        )
    return caption_image


def retrieval_ranks(
    similarity: torch.Tensor | np.ndarray,
    caption_image: Sequence[int] | np.ndarray,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
) -> RetrievalRanks:
    """Compute the rank of every image query and every caption query.

    Args:
        similarity: (N, M) scores of N images against M captions, higher is closer.
        caption_image: (M,) index of each caption's image, 0..N-1.
        chunk_size: image rows per block; by default as many rows as fit in
            ``BLOCK_ELEMENTS`` scores.
        device: where the blocks are compared; CUDA when present by default.

    Returns ranks that are 1-based, ties resolved in the query's favour.
    """
    similarity = _as_tensor(similarity)
    num_images, num_captions = similarity.shape
    if num_images == 0 or num_captions == 0:
        raise ValueError(f"similarity is empty: shape {tuple(similarity.shape)}")
    if len(caption_image) != num_captions:
        raise ValueError(
            f"caption_image has {len(caption_image)} entries but similarity has {num_captions} caption columns"
        )
    caption_image = check_caption_image(caption_image, num_images)
    if chunk_size is None:
        chunk_size = max(1, BLOCK_ELEMENTS // num_captions)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    device = torch.device(device) if device is not None else default_device()

    # 1. The positive score of every caption, and the best positive of every image.
    caption_image_t = torch.from_numpy(caption_image)
    source_index = caption_image_t.to(similarity.device)
    positive = similarity[source_index, torch.arange(num_captions, device=similarity.device)]
    positive = positive.to(device)
    caption_image_d = caption_image_t.to(device)
    best_positive = torch.full(
        (num_images,), -torch.inf, dtype=positive.dtype, device=device
    ).scatter_reduce(0, caption_image_d, positive, reduce="amax")

    # 2. One pass over blocks of image rows: count scores strictly above the positive.
    i2t_rank = torch.empty(num_images, dtype=torch.int64, device=device)
    i2t_top1 = torch.empty(num_images, dtype=torch.int64, device=device)
    t2i_above = torch.zeros(num_captions, dtype=torch.int64, device=device)
    t2i_top_score = torch.full((num_captions,), -torch.inf, dtype=positive.dtype, device=device)
    t2i_top1 = torch.zeros(num_captions, dtype=torch.int64, device=device)
    for start in range(0, num_images, chunk_size):
        stop = min(start + chunk_size, num_images)
        block = similarity[start:stop].to(device, non_blocking=True)  # (B, M)
        if not torch.isfinite(block).all():
            raise ValueError(
                f"similarity has NaN or infinite scores in image rows {start}..{stop - 1}; "
                "check the embeddings"
            )

        i2t_rank[start:stop] = (block > best_positive[start:stop, None]).sum(dim=1) + 1
        i2t_top1[start:stop] = block.argmax(dim=1)

        t2i_above += (block > positive[None, :]).sum(dim=0)
        block_top_score, block_top_row = block.max(dim=0)
        improved = block_top_score > t2i_top_score
        t2i_top_score = torch.where(improved, block_top_score, t2i_top_score)
        t2i_top1 = torch.where(improved, block_top_row + start, t2i_top1)

    # 3. The caption that set each image's rank: its highest-scoring positive caption.
    is_best = positive == best_positive[caption_image_d]
    caption_index = torch.arange(num_captions, device=device)
    # Among equal best positives the first caption wins. The value num_captions marks
    # captions that are not a best positive.
    best_caption = torch.full((num_images,), num_captions, dtype=torch.int64, device=device)
    best_caption = best_caption.scatter_reduce(
        0,
        caption_image_d,
        torch.where(is_best, caption_index, num_captions),
        reduce="amin",
    )

    return RetrievalRanks(
        i2t=i2t_rank.cpu().numpy(),
        t2i=(t2i_above + 1).cpu().numpy(),
        i2t_best_caption=best_caption.cpu().numpy(),
        i2t_top1=i2t_top1.cpu().numpy(),
        t2i_top1=t2i_top1.cpu().numpy(),
    )


def recall_at(ranks: np.ndarray, k: int) -> float:
    """Percentage of queries whose 1-based rank is at most ``k``."""
    return float(100.0 * np.mean(np.asarray(ranks) <= k))


def recall_curve(ranks: np.ndarray, max_k: int = 100) -> np.ndarray:
    """Recall@K in percent for K = 1..max_k, shape (max_k,)."""
    ranks = np.asarray(ranks)
    counts = np.bincount(np.minimum(ranks, max_k + 1), minlength=max_k + 2)[1 : max_k + 1]
    return 100.0 * np.cumsum(counts) / len(ranks)


def metrics_from_ranks(
    i2t_ranks: np.ndarray, t2i_ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Recall@K both ways, their sum (rsum), and median and mean ranks.

    The median rank is rounded down, as the VSE++-style evaluation scripts that image-text
    matching papers use do: they report ``floor(median(0-based rank)) + 1``.
    """
    for k in ks:
        if int(k) < 1:
            raise ValueError(f"every K must be at least 1, got {list(ks)}")
    metrics: dict[str, float] = {}
    for direction, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k in ks:
            metrics[f"{direction}_r{k}"] = recall_at(ranks, int(k))
    metrics["rsum"] = sum(metrics[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks)
    for direction, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        metrics[f"{direction}_medr"] = float(np.floor(np.median(ranks)))
        metrics[f"{direction}_meanr"] = float(np.mean(ranks))
    return metrics


def retrieval_metrics(
    similarity: torch.Tensor | np.ndarray,
    caption_image: Sequence[int] | np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Recall@K (percent), rsum, median and mean rank (1-based) of a similarity matrix.

    Args:
        similarity: (N, M) scores of N images against M captions.
        caption_image: (M,) index of each caption's image, 0..N-1.
        ks: the K of Recall@K; keys are ``i2t_r{K}`` and ``t2i_r{K}``.
        chunk_size: image rows per block (see :func:`retrieval_ranks`).
        device: where the blocks are compared; CUDA when present by default.

    Returns keys ``i2t_r1 .. t2i_r10``, ``rsum``, ``i2t_medr``, ``i2t_meanr``,
    ``t2i_medr``, ``t2i_meanr``. Ties count in the query's favour.
    """
    ranks = retrieval_ranks(similarity, caption_image, chunk_size=chunk_size, device=device)
    return metrics_from_ranks(ranks.i2t, ranks.t2i, ks)
