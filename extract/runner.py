"""The batch runner of ``dsran extract``: store setup, captions, chunked extraction, resume.

The unit of work is a store chunk (``chunk_images`` consecutive rows of every
per-image array). A chunk is processed when any of its rows is neither done nor
failed. Its rows are decoded and preprocessed in DataLoader worker processes, run
through every extractor in batches that never cross a chunk boundary, and written as
one whole chunk with the ``images/done`` flags last. Because a chunk's batches depend
only on its rows, a chunk computed again after a crash gets the same batches and, on
the same machine and thread count, the same features bit for bit.

With ``workers`` or ``scheduler`` set, groups of whole chunks become dask.distributed
tasks. Each task opens the store, builds its own extractors and writes its chunks. The
driver alone records the failures that the tasks return, because Zarr attributes are
rewritten whole.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from dsran.extract.base import ExtractorOptions, FeatureExtractor, build_extractor
from dsran.extract.captions import MatchedCaptions, match_captions
from dsran.extract.images import ImageLoadError, discover_images, load_rgb
from dsran.extract.store import DEFAULT_CHUNK_IMAGES, FeatureStore, StoreError
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

logger = logging.getLogger(__name__)

# Feature kinds of the store layout. A kind that is not extracted gets settings None.
STORE_KINDS = ("grid", "regions")


@dataclass
class ExtractConfig:
    """Options of one ``dsran extract`` run."""

    images: Path  # image folder; image ids are paths relative to it
    out: Path  # feature store, created when missing
    captions: Sequence[Path] = ()  # COCO captions or Karpathy split files
    kinds: Sequence[str] = ("grid",)  # feature kinds to extract, in run order
    options: ExtractorOptions = field(default_factory=ExtractorOptions)  # device, weights, ...
    batch_size: int = 16  # images per network batch; batches never cross a chunk
    num_workers: int = 2  # DataLoader processes that decode and preprocess images
    chunk_images: int | None = None  # rows per store chunk for a new store; None: default
    workers: int | None = None  # start a dask LocalCluster with this many processes
    scheduler: str | None = None  # address of an existing dask scheduler
    limit: int | None = None  # add only the first N images of the folder (trial runs)
    chunks_per_task: int = 4  # whole chunks per dask task


@dataclass
class ChunkResult:
    """Failure records and written rows of some chunks, returned to the driver."""

    failures: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    succeeded: list[str] = field(default_factory=list)  # paths whose features were written
    chunks: list[int] = field(default_factory=list)  # chunk indices written

    def merge(self, other: ChunkResult) -> None:
        self.failures += other.failures
        self.succeeded += other.succeeded
        self.chunks += other.chunks


# ---------------------------------------------------------------------- driver


def run_extraction(config: ExtractConfig) -> FeatureStore:
    """Create or resume the store at ``config.out`` and extract every pending image."""
    _check_config(config)
    logger.info("extract: %s", config)
    extractors = [build_extractor(kind, config.options) for kind in config.kinds]
    settings = store_settings(extractors)

    image_paths = discover_images(config.images)
    if config.limit is not None:
        image_paths = image_paths[: config.limit]
    if not image_paths:
        raise StoreError(f"no image files found under {config.images}")
    # A new store's captions are matched before it is created, so that a bad caption
    # file leaves nothing on disk.
    matched = None
    if config.captions and not config.out.exists():
        matched = _match_captions(config.captions, image_paths)
    store = _open_or_create(config, image_paths, settings)

    if config.captions:
        if matched is None:
            matched = _match_captions(config.captions, list(store.image_paths()))
        _write_captions(store, matched)
    _repair_failure_records(store, config.images)

    pending = pending_chunks(store)
    total = int(sum(_pending_rows(store, chunk).size for chunk in pending))
    logger.info(
        "%d of %d images to extract in %d chunks of %d",
        total,
        len(store),
        len(pending),
        store.chunk_images,
    )
    started = time.perf_counter()
    with tqdm(total=total, unit="img", desc="extract", smoothing=0.1) as progress:
        if config.workers is None and config.scheduler is None:
            result = extract_chunks(
                store,
                config.images,
                pending,
                extractors,
                batch_size=config.batch_size,
                num_workers=config.num_workers,
                on_chunk=lambda chunk_result: store.record_failures(
                    chunk_result.failures, succeeded=chunk_result.succeeded
                ),
                on_batch=progress.update,
            )
        else:
            result = _extract_distributed(config, store, pending, progress)
    elapsed = time.perf_counter() - started
    logger.info(
        "extracted %d images (%d failed) in %.1f s, %.2f images/s",
        len(result.succeeded),
        len(result.failures),
        elapsed,
        (len(result.succeeded) + len(result.failures)) / max(elapsed, 1e-9),
    )
    return store


def store_settings(extractors: Sequence[FeatureExtractor]) -> dict[str, Any]:
    """Return the store's ``settings`` attribute: one section per kind, None when not extracted."""
    settings: dict[str, Any] = {kind: None for kind in STORE_KINDS}
    settings.update({extractor.kind: extractor.settings() for extractor in extractors})
    return settings


def _check_config(config: ExtractConfig) -> None:
    if not config.kinds:
        raise StoreError("no feature kind selected; enable grid or region features")
    for name in ("batch_size", "chunks_per_task"):
        if getattr(config, name) < 1:
            raise StoreError(f"{name} must be at least 1, got {getattr(config, name)}")
    if config.num_workers < 0:
        raise StoreError(f"num_workers must be 0 or more, got {config.num_workers}")
    if config.workers is not None and config.scheduler is not None:
        raise StoreError("workers and scheduler exclude each other; pass one of them")
    if config.workers is not None and config.workers < 1:
        raise StoreError(f"workers must be at least 1, got {config.workers}")
    if config.limit is not None and config.limit < 1:
        raise StoreError(f"limit must be at least 1, got {config.limit}")


def _open_or_create(
    config: ExtractConfig, image_paths: list[str], settings: dict[str, Any]
) -> FeatureStore:
    if not config.out.exists():
        chunk_images = config.chunk_images or DEFAULT_CHUNK_IMAGES
        return FeatureStore.create(config.out, image_paths, settings, chunk_images=chunk_images)

    store = FeatureStore.open(config.out, mode="r+")
    store.check_settings(settings)
    if config.chunk_images is not None and config.chunk_images != store.chunk_images:
        logger.warning(
            "store %s has chunks of %d images; ignoring chunk_images=%d",
            config.out,
            store.chunk_images,
            config.chunk_images,
        )
    known = set(store.image_paths())
    store.append_images([path for path in image_paths if path not in known])
    return store


def _match_captions(caption_files: Sequence[Path], image_paths: list[str]) -> MatchedCaptions:
    """Match the caption files to ``image_paths``; raise when no caption names any image."""
    matched = match_captions(caption_files, image_paths)
    if len(matched.text) == 0:
        files = ", ".join(str(path) for path in caption_files)
        raise StoreError(
            f"no caption of {files} names one of the {len(image_paths)} images found "
            f"(first: {image_paths[0]}). Check that the caption files belong to this "
            "image folder, or leave out --captions."
        )
    return matched


def _write_captions(store: FeatureStore, matched: MatchedCaptions) -> None:
    store.write_captions(matched.text, matched.image)
    store.write_splits(matched.splits)
    logger.info(
        "wrote %d captions for %d images; splits: %s",
        len(matched.text),
        len(set(matched.image)),
        ", ".join(f"{name} {len(rows)}" for name, rows in matched.splits.items()) or "none",
    )


def _repair_failure_records(store: FeatureStore, images_root: Path) -> None:
    """Record the reason of failed rows that a crash left without a failure record.

    A chunk's flags are written before the driver records its failures. A crash in
    between leaves ``images/failed`` rows with no reason, so they are decoded again.
    """
    recorded = {item["path"] for item in store.failures}
    paths = store.image_paths()
    repaired = []
    for row in np.flatnonzero(store.failed()):
        path = str(paths[row])
        if path in recorded:
            continue
        try:
            load_rgb(images_root / path)
            reason = "failed in an earlier run, but decodes now; the failure reason was lost"
        except ImageLoadError as error:
            reason = str(error)
        repaired.append({"path": path, "reason": reason})
    if repaired:
        store.record_failures(repaired)
        logger.info("recorded %d failure reasons lost by an interrupted run", len(repaired))


def pending_chunks(store: FeatureStore) -> list[int]:
    """Return the chunk indices with at least one row that is not done.

    Failed rows count as pending, so every run tries them again: an image that was
    fixed since is extracted, one that still fails keeps its failure record.
    """
    done = store.done()
    return [chunk for chunk in range(store.num_chunks) if not done[store.chunk_rows(chunk)].all()]


def _pending_rows(store: FeatureStore, chunk: int) -> np.ndarray:
    rows = store.chunk_rows(chunk)
    return np.flatnonzero(~store.array("images/done")[rows]) + rows.start


# ---------------------------------------------------------------------- chunks


@dataclass
class _Decoded:
    """One image after decoding and preprocessing in a DataLoader worker."""

    row: int  # row in the store
    width: int  # after EXIF orientation; 0 when decoding failed
    height: int
    items: dict[str, Any] | None  # preprocess result per feature kind; None on failure
    reason: str | None  # why decoding failed, or None


class _ImageDataset(Dataset):
    """Decodes store rows and preprocesses them for every extractor."""

    def __init__(
        self,
        rows: Sequence[int],
        paths: Sequence[str],
        root: Path,
        extractors: Sequence[FeatureExtractor],
    ):
        self.rows = list(rows)
        self.paths = list(paths)
        self.root = root
        self.extractors = list(extractors)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> _Decoded:
        row = self.rows[index]
        try:
            image = load_rgb(self.root / self.paths[index])
        except ImageLoadError as error:
            return _Decoded(row, 0, 0, None, str(error))
        items = {extractor.kind: extractor.preprocess(image) for extractor in self.extractors}
        return _Decoded(row, image.width, image.height, items, None)


def _keep_list(batch: list[_Decoded]) -> list[_Decoded]:
    return batch


@dataclass
class _ChunkBuffer:
    """The arrays of one chunk while its batches arrive."""

    data: dict[str, np.ndarray]  # every per-image array of the chunk, as read from the store
    result: ChunkResult  # failures and written paths of the chunk
    received: int = 0  # pending rows filled so far


def _plan_batches(
    store: FeatureStore, chunks: Sequence[int], batch_size: int
) -> tuple[list[int], list[list[int]], dict[int, int]]:
    """Return the pending rows of ``chunks``, batches of dataset indices, and rows per chunk.

    Batches never cross a chunk, so a chunk's batches depend only on its own rows.
    """
    rows: list[int] = []
    batches: list[list[int]] = []
    chunk_sizes: dict[int, int] = {}
    for chunk in chunks:
        # NOTE: a chunk whose last rows were added by a later run (the folder grew) is
        # completed with batches of its new rows only, which may differ in the last
        # bits from a run that saw every image at once.
        pending = _pending_rows(store, chunk)
        chunk_sizes[chunk] = len(pending)
        first = len(rows)
        for start in range(0, len(pending), batch_size):
            stop = min(start + batch_size, len(pending))
            batches.append(list(range(first + start, first + stop)))
        rows += pending.tolist()
    return rows, batches, chunk_sizes


def extract_chunks(
    store: FeatureStore,
    images_root: Path,
    chunks: Sequence[int],
    extractors: Sequence[FeatureExtractor],
    batch_size: int,
    num_workers: int,
    on_chunk: Callable[[ChunkResult], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> ChunkResult:
    """Extract the pending rows of ``chunks`` and write each chunk whole.

    Rows that are already done or failed keep their stored values. ``on_chunk(result)``
    is called after each chunk is written, and ``on_batch(images)`` after each batch.
    """
    paths = store.image_paths()
    rows, batches, chunk_sizes = _plan_batches(store, chunks, batch_size)
    dataset = _ImageDataset(rows, [paths[row] for row in rows], images_root, extractors)
    if num_workers > 0 and multiprocessing.current_process().daemon:
        # Dask worker processes are daemonic and may not start DataLoader workers.
        num_workers = 0
    loader = DataLoader(
        dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=_keep_list
    )
    expected_outputs = {
        extractor.kind: {
            spec.name for spec in store.array_specs() if spec.name.startswith(f"{extractor.kind}/")
        }
        for extractor in extractors
    }

    total = ChunkResult()
    buffers: dict[int, _ChunkBuffer] = {}
    for batch in loader:
        outputs = _run_extractors(extractors, batch, expected_outputs)
        chunk = batch[0].row // store.chunk_images
        if chunk not in buffers:
            buffers[chunk] = _ChunkBuffer(store.read_chunk(chunk), ChunkResult(chunks=[chunk]))
        buffer = buffers[chunk]
        _fill_rows(store, buffer, batch, outputs, paths)
        buffer.received += len(batch)
        if on_batch is not None:
            on_batch(len(batch))

        if buffer.received == chunk_sizes[chunk]:
            store.write_chunk(chunk, buffer.data)
            del buffers[chunk]
            total.merge(buffer.result)
            if on_chunk is not None:
                on_chunk(buffer.result)
    if buffers:
        raise RuntimeError(f"chunks {sorted(buffers)} did not receive all their rows")
    return total


def _run_extractors(
    extractors: Sequence[FeatureExtractor],
    batch: list[_Decoded],
    expected_outputs: dict[str, set[str]],
) -> dict[str, np.ndarray]:
    """Run every extractor on the decoded images of ``batch``; failed images are left out."""
    decoded = [item for item in batch if item.items is not None]
    outputs: dict[str, np.ndarray] = {}
    if not decoded:
        return outputs
    for extractor in extractors:
        arrays = extractor.extract([item.items[extractor.kind] for item in decoded])
        if set(arrays) != expected_outputs[extractor.kind]:
            raise RuntimeError(
                f"{extractor.kind} extractor returned arrays {sorted(arrays)}, but the store "
                f"expects {sorted(expected_outputs[extractor.kind])}"
            )
        for name, values in arrays.items():
            if len(values) != len(decoded):
                raise RuntimeError(
                    f"{extractor.kind} extractor returned {len(values)} rows of {name} "
                    f"for a batch of {len(decoded)} images"
                )
        outputs.update(arrays)
    return outputs


def _fill_rows(
    store: FeatureStore,
    buffer: _ChunkBuffer,
    batch: list[_Decoded],
    outputs: dict[str, np.ndarray],
    paths: np.ndarray,
) -> None:
    """Copy one batch into the chunk buffer; failed rows get the arrays' fill values."""
    start = (batch[0].row // store.chunk_images) * store.chunk_images
    specs = store.array_specs()
    data, result = buffer.data, buffer.result
    output_index = 0
    for item in batch:
        offset = item.row - start
        path = str(paths[item.row])
        if item.items is None:
            for spec in specs:
                data[spec.name][offset] = spec.fill_value
            data["images/failed"][offset] = True
            result.failures.append({"path": path, "reason": str(item.reason)})
            continue

        for name, values in outputs.items():
            data[name][offset] = values[output_index]
        data["images/width"][offset] = item.width
        data["images/height"][offset] = item.height
        data["images/failed"][offset] = False
        data["images/done"][offset] = True
        result.succeeded.append(path)
        output_index += 1


# ---------------------------------------------------------------------- dask


@functools.lru_cache(maxsize=2)
def _cached_extractors(
    kinds: tuple[str, ...], options: ExtractorOptions
) -> tuple[FeatureExtractor, ...]:
    """Extractors of one worker process, kept between tasks so weights load once."""
    return tuple(build_extractor(kind, options) for kind in kinds)


def extract_chunks_task(
    store_path: str,
    images_root: str,
    chunks: list[int],
    kinds: tuple[str, ...],
    options: ExtractorOptions,
    batch_size: int,
    num_workers: int,
) -> ChunkResult:
    """Dask task: open the store, extract ``chunks`` and return their failures."""
    store = FeatureStore.open(store_path, mode="r+")
    extractors = _cached_extractors(kinds, options)
    # A worker may resolve "auto" device or precision unlike the driver did (another
    # machine), and its features must match the settings the store records.
    store.check_settings(store_settings(extractors))
    return extract_chunks(store, Path(images_root), chunks, extractors, batch_size, num_workers)


def _extract_distributed(
    config: ExtractConfig, store: FeatureStore, chunks: list[int], progress: tqdm
) -> ChunkResult:
    from dask.distributed import Client, LocalCluster, as_completed

    cluster = None
    if config.scheduler is not None:
        client = Client(config.scheduler)
    else:
        cluster = LocalCluster(
            n_workers=config.workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
        )
        client = Client(cluster)
    logger.info("dask: %s", client)

    groups = [
        chunks[start : start + config.chunks_per_task]
        for start in range(0, len(chunks), config.chunks_per_task)
    ]
    result = ChunkResult()
    try:
        futures = {
            client.submit(
                extract_chunks_task,
                str(store.path.resolve()),
                str(Path(config.images).resolve()),
                group,
                tuple(config.kinds),
                config.options,
                config.batch_size,
                config.num_workers,
                pure=False,
            ): group
            for group in groups
        }
        for future in as_completed(futures):
            try:
                group_result = future.result()
            except Exception as error:  # the task's own exception, re-raised by dask
                raise StoreError(
                    f"extraction task for chunks {futures[future]} failed: "
                    f"{type(error).__name__}: {error}. Chunks written before it are kept; "
                    "run the same command again to resume."
                ) from error
            store.record_failures(group_result.failures, succeeded=group_result.succeeded)
            result.merge(group_result)
            progress.update(len(group_result.failures) + len(group_result.succeeded))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return result
