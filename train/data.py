"""Training samples from a feature store: one sample per caption, read chunk by chunk.

Reading a Zarr array one image at a time decompresses a whole chunk for every image,
so the loader reads whole chunks instead. Each epoch visits the chunks that hold
training images in a random order, groups them into buffers of ``buffer_chunks``
chunks and shuffles the captions of each buffer. DataLoader workers read and decode
buffers (worker ``w`` takes every ``W``-th buffer, so the DataLoader returns them in
plan order), and the training process cuts the stream of captions into batches.

The order depends only on the seed, the epoch and the process rank, so a run resumed
at step ``s`` skips exactly the samples of the first ``s`` steps.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from dsran.extract.store import FeatureStore, StoreError
from dsran.train.config import DataConfig
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

logger = logging.getLogger(__name__)


@dataclass
class CaptionSamples:
    """Captions used as samples, with their tokens and images."""

    caption_rows: np.ndarray  # (M,) rows of captions/*
    image_rows: np.ndarray  # (M,) rows of images/* that each caption describes
    input_ids: np.ndarray  # (M, L) int32 token ids, padded with the tokenizer's pad id
    lengths: np.ndarray  # (M,) real tokens per caption, special tokens included

    def __len__(self) -> int:
        return len(self.caption_rows)


# Padding id of the authors' data loader, which pads with 0 whatever the vocabulary (BERT's
# [PAD] is 0).
OFFICIAL_PAD_ID = 0

# Store arrays that only some extraction options write, with the option that adds them.
OPTIONAL_ARRAY_HINTS = {
    "regions/class_probs": "re-run region extraction with `dsran extract --class-probs`",
}


def tokenize(
    tokenizer, texts: Sequence[str], max_length: int, official: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``(M, max_length)`` int32 and lengths ``(M,)`` of ``texts``.

    ``official`` tokenises as the authors' data loader does: [CLS] + word pieces + [SEP]
    cut to ``max_length`` (a long caption loses [SEP]) and padded with id 0; every
    length is then ``max_length``, because that model attends to the padding too.
    """
    if not len(texts):
        return np.zeros((0, max_length), np.int32), np.zeros(0, np.int64)
    if official:
        return _tokenize_official(tokenizer, texts, max_length)
    encoded = tokenizer(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_attention_mask=True,
        return_tensors="np",
    )
    return encoded["input_ids"].astype(np.int32), encoded["attention_mask"].sum(axis=1)


def _tokenize_official(
    tokenizer, texts: Sequence[str], max_length: int
) -> tuple[np.ndarray, np.ndarray]:
    pieces = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    input_ids = np.full((len(texts), max_length), OFFICIAL_PAD_ID, np.int32)
    for row, ids in enumerate(pieces):
        ids = [tokenizer.cls_token_id, *ids, tokenizer.sep_token_id][:max_length]
        input_ids[row, : len(ids)] = ids
    return input_ids, np.full(len(texts), max_length, np.int64)


def check_store_arrays(store: FeatureStore, names: Sequence[str]) -> None:
    """Raise StoreError naming every array of ``names`` that ``store`` lacks, and the fix."""
    missing = [name for name in names if name not in store.group]
    if not missing:
        return
    hints = [
        f"{name}: {OPTIONAL_ARRAY_HINTS[name]}" for name in missing if name in OPTIONAL_ARRAY_HINTS
    ]
    raise StoreError(
        f"feature store {store.path} has no array(s) {', '.join(missing)}, which the model's "
        "encoders read" + (f" ({'; '.join(hints)})" if hints else "")
    )


def split_image_rows(store: FeatureStore, splits: Sequence[str]) -> np.ndarray:
    """Sorted unique image rows of ``splits``; raises StoreError when one is missing."""
    rows = [store.split(name) for name in splits]
    return np.unique(np.concatenate(rows)) if rows else np.zeros(0, np.int64)


def usable_image_rows(store: FeatureStore, rows: np.ndarray, purpose: str) -> np.ndarray:
    """Rows whose features are written; failed images are dropped with a warning.

    Raises StoreError when some rows are still pending extraction.
    """
    done, failed = store.done()[rows], store.failed()[rows]
    pending = ~(done | failed)
    if pending.any():
        raise StoreError(
            f"feature store {store.path} is unfinished: {int(pending.sum())} of the {len(rows)} "
            f"{purpose} images have no features yet. Run the same `dsran extract` command again "
            "to finish it."
        )
    if failed.any():
        logger.warning(
            "%d of %d %s images failed extraction and are left out",
            int(failed.sum()),
            len(rows),
            purpose,
        )
    return rows[done]


def caption_samples(
    store: FeatureStore,
    image_rows: np.ndarray,
    tokenizer,
    max_length: int,
    official: bool = False,
) -> CaptionSamples:
    """Tokenise every caption of ``image_rows`` (see :func:`tokenize`), in store order."""
    text, caption_image = store.captions()
    selected = np.flatnonzero(np.isin(caption_image, image_rows))
    input_ids, lengths = tokenize(tokenizer, [str(text[i]) for i in selected], max_length, official)
    return CaptionSamples(
        caption_rows=selected,
        image_rows=caption_image[selected],
        input_ids=input_ids,
        lengths=lengths,
    )


# ---------------------------------------------------------------------- epoch plan


@dataclass
class Buffer:
    """Chunks read together and the samples drawn from them, in shuffled order."""

    chunks: np.ndarray  # (C,) chunk indices, ascending
    samples: np.ndarray  # (S,) indices into CaptionSamples, shuffled


def epoch_buffers(
    image_rows: np.ndarray,
    chunk_images: int,
    buffer_chunks: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
) -> list[Buffer]:
    """Plan the buffers of one epoch for process ``rank``, in reading order.

    ``image_rows`` is ``(M,)``, the image of every sample. Buffers are dealt to the
    processes in turn, so each process reads only its own chunks.
    """
    rng = np.random.default_rng([seed, epoch])
    sample_chunks = image_rows // chunk_images
    chunks = rng.permutation(np.unique(sample_chunks))
    order = np.argsort(sample_chunks, kind="stable")
    starts = np.searchsorted(sample_chunks[order], chunks, side="left")
    stops = np.searchsorted(sample_chunks[order], chunks, side="right")
    span = {int(c): order[a:b] for c, a, b in zip(chunks, starts, stops, strict=True)}

    buffers = []
    for first in range(0, len(chunks), buffer_chunks):
        group = np.sort(chunks[first : first + buffer_chunks])
        samples = np.concatenate([span[int(c)] for c in group])
        buffers.append(Buffer(chunks=group, samples=rng.permutation(samples)))
    return buffers[rank::world_size]


def steps_per_epoch(sample_counts: Sequence[int], batch_size: int) -> int:
    """Full batches every process can make; the last partial batch is dropped."""
    return min(count // batch_size for count in sample_counts)


def skip_samples(buffers: list[Buffer], skip: int) -> list[Buffer]:
    """Drop the first ``skip`` samples of the stream that ``buffers`` make."""
    kept = []
    for buffer in buffers:
        if skip >= len(buffer.samples):
            skip -= len(buffer.samples)
            continue
        if skip:
            buffer = Buffer(chunks=buffer.chunks, samples=buffer.samples[skip:])
            skip = 0
        kept.append(buffer)
    return kept


# ---------------------------------------------------------------------- reading


def read_rows(
    store: FeatureStore, names: Sequence[str], chunks: np.ndarray
) -> dict[str, np.ndarray]:
    """Read whole chunks of the arrays ``names``, concatenated along the image axis."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for chunk in chunks:
        rows = store.chunk_rows(int(chunk))
        for name in names:
            parts[name].append(store.array(name)[rows])
    return {name: np.concatenate(values) for name, values in parts.items()}


class BufferDataset(IterableDataset):
    """Yields one decoded buffer at a time: its images' arrays and its samples' tokens."""

    def __init__(
        self,
        store_path: str | Path,
        arrays: Sequence[str],
        samples: CaptionSamples,
        buffers: list[Buffer],
    ):
        super().__init__()
        self.store_path = str(store_path)
        self.arrays = tuple(arrays)
        self.samples = samples
        self.buffers = buffers
        self._store: FeatureStore | None = None

    def _open(self) -> FeatureStore:
        # Opened lazily so that each worker process has its own Zarr handles.
        if self._store is None:
            self._store = FeatureStore.open(self.store_path)
        return self._store

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        store = self._open()
        for buffer in self.buffers[worker::workers]:
            yield self._decode(store, buffer)

    def _decode(self, store: FeatureStore, buffer: Buffer) -> dict[str, torch.Tensor]:
        chunk_images = store.chunk_images
        data = read_rows(store, self.arrays, buffer.chunks)
        # Row of each image within the concatenated chunks.
        first_rows = buffer.chunks * chunk_images
        lengths = np.array(
            [store.chunk_rows(int(c)).stop - store.chunk_rows(int(c)).start for c in buffer.chunks]
        )
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        image_rows = self.samples.image_rows[buffer.samples]
        chunk_position = np.searchsorted(buffer.chunks, image_rows // chunk_images)
        local = offsets[chunk_position] + (image_rows - first_rows[chunk_position])

        # Keep only the images that samples use, so less data crosses to the trainer.
        used, image_index = np.unique(local, return_inverse=True)
        out = {
            name: torch.from_numpy(np.ascontiguousarray(values[used]))
            for name, values in data.items()
        }
        out["image_index"] = torch.from_numpy(image_index.astype(np.int64))
        out["image_rows"] = torch.from_numpy(image_rows.astype(np.int64))
        out["input_ids"] = torch.from_numpy(self.samples.input_ids[buffer.samples])
        out["lengths"] = torch.from_numpy(self.samples.lengths[buffer.samples].astype(np.int64))
        return out


def _take_batch(
    pending: list[dict[str, torch.Tensor]], starts: list[int], size: int, arrays: Sequence[str]
):
    """Cut ``size`` samples from the front of the pending buffers."""
    pieces: dict[str, list[torch.Tensor]] = {}
    taken = 0
    while taken < size:
        buffer, start = pending[0], starts[0]
        stop = min(start + size - taken, len(buffer["image_index"]))
        index = buffer["image_index"][start:stop]
        for name in arrays:
            pieces.setdefault(name, []).append(buffer[name].index_select(0, index))
        for name in ("image_rows", "input_ids", "lengths"):
            pieces.setdefault(name, []).append(buffer[name][start:stop])
        taken += stop - start
        if stop == len(buffer["image_index"]):
            pending.pop(0)
            starts.pop(0)
        else:
            starts[0] = stop
    batch = {
        name: values[0] if len(values) == 1 else torch.cat(values)
        for name, values in pieces.items()
    }
    # Trim padding to the longest caption of the batch.
    longest = int(batch["lengths"].max())
    batch["input_ids"] = batch["input_ids"][:, :longest].long()
    batch["attention_mask"] = (
        torch.arange(longest).unsqueeze(0) < batch.pop("lengths").unsqueeze(1)
    ).long()
    return batch


class TrainingBatches:
    """Batches of one epoch for one process: dicts of store arrays and caption tokens.

    A batch contains ``input_ids`` and ``attention_mask`` ``(B, L)``, ``image_rows``
    ``(B,)`` and the model's store arrays with one image row per caption, e.g.
    ``grid/features`` ``(B, 49, 2048)`` float16.
    """

    def __init__(
        self,
        store_path: str | Path,
        arrays: Sequence[str],
        samples: CaptionSamples,
        config: DataConfig,
        chunk_images: int,
        seed: int,
        epoch: int,
        steps: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.arrays = tuple(arrays)
        self.batch_size = config.batch_size
        self.steps = steps
        self.start_step = start_step
        buffers = epoch_buffers(
            samples.image_rows, chunk_images, config.buffer_chunks, seed, epoch, rank, world_size
        )
        buffers = skip_samples(buffers, start_step * config.batch_size)
        self.dataset = BufferDataset(store_path, arrays, samples, buffers)
        workers = min(config.num_workers, len(buffers))
        self.loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=1 if workers else None,
            persistent_workers=False,
            # A private generator, so that worker start-up draws nothing from the
            # global RNG that dropout uses (resumed runs must draw the same numbers).
            generator=torch.Generator().manual_seed(seed),
        )

    def __len__(self) -> int:
        return self.steps - self.start_step

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        pending: list[dict[str, torch.Tensor]] = []
        starts: list[int] = []
        available = 0
        produced = 0
        remaining = len(self)
        if remaining <= 0:
            return
        for buffer in self.loader:
            pending.append(buffer)
            starts.append(0)
            available += len(buffer["image_index"])
            while available >= self.batch_size and produced < remaining:
                yield _take_batch(pending, starts, self.batch_size, self.arrays)
                available -= self.batch_size
                produced += 1
            if produced >= remaining:
                return
