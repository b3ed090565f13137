"""The retrieval protocols: which images and captions are scored together.

- ``test``: every image of a named split with its captions, scored as one set
  (Flickr30K's 1,000 test images, or any split of a small store).
- ``5k``: the COCO Karpathy test split of 5,000 images scored as one set.
- ``1k-5fold``: the same 5,000 images cut into 5 consecutive folds of 1,000 images with
  their captions; every metric is averaged over the folds.

Several models form an ensemble by averaging their similarity matrices.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from dsran.evaluate.recall import (
    DEFAULT_KS,
    RetrievalRanks,
    check_caption_image,
    default_device,
    metrics_from_ranks,
    retrieval_ranks,
)
from dsran.extract.store import FeatureStore, StoreError

logger = logging.getLogger(__name__)

PROTOCOLS = ("test", "5k", "1k-5fold")
COCO_TEST_IMAGES = 5000  # images of the COCO Karpathy test split
FOLD_IMAGES = 1000  # images per fold of the COCO 1K protocol
NUM_FOLDS = 5


class ProtocolError(ValueError):
    """A split does not fit the requested protocol, or the inputs disagree in size."""


@dataclass(frozen=True)
class EvalSet:
    """The images of one split and every caption of those images.

    N images, M captions. ``caption_image`` maps captions to positions in this set,
    not to store rows.
    """

    split: str  # name of the store split the images come from
    image_rows: np.ndarray  # (N,) rows of images/* in the store, in split order
    caption_rows: np.ndarray  # (M,) rows of captions/* whose image is in the split
    caption_image: np.ndarray  # (M,) position 0..N-1 of each caption's image
    image_paths: np.ndarray  # (N,) str, image path relative to the image folder
    caption_texts: np.ndarray  # (M,) str

    @property
    def num_images(self) -> int:
        return len(self.image_rows)

    @property
    def num_captions(self) -> int:
        return len(self.caption_rows)


@dataclass(frozen=True)
class Fold:
    """One scored subset: positions into an :class:`EvalSet`."""

    name: str  # "all" for a single set, "fold1".."fold5" for 1k-5fold
    images: np.ndarray  # (n,) image positions in the eval set
    captions: np.ndarray  # (m,) caption positions in the eval set
    caption_image: np.ndarray  # (m,) position 0..n-1 of each caption's image in this fold


@dataclass
class FoldResult:
    """Metrics and per-query ranks of one fold."""

    fold: Fold
    metrics: dict[str, float]
    ranks: RetrievalRanks  # indices in it are positions within the fold


@dataclass
class ProtocolResult:
    """Metrics of a protocol (averaged over folds) and the result of every fold."""

    protocol: str
    split: str  # the store split that was scored
    ks: tuple[int, ...]
    metrics: dict[str, float]
    folds: list[FoldResult] = field(default_factory=list)


def build_eval_set(
    split: str,
    split_rows: np.ndarray,
    caption_image_rows: np.ndarray,
    image_paths: np.ndarray,
    caption_texts: np.ndarray,
) -> EvalSet:
    """Select the captions of a split's images and map them to positions in the split.

    Args:
        split: name of the split.
        split_rows: (N,) store image rows of the split, in split order.
        caption_image_rows: (M_store,) store image row of every caption in the store.
        image_paths: (N_store,) path of every store image.
        caption_texts: (M_store,) text of every store caption.

    Captions keep their store order. Raises ProtocolError when a split image repeats or
    has no caption.
    """
    split_rows = np.asarray(split_rows, dtype=np.int64)
    caption_image_rows = np.asarray(caption_image_rows, dtype=np.int64)
    if len(np.unique(split_rows)) != len(split_rows):
        raise ProtocolError(
            f"split {split!r} lists some images more than once; each image may appear once. "
            "Rebuild the store's splits from the caption files."
        )
    position = np.full(len(image_paths), -1, dtype=np.int64)
    position[split_rows] = np.arange(len(split_rows))
    caption_rows = np.flatnonzero(position[caption_image_rows] >= 0)
    caption_image = position[caption_image_rows[caption_rows]]
    try:
        check_caption_image(caption_image, len(split_rows))
    except ValueError as error:
        raise ProtocolError(f"split {split!r}: {error}") from error
    return EvalSet(
        split=split,
        image_rows=split_rows,
        caption_rows=caption_rows,
        caption_image=caption_image,
        image_paths=np.asarray(image_paths, dtype=object)[split_rows],
        caption_texts=np.asarray(caption_texts, dtype=object)[caption_rows],
    )


def load_eval_set(store: FeatureStore, split: str) -> EvalSet:
    """Read a split's images and captions from a feature store.

    Images that extraction recorded as failed are left out with their captions, with a
    warning, as training leaves them out. Raises StoreError when the split is missing
    or some of its images are still pending (an unfinished extraction).
    """
    rows = store.split(split)
    done = store.done()[rows]
    failed = store.failed()[rows] & ~done
    pending = ~done & ~failed
    if pending.any():
        paths = store.image_paths()[rows[pending]]
        raise StoreError(
            f"{int(pending.sum())} of {len(rows)} images of split {split!r} in {store.path} have "
            f"no features yet (first: {paths[0]}). Finish the extraction with the same "
            "`dsran extract` command, or evaluate a split whose images all have features."
        )
    if failed.any():
        paths = store.image_paths()[rows[failed]]
        logger.warning(
            "leaving out %d of %d images of split %r that failed extraction (first: %s); "
            "`dsran info %s` lists the reasons",
            int(failed.sum()),
            len(rows),
            split,
            paths[0],
            store.path,
        )
        rows = rows[~failed]
    texts, caption_image_rows = store.captions()
    return build_eval_set(split, rows, caption_image_rows, store.image_paths(), texts)


def check_protocol(protocol: str, num_images: int, split: str) -> None:
    """Raise ProtocolError when ``protocol`` is unknown or a split of this size does not fit it."""
    if protocol not in PROTOCOLS:
        raise ProtocolError(f"unknown protocol {protocol!r}; valid protocols are {list(PROTOCOLS)}")
    if num_images == 0:
        raise ProtocolError(f"split {split!r} has no images")
    if protocol in ("5k", "1k-5fold") and num_images != COCO_TEST_IMAGES:
        shape = (
            f"{NUM_FOLDS} consecutive folds of {FOLD_IMAGES:,} images"
            if protocol == "1k-5fold"
            else "one set"
        )
        raise ProtocolError(
            f"protocol {protocol!r} scores the {COCO_TEST_IMAGES:,} images of the COCO Karpathy "
            f"test split as {shape}, but split {split!r} has {num_images:,} images. Use "
            "--split test to score all images of a split, or --store-split NAME to choose "
            "the 5,000-image split."
        )


def protocol_folds(protocol: str, eval_set: EvalSet) -> list[Fold]:
    """Cut an eval set into the folds that ``protocol`` scores separately."""
    check_protocol(protocol, eval_set.num_images, eval_set.split)
    if protocol != "1k-5fold":
        return [
            Fold(
                name="all",
                images=np.arange(eval_set.num_images),
                captions=np.arange(eval_set.num_captions),
                caption_image=eval_set.caption_image,
            )
        ]
    folds = []
    for index in range(NUM_FOLDS):
        start = index * FOLD_IMAGES
        images = np.arange(start, start + FOLD_IMAGES)
        captions = np.flatnonzero(
            (eval_set.caption_image >= start) & (eval_set.caption_image < start + FOLD_IMAGES)
        )
        folds.append(
            Fold(
                name=f"fold{index + 1}",
                images=images,
                captions=captions,
                caption_image=eval_set.caption_image[captions] - start,
            )
        )
    return folds


def ensemble_similarity(
    image_embeddings: Sequence[torch.Tensor],
    caption_embeddings: Sequence[torch.Tensor],
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Average the similarity matrices of several models (one model: its own matrix).

    Args:
        image_embeddings: per model, (N, D_model) L2-normalised image embeddings.
        caption_embeddings: per model, (M, D_model) L2-normalised caption embeddings.
        device: where the (N, M) float32 matrix is built; CUDA when present by default.
    """
    if not image_embeddings or len(image_embeddings) != len(caption_embeddings):
        raise ProtocolError(
            f"need one image and one caption embedding matrix per model, got "
            f"{len(image_embeddings)} and {len(caption_embeddings)}"
        )
    device = torch.device(device) if device is not None else default_device()
    num_images, num_captions = image_embeddings[0].shape[0], caption_embeddings[0].shape[0]
    similarity = None
    for index, (images, captions) in enumerate(
        zip(image_embeddings, caption_embeddings, strict=True)
    ):
        if images.shape[0] != num_images or captions.shape[0] != num_captions:
            raise ProtocolError(
                f"model {index} has {images.shape[0]} image and {captions.shape[0]} caption "
                f"embeddings, but model 0 has {num_images} and {num_captions}"
            )
        if images.shape[1] != captions.shape[1]:
            raise ProtocolError(
                f"model {index} embeds images in {images.shape[1]} and captions in "
                f"{captions.shape[1]} dimensions"
            )
        images = images.to(device, torch.float32)
        captions = captions.to(device, torch.float32)
        if similarity is None:
            similarity = images @ captions.T
        else:
            # In place, so that an ensemble needs no second (N, M) matrix.
            similarity.addmm_(images, captions.T)
    if len(image_embeddings) > 1:
        similarity /= len(image_embeddings)
    return similarity


def evaluate_protocol(
    protocol: str,
    eval_set: EvalSet,
    image_embeddings: Sequence[torch.Tensor],
    caption_embeddings: Sequence[torch.Tensor],
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
) -> ProtocolResult:
    """Score an eval set under ``protocol`` with one model or an ensemble.

    Args:
        protocol: one of ``PROTOCOLS``.
        eval_set: the split's images and captions.
        image_embeddings: per model, (N, D_model) embeddings of the eval set's images.
        caption_embeddings: per model, (M, D_model) embeddings of its captions.
        ks: the K of Recall@K.
        chunk_size, device: passed to :func:`dsran.evaluate.recall.retrieval_ranks`.

    Returns the metrics averaged over folds (a single fold for ``test`` and ``5k``) and
    every fold's metrics and ranks.
    """
    for index, (images, captions) in enumerate(
        zip(image_embeddings, caption_embeddings, strict=False)
    ):
        if images.shape[0] != eval_set.num_images or captions.shape[0] != eval_set.num_captions:
            raise ProtocolError(
                f"model {index} has {images.shape[0]} image and {captions.shape[0]} caption "
                f"embeddings, but split {eval_set.split!r} has {eval_set.num_images} images "
                f"and {eval_set.num_captions} captions"
            )
    ks = tuple(int(k) for k in ks)
    results = []
    for fold in protocol_folds(protocol, eval_set):
        image_index = torch.from_numpy(fold.images)
        caption_index = torch.from_numpy(fold.captions)
        similarity = ensemble_similarity(
            [images[image_index.to(images.device)] for images in image_embeddings],
            [captions[caption_index.to(captions.device)] for captions in caption_embeddings],
            device=device,
        )
        ranks = retrieval_ranks(
            similarity, fold.caption_image, chunk_size=chunk_size, device=device
        )
        del similarity
        metrics = metrics_from_ranks(ranks.i2t, ranks.t2i, ks)
        logger.info(
            "%s %s: %d images, %d captions, rsum %.1f",
            protocol,
            fold.name,
            len(fold.images),
            len(fold.captions),
            metrics["rsum"],
        )
        results.append(FoldResult(fold=fold, metrics=metrics, ranks=ranks))
    averaged = {
        key: float(np.mean([r.metrics[key] for r in results])) for key in results[0].metrics
    }
    return ProtocolResult(
        protocol=protocol, split=eval_set.split, ks=ks, metrics=averaged, folds=results
    )
