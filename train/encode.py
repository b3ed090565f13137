"""Embedding images of a feature store and caption texts with a trained DSRAN model."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from dsran.extract.store import FeatureStore
from dsran.train.data import check_store_arrays, tokenize
from dsran.train.precision import autocast_context
from tqdm import tqdm

logger = logging.getLogger(__name__)


def _chunk_batches(
    store: FeatureStore, names: Sequence[str], rows: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Yield ``(positions, arrays)`` batches of ``rows``, reading each chunk once.

    ``positions`` are indices into ``rows``; rows are visited in chunk order.
    """
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    chunks = sorted_rows // store.chunk_images
    pending_positions: list[np.ndarray] = []
    pending: dict[str, list[np.ndarray]] = {name: [] for name in names}
    pending_count = 0
    for chunk in np.unique(chunks):
        selected = np.flatnonzero(chunks == chunk)
        chunk_slice = store.chunk_rows(int(chunk))
        local = sorted_rows[selected] - chunk_slice.start
        for name in names:
            pending[name].append(store.array(name)[chunk_slice][local])
        pending_positions.append(order[selected])
        pending_count += len(selected)
        while pending_count >= batch_size:
            yield _cut(pending_positions, pending, batch_size)
            pending_count -= batch_size
    if pending_count:
        yield _cut(pending_positions, pending, pending_count)


def _cut(positions: list[np.ndarray], arrays: dict[str, list[np.ndarray]], size: int):
    all_positions = np.concatenate(positions)
    joined = {name: np.concatenate(values) for name, values in arrays.items()}
    positions[:] = [all_positions[size:]]
    for name in arrays:
        arrays[name][:] = [joined[name][size:]]
    return all_positions[:size], {name: values[:size] for name, values in joined.items()}


def _model_device(model: torch.nn.Module, device) -> torch.device:
    device = torch.device(device)
    model.to(device)
    return device


@torch.no_grad()
def encode_images(
    model: torch.nn.Module,
    store: FeatureStore | str | Path,
    rows: Sequence[int] | np.ndarray,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    precision: str = "auto",
) -> torch.Tensor:
    """Embed the images at ``rows`` of ``store``: ``(len(rows), D)`` float32, L2-normalised.

    Rows must be done in the store. Row ``i`` of the result belongs to ``rows[i]``.
    ``precision`` selects autocast as in :func:`resolve_autocast_dtype`.
    """
    if not isinstance(store, FeatureStore):
        store = FeatureStore.open(store)
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= len(store)):
        raise ValueError(
            f"image rows must lie in 0..{len(store) - 1}, got {rows.min()}..{rows.max()}"
        )
    not_done = rows[~store.done()[rows]] if rows.size else rows
    if not_done.size:
        raise ValueError(
            f"{not_done.size} requested image rows have no features in {store.path} "
            f"(first: row {int(not_done[0])}); they failed or are pending extraction"
        )
    names = model.store_arrays
    check_store_arrays(store, names)
    device = _model_device(model, device)
    model.eval()
    out: torch.Tensor | None = None
    progress = tqdm(
        total=len(rows), desc="encode images", unit="img", leave=False, disable=len(rows) < 2048
    )
    with progress:
        for positions, arrays in _chunk_batches(store, names, rows, batch_size):
            batch = {name: torch.from_numpy(values).to(device) for name, values in arrays.items()}
            batch = {name: t.float() if t.is_floating_point() else t for name, t in batch.items()}
            with autocast_context(device, precision):
                embeddings = model.encode_images(batch).float()
            if out is None:
                out = torch.empty(len(rows), embeddings.shape[1])
            out[torch.from_numpy(positions)] = embeddings.cpu()
            progress.update(len(positions))
    if out is None:
        return torch.empty(0, model.config.embed_size)
    return out


@torch.no_grad()
def encode_captions(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    max_length: int,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    precision: str = "auto",
) -> torch.Tensor:
    """Embed caption texts: ``(len(texts), D)`` float32, L2-normalised.

    Captions are cut at ``max_length`` tokens and padded to the longest of each batch;
    padding is masked. A model with ``official_masking`` gets captions in the authors'
    form instead (see :func:`tokenize`). ``precision`` selects autocast as in
    :func:`resolve_autocast_dtype`.
    """
    official = bool(getattr(model.config, "official_masking", False))
    device = _model_device(model, device)
    model.eval()
    out = torch.empty(len(texts), model.config.embed_size)
    progress = tqdm(
        total=len(texts), desc="encode captions", unit="cap", leave=False, disable=len(texts) < 4096
    )
    with progress:
        for start in range(0, len(texts), batch_size):
            input_ids, lengths = tokenize(
                tokenizer, texts[start : start + batch_size], max_length, official
            )
            longest = int(lengths.max())
            ids = torch.from_numpy(input_ids[:, :longest]).long().to(device)
            mask = (
                torch.arange(longest).unsqueeze(0) < torch.from_numpy(lengths).unsqueeze(1)
            ).long()
            with autocast_context(device, precision):
                embeddings = model.encode_captions(ids, mask.to(device)).float()
            out[start : start + len(ids)] = embeddings.cpu()
            progress.update(len(ids))
    return out
