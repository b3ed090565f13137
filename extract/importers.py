"""Imports of region features that detectron2- or Caffe-based extractors already wrote.

Two formats are read into the same ``regions/*`` arrays that ``dsran extract`` writes:

- ``milvlg-npz``: one ``.npz`` per image from MILVLG/bottom-up-attention.pytorch
  (``x`` (n, 2048), ``bbox`` (n, 4), ``num_bbox``, ``image_w``, ``image_h`` and ``info``,
  a pickled dict with ``objects_id``, ``objects_conf``, ``attrs_id``, ``attrs_conf``).
- ``bottom-up-tsv``: the TSV files of peteanderson80/bottom-up-attention
  (``tools/generate_tsv.py``): tab-separated rows without a header, fields
  ``image_id, image_w, image_h, num_boxes, boxes, features``, the last two base64 of
  float32 arrays. Rows that also carry ``objects_id, objects_conf, attrs_id,
  attrs_conf`` (the LXMERT variant, with ``img_id, img_h, img_w``) keep their
  predictions.

Both formats give boxes in original-image pixels and object / attribute ids that skip
the background class, as the stores do. The store's rows are the images of an image
folder. Each source record is matched to a row by relative path without extension, by
file stem, or by the number at the end of the stem (COCO ids).
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import logging
import pickle
import re
import sys
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from dsran.extract.store import FEATURE_DIM, FeatureStore, StoreError
from numpy.lib import format as npy_format
from tqdm import tqdm

logger = logging.getLogger(__name__)

IMPORT_FORMATS = ("milvlg-npz", "bottom-up-tsv")
TSV_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
LXMERT_TSV_FIELDS = (
    "img_id",
    "img_h",
    "img_w",
    "objects_id",
    "objects_conf",
    "attrs_id",
    "attrs_conf",
    "num_boxes",
    "boxes",
    "features",
)
# Chunks buffered in memory before the fullest one is written, for sources whose order
# differs from the store's row order.
_BUFFERED_CHUNKS = 8


class FeatureImportError(ValueError):
    """A feature dump cannot be read or does not fit the store."""


@dataclass
class ImportedRegions:
    """The regions of one image as a feature dump stores them (n regions)."""

    image_id: str  # the dump's name for the image: npz path without suffix, or TSV image_id
    width: int  # original image width in pixels
    height: int  # original image height in pixels
    features: np.ndarray  # (n, 2048) float32
    boxes: np.ndarray  # (n, 4) float32, x1, y1, x2, y2 in original pixels
    object_ids: np.ndarray | None  # (n,) ids into the 1600 objects, None if the dump has none
    object_scores: np.ndarray | None  # (n,) float32
    attribute_ids: np.ndarray | None  # (n,) ids into the 400 attributes, None if absent
    attribute_scores: np.ndarray | None  # (n,) float32

    def check(self, source: str) -> None:
        """Raise FeatureImportError when arrays disagree on the region count or feature size."""
        count = len(self.features)
        if self.features.ndim != 2 or self.features.shape[1] != FEATURE_DIM:
            raise FeatureImportError(
                f"{source}: features of image {self.image_id!r} have shape "
                f"{self.features.shape}, expected (n, {FEATURE_DIM})"
            )
        if self.boxes.shape != (count, 4):
            raise FeatureImportError(
                f"{source}: boxes of image {self.image_id!r} have shape {self.boxes.shape}, "
                f"expected ({count}, 4) for {count} feature rows"
            )
        for name in ("object_ids", "object_scores", "attribute_ids", "attribute_scores"):
            values = getattr(self, name)
            if values is not None and values.shape != (count,):
                raise FeatureImportError(
                    f"{source}: {name} of image {self.image_id!r} has shape {values.shape}, "
                    f"expected ({count},)"
                )


# ---------------------------------------------------------------------- MILVLG .npz


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickle only builtin containers and numpy arrays, as ``info`` of an .npz needs."""

    _ALLOWED = {
        ("builtins", "dict"),
        ("builtins", "list"),
        ("builtins", "tuple"),
        ("builtins", "str"),
        ("builtins", "int"),
        ("builtins", "float"),
        ("builtins", "bool"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        allowed = (module, name) in self._ALLOWED or (
            module == "numpy.dtypes" and name.endswith("DType")
        )
        if not allowed:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only numpy arrays and builtin containers "
                "are read from feature dumps"
            )
        if module.startswith("numpy.core."):
            module = module.replace("numpy.core.", "numpy._core.", 1)
        return super().find_class(module, name)


def _read_object_member(archive: zipfile.ZipFile, member: str) -> Any:
    """Read a pickled (object dtype) array of an .npz without numpy's unrestricted pickle."""
    with archive.open(member) as stream:
        data = io.BytesIO(stream.read())
    version = npy_format.read_magic(data)
    if version == (1, 0):
        _, _, dtype = npy_format.read_array_header_1_0(data)
    elif version == (2, 0):
        _, _, dtype = npy_format.read_array_header_2_0(data)
    else:
        raise FeatureImportError(
            f"array {member} has .npy format version {version}, expected 1.0 or 2.0"
        )
    if not dtype.hasobject:
        data.seek(0)
        return npy_format.read_array(data, allow_pickle=False)
    array = _ArrayUnpickler(data).load()
    return array.item() if isinstance(array, np.ndarray) and array.shape == () else array


def _optional_array(info: Mapping[str, Any], key: str, dtype) -> np.ndarray | None:
    if key not in info:
        return None
    return np.asarray(info[key]).reshape(-1).astype(dtype)


def read_milvlg_npz(path: str | Path, image_id: str | None = None) -> ImportedRegions:
    """Read one per-image ``.npz`` of MILVLG's extractor.

    ``info`` is a pickled dict. It is read with an unpickler that builds only numpy
    arrays and builtin values, so a crafted file cannot run code.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            members = {Path(name).stem: name for name in archive.namelist()}
            missing = [key for key in ("x", "bbox", "image_w", "image_h") if key not in members]
            if missing:
                raise FeatureImportError(
                    f"{path} is not a MILVLG feature file: arrays {missing} are missing "
                    f"(it has {sorted(members)})"
                )
            arrays = {key: _read_object_member(archive, name) for key, name in members.items()}
    except (zipfile.BadZipFile, OSError, ValueError, pickle.UnpicklingError, EOFError) as error:
        if isinstance(error, FeatureImportError):
            raise
        raise FeatureImportError(f"cannot read MILVLG feature file {path}: {error}") from error

    info = arrays.get("info", {})
    if not isinstance(info, Mapping):
        raise FeatureImportError(
            f"{path}: 'info' contains a {type(info).__name__}, expected a dict"
        )
    features = np.asarray(arrays["x"], dtype=np.float32)
    boxes = np.asarray(arrays["bbox"], dtype=np.float32).reshape(-1, 4)
    if "num_bbox" in arrays and int(arrays["num_bbox"]) != len(features):
        raise FeatureImportError(
            f"{path}: num_bbox is {int(arrays['num_bbox'])} but x has {len(features)} rows"
        )
    record = ImportedRegions(
        image_id=image_id if image_id is not None else path.stem,
        width=int(arrays["image_w"]),
        height=int(arrays["image_h"]),
        features=features,
        boxes=boxes,
        object_ids=_optional_array(info, "objects_id", np.int64),
        object_scores=_optional_array(info, "objects_conf", np.float32),
        attribute_ids=_optional_array(info, "attrs_id", np.int64),
        attribute_scores=_optional_array(info, "attrs_conf", np.float32),
    )
    record.check(str(path))
    return record


def iter_milvlg_folder(folder: str | Path) -> Iterator[ImportedRegions]:
    """Read every ``.npz`` under ``folder``; image ids are their relative paths without ``.npz``."""
    folder = Path(folder)
    files = sorted(folder.rglob("*.npz"))
    if not files:
        raise FeatureImportError(f"no .npz feature files found under {folder}")
    for path in files:
        yield read_milvlg_npz(path, image_id=path.relative_to(folder).with_suffix("").as_posix())


# ---------------------------------------------------------------------- bottom-up TSV


def _decode_base64(text: str, dtype, source: str, field: str) -> np.ndarray:
    # Python 3 ports of generate_tsv.py write the bytes' repr: b'...'.
    if text.startswith(("b'", 'b"')) and text.endswith(("'", '"')):
        text = text[2:-1]
    try:
        return np.frombuffer(base64.b64decode(text, validate=True), dtype=dtype)
    except (binascii.Error, ValueError) as error:
        raise FeatureImportError(
            f"{source}: field {field} is not valid base64 of {dtype}: {error}"
        ) from error


def iter_bottom_up_tsv(path: str | Path) -> Iterator[ImportedRegions]:
    """Read the rows of a bottom-up-attention TSV file, one image each."""
    path = Path(path)
    csv.field_size_limit(sys.maxsize)
    with path.open(newline="") as stream:
        first = stream.readline()
        stream.seek(0)
        columns = first.rstrip("\r\n").split("\t")
        fields = LXMERT_TSV_FIELDS if len(columns) == len(LXMERT_TSV_FIELDS) else TSV_FIELDS
        if first and len(columns) != len(fields):
            raise FeatureImportError(
                f"{path} has {len(columns)} tab-separated fields per row, expected "
                f"{len(TSV_FIELDS)} ({', '.join(TSV_FIELDS)}) or {len(LXMERT_TSV_FIELDS)} "
                "(the LXMERT variant)"
            )
        reader = csv.DictReader(stream, delimiter="\t", fieldnames=fields)
        for line, row in enumerate(reader, start=1):
            source = f"{path}:{line}"
            yield _tsv_record(row, source)


def _tsv_record(row: Mapping[str, str], source: str) -> ImportedRegions:
    # The LXMERT variant names the first three fields img_id, img_w and img_h.
    prefix = "img" if "img_id" in row else "image"
    image_id = row[f"{prefix}_id"]
    try:
        width = int(row[f"{prefix}_w"])
        height = int(row[f"{prefix}_h"])
        count = int(row["num_boxes"])
    except (TypeError, ValueError) as error:
        raise FeatureImportError(f"{source}: invalid image size or box count: {error}") from error

    features = _decode_base64(row["features"], np.float32, source, "features")
    boxes = _decode_base64(row["boxes"], np.float32, source, "boxes")
    if features.size != count * FEATURE_DIM or boxes.size != count * 4:
        raise FeatureImportError(
            f"{source}: num_boxes is {count} but features hold {features.size} floats "
            f"and boxes {boxes.size} (expected {count} x {FEATURE_DIM} and {count} x 4)"
        )

    predictions = {}
    for field, dtype in (
        ("objects_id", np.int64),
        ("objects_conf", np.float32),
        ("attrs_id", np.int64),
        ("attrs_conf", np.float32),
    ):
        predictions[field] = (
            _decode_base64(row[field], dtype, source, field) if field in row else None
        )
    record = ImportedRegions(
        image_id=str(image_id),
        width=width,
        height=height,
        features=features.reshape(count, FEATURE_DIM).copy(),
        boxes=boxes.reshape(count, 4).copy(),
        object_ids=predictions["objects_id"],
        object_scores=predictions["objects_conf"],
        attribute_ids=predictions["attrs_id"],
        attribute_scores=predictions["attrs_conf"],
    )
    record.check(source)
    return record


# ---------------------------------------------------------------------- matching


def _trailing_number(name: str) -> int | None:
    match = re.search(r"(\d+)$", name)
    return int(match.group(1)) if match else None


class ImageMatcher:
    """Map a dump's image ids to store rows: relative path without extension, stem, or trailing number."""

    def __init__(self, image_paths: Sequence[str]):
        self._by_key: dict[str, dict[str, set[int]]] = {"path": {}, "stem": {}, "number": {}}
        for row, image_path in enumerate(image_paths):
            path = Path(image_path)
            self._add("path", path.with_suffix("").as_posix(), row)
            self._add("stem", path.stem, row)
            number = _trailing_number(path.stem)
            if number is not None:
                self._add("number", str(number), row)

    def _add(self, kind: str, key: str, row: int) -> None:
        self._by_key[kind].setdefault(key, set()).add(row)

    def row(self, image_id: str) -> int | None:
        """Return the store row of ``image_id``; None when no image matches.

        Raises FeatureImportError when the id matches several images (same stem in two folders).
        """
        candidates = [("path", image_id), ("stem", Path(image_id).name)]
        number = _trailing_number(Path(image_id).name)
        if number is not None:
            candidates.append(("number", str(number)))
        for kind, key in candidates:
            rows = self._by_key[kind].get(key)
            if rows is None:
                continue
            if len(rows) > 1:
                raise FeatureImportError(
                    f"image id {image_id!r} matches {len(rows)} images by {kind}; give each "
                    "image a unique file name, or import each folder into its own store"
                )
            return next(iter(rows))
        return None


# ---------------------------------------------------------------------- writing


@dataclass
class ImportReport:
    """Counts of an import, and the dump's image ids that matched no image."""

    imported: int  # images whose regions were written
    skipped_done: int  # images already done in the store (a resumed import)
    unmatched: list[str]  # dump image ids that match no image of the folder
    missing: int  # images of the folder with no record in the dump, recorded as failed


def import_settings(source_format: str, sources: Sequence[str | Path], max_boxes: int) -> dict:
    """Return the store settings of an import: no CNN ran here, so they name the source."""
    if source_format not in IMPORT_FORMATS:
        raise FeatureImportError(
            f"unknown import format {source_format!r}; valid formats are {', '.join(IMPORT_FORMATS)}"
        )
    return {
        "grid": None,
        "regions": {
            "source_format": source_format,
            "sources": [Path(source).name for source in sources],
            "max_boxes": int(max_boxes),
            "class_probs": False,
            "random_weights": False,
            "dim": FEATURE_DIM,
        },
    }


def _region_row(record: ImportedRegions, max_boxes: int, source_format: str) -> dict[str, Any]:
    count = len(record.features)
    if count > max_boxes:
        raise FeatureImportError(
            f"image {record.image_id!r} has {count} regions in the {source_format} dump but the "
            f"store holds {max_boxes}; import with --max-boxes {count} or more"
        )

    def padded(values: np.ndarray | None, row_shape: tuple[int, ...], dtype, fill) -> np.ndarray:
        array = np.full((max_boxes, *row_shape), fill, dtype=dtype)
        if values is not None:
            array[:count] = np.asarray(values).reshape(count, *row_shape)
        return array

    return {
        "images/width": record.width,
        "images/height": record.height,
        "regions/features": padded(record.features, (FEATURE_DIM,), np.float32, 0.0),
        "regions/boxes": padded(record.boxes, (4,), np.float32, 0.0),
        "regions/count": count,
        "regions/object_ids": padded(record.object_ids, (), np.int16, -1),
        "regions/object_scores": padded(record.object_scores, (), np.float32, 0.0),
        "regions/attribute_ids": padded(record.attribute_ids, (), np.int16, -1),
        "regions/attribute_scores": padded(record.attribute_scores, (), np.float32, 0.0),
    }


class _ChunkWriter:
    """Collect rows per chunk and write whole chunks, reading back rows written earlier."""

    def __init__(self, store: FeatureStore):
        self.store = store
        self.pending: dict[int, dict[int, dict[str, Any]]] = {}

    def add(self, row: int, values: dict[str, Any]) -> None:
        chunk = row // self.store.chunk_images
        self.pending.setdefault(chunk, {})[row] = values
        rows = self.store.chunk_rows(chunk)
        if len(self.pending[chunk]) == rows.stop - rows.start:
            self.flush(chunk)
        elif len(self.pending) > _BUFFERED_CHUNKS:
            self.flush(max(self.pending, key=lambda index: len(self.pending[index])))

    def flush(self, chunk: int) -> None:
        rows = self.store.chunk_rows(chunk)
        data = self.store.read_chunk(chunk)
        for row, values in self.pending.pop(chunk).items():
            offset = row - rows.start
            for name, value in values.items():
                data[name][offset] = value
            data["images/failed"][offset] = False
            data["images/done"][offset] = True
        self.store.write_chunk(chunk, data)

    def flush_all(self) -> None:
        for chunk in sorted(self.pending):
            self.flush(chunk)


def import_regions(
    records: Iterable[ImportedRegions],
    out: str | Path,
    image_paths: Sequence[str],
    settings: Mapping[str, Any],
    chunk_images: int | None = None,
) -> ImportReport:
    """Write imported regions into the store at ``out``, one row per entry of ``image_paths``.

    A missing store is created. An existing one must have the same settings, and its
    done rows are left as they are, so an interrupted import can run again. Images with
    no record in the dump are recorded as failed, so the finished store passes
    ``check_complete``.
    """
    out = Path(out)
    max_boxes = int(settings["regions"]["max_boxes"])
    source_format = settings["regions"]["source_format"]
    if out.exists():
        store = FeatureStore.open(out, mode="r+")
        store.check_settings(settings)
        if list(store.image_paths()) != list(image_paths):
            raise StoreError(
                f"feature store {out} was created for other images; import into a new --out path"
            )
    else:
        options = {} if chunk_images is None else {"chunk_images": chunk_images}
        store = FeatureStore.create(out, image_paths, settings, **options)

    done = store.done()
    matcher = ImageMatcher(image_paths)
    writer = _ChunkWriter(store)
    seen = np.zeros(len(image_paths), dtype=bool)
    unmatched: list[str] = []
    imported = skipped = 0
    for record in tqdm(records, desc=f"import {source_format}", unit="image"):
        row = matcher.row(record.image_id)
        if row is None:
            unmatched.append(record.image_id)
            continue
        if seen[row]:
            raise FeatureImportError(
                f"image {image_paths[row]} has two records in the dump "
                f"(the second is {record.image_id!r}); remove the duplicate"
            )
        seen[row] = True
        if done[row]:
            skipped += 1
            continue
        writer.add(row, _region_row(record, max_boxes, source_format))
        imported += 1
    writer.flush_all()

    missing_rows = np.flatnonzero(~seen & ~done)
    reason = f"no regions for this image in the {source_format} dump"
    _mark_failed(store, missing_rows)
    store.record_failures(
        [{"path": image_paths[row], "reason": reason} for row in missing_rows],
        succeeded=[image_paths[row] for row in np.flatnonzero(seen)],
    )
    if unmatched:
        logger.warning(
            "%d dump records match no image of the folder (first: %s)",
            len(unmatched),
            ", ".join(unmatched[:5]),
        )
    return ImportReport(imported, skipped, unmatched, len(missing_rows))


def _mark_failed(store: FeatureStore, rows: np.ndarray) -> None:
    """Set ``images/failed`` on ``rows`` by rewriting their chunks whole."""
    for chunk in sorted({int(row) // store.chunk_images for row in rows}):
        bounds = store.chunk_rows(chunk)
        data = store.read_chunk(chunk)
        for row in rows[(rows >= bounds.start) & (rows < bounds.stop)]:
            data["images/failed"][row - bounds.start] = True
        store.write_chunk(chunk, data)
