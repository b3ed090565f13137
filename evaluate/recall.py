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
    i2t_top1: np.ndarray | None  # (N,) int64, the caption that scores highest for each image
    t2i_top1: np.ndarray | None  # (M,) int64, the image that scores highest for each caption


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


@dataclass
class _BlockCounts:
    """Counts and maxima of one block of B image rows over M captions, as numpy arrays."""

    i2t_above: np.ndarray  # (B,) captions scoring strictly above each image's best positive
    t2i_above: np.ndarray  # (M,) images of the block scoring strictly above each positive
    maximum: float  # highest score of the block, NaN when the block contains a NaN
    i2t_top1: np.ndarray | None = None  # (B,) highest-scoring caption of each image
    t2i_top_score: np.ndarray | None = None  # (M,) highest score of each caption in the block
    t2i_top_row: np.ndarray | None = None  # (M,) block row that has that score


def _count_block_numpy(
    block: torch.Tensor, best_positive: np.ndarray, positive: np.ndarray, with_top1: bool
) -> _BlockCounts:
    values = block.cpu().numpy()
    counts = _BlockCounts(
        i2t_above=np.count_nonzero(values > best_positive[:, None], axis=1),
        # int32 sums of a boolean block run about twice as fast as the default int64.
        t2i_above=(values > positive[None, :]).sum(axis=0, dtype=np.int32),
        maximum=float(values.max()),
    )
    if with_top1:
        counts.i2t_top1 = values.argmax(axis=1)
        counts.t2i_top_row = values.argmax(axis=0)
        counts.t2i_top_score = values[counts.t2i_top_row, np.arange(values.shape[1])]
    return counts


def _count_block_torch(
    block: torch.Tensor, best_positive: torch.Tensor, positive: torch.Tensor, with_top1: bool
) -> _BlockCounts:
    counts = _BlockCounts(
        i2t_above=(block > best_positive[:, None]).sum(dim=1).cpu().numpy(),
        t2i_above=(block > positive[None, :]).sum(dim=0).cpu().numpy(),
        maximum=float(block.max()),
    )
    if with_top1:
        counts.i2t_top1 = block.argmax(dim=1).cpu().numpy()
        top_score, top_row = block.max(dim=0)
        counts.t2i_top_score = top_score.cpu().numpy()
        counts.t2i_top_row = top_row.cpu().numpy()
    return counts


BACKENDS = ("numpy", "torch")


def retrieval_ranks(
    similarity: torch.Tensor | np.ndarray,
    caption_image: Sequence[int] | np.ndarray,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    backend: str | None = None,
    with_top1: bool = True,
) -> RetrievalRanks:
    """Compute the rank of every image query and every caption query.

    Args:
        similarity: (N, M) scores of N images against M captions, higher is closer.
        caption_image: (M,) index of each caption's image, 0..N-1.
        chunk_size: image rows per block; by default as many rows as fit in
            ``BLOCK_ELEMENTS`` scores.
        device: where the torch backend compares the blocks; CUDA when present by default.
        backend: "numpy" or "torch". By default numpy on the CPU, where its boolean
            reductions are several times faster than torch's, and torch on other devices.
        with_top1: also find the top-scoring candidate of every query (for reports).
            Without it, ``i2t_top1`` and ``t2i_top1`` are None and ranking is about
            twice as fast.

    Returns ranks that are 1-based, ties resolved in the query's favour. Raises
    ValueError on NaN or +inf scores and on a non-finite positive score; a -inf
    negative score simply ranks last.
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
    if backend is None:
        # NOTE: the tests run the torch backend on the CPU only; no CUDA run has checked it.
        backend = "numpy" if device.type == "cpu" else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends are {list(BACKENDS)}")
    if backend == "numpy" and similarity.dtype == torch.bfloat16:
        similarity = similarity.float()  # numpy has no bfloat16; the conversion is exact

    # 1. The positive score of every caption, and the best positive of every image.
    rows = torch.from_numpy(caption_image).to(similarity.device)
    columns = torch.arange(num_captions, device=similarity.device)
    positive = similarity[rows, columns].cpu().numpy()
    if not np.isfinite(positive).all():
        first = int(np.flatnonzero(~np.isfinite(positive))[0])
        raise ValueError(
            f"the positive score of caption {first} is {positive[first]}; check the embeddings"
        )
    best_positive = np.full(num_images, -np.inf, dtype=positive.dtype)
    np.maximum.at(best_positive, caption_image, positive)
    if backend == "torch":
        positive_arg = torch.from_numpy(positive).to(device)
        best_positive_arg = torch.from_numpy(best_positive).to(device)
        count_block = _count_block_torch
    else:
        positive_arg, best_positive_arg = positive, best_positive
        count_block = _count_block_numpy

    # 2. One pass over blocks of image rows: count scores strictly above the positive.
    i2t_above = np.empty(num_images, dtype=np.int64)
    t2i_above = np.zeros(num_captions, dtype=np.int64)
    i2t_top1 = np.empty(num_images, dtype=np.int64) if with_top1 else None
    t2i_top_score = np.full(num_captions, -np.inf) if with_top1 else None
    t2i_top1 = np.zeros(num_captions, dtype=np.int64) if with_top1 else None
    for start in range(0, num_images, chunk_size):
        stop = min(start + chunk_size, num_images)
        block = similarity[start:stop]  # (B, M)
        if backend == "torch":
            block = block.to(device, non_blocking=True)
        counts = count_block(block, best_positive_arg[start:stop], positive_arg, with_top1)
        if not np.isfinite(counts.maximum):
            raise ValueError(
                f"similarity has a score of {counts.maximum} in image rows {start}..{stop - 1}; "
                "check the embeddings"
            )
        i2t_above[start:stop] = counts.i2t_above
        t2i_above += counts.t2i_above
        if with_top1:
            i2t_top1[start:stop] = counts.i2t_top1
            # Strictly greater, so that the first block wins a tie across blocks.
            improved = counts.t2i_top_score > t2i_top_score
            t2i_top_score[improved] = counts.t2i_top_score[improved]
            t2i_top1[improved] = counts.t2i_top_row[improved] + start

    # 3. The caption that set each image's rank: its first caption scoring the best positive.
    is_best = positive == best_positive[caption_image]
    best_caption = np.full(num_images, num_captions, dtype=np.int64)
    np.minimum.at(best_caption, caption_image[is_best], np.flatnonzero(is_best))

    return RetrievalRanks(
        i2t=i2t_above + 1,
        t2i=t2i_above + 1,
        i2t_best_caption=best_caption,
        i2t_top1=i2t_top1,
        t2i_top1=t2i_top1,
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
    ranks = retrieval_ranks(
        similarity, caption_image, chunk_size=chunk_size, device=device, with_top1=False
    )
    return metrics_from_ranks(ranks.i2t, ranks.t2i, ks)
