"""The Zarr v3 feature store: one group per image collection.

Layout (N images, M captions, K = max regions per image)::

    images/path            (N,)          str, path relative to the image folder
    images/width, height   (N,)          int32, after EXIF orientation
    images/done            (N,)          bool, written after the row's features
    images/failed          (N,)          bool, the image could not be read
    grid/features          (N, 49, 2048) float16, ResNet152 layer4, row-major 7x7
    regions/features       (N, K, 2048)  float16
    regions/boxes          (N, K, 4)     float32, x1, y1, x2, y2 in original pixels
    regions/count          (N,)          int32, real boxes; rows past it are padding
    regions/object_ids     (N, K)        int16, -1 on padding
    regions/object_scores  (N, K)        float32
    regions/attribute_ids  (N, K)        int16, -1 on padding
    regions/attribute_scores (N, K)      float32
    regions/class_probs    (N, K, 1601)  float16, optional
    captions/text          (M,)          str
    captions/image         (M,)          int32, row in images/*
    splits/<name>          (S,)          int32, rows in images/* (train, val, test, ...)

Every per-image array is chunked along the image axis with the same chunk length, so a
writer that owns a chunk index owns the same rows of every array. Zarr gives no
guarantee for concurrent writes to one chunk, so writers must write whole chunks only.

Zarr returns the fill value for rows that were never written, and an append publishes
the new shape before the data. The ``images/done`` flag is therefore the only truth
about which rows hold features, and it is written last, after the row's data.
"""

from __future__ import annotations

import datetime as _dt
import logging
import platform
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from dsran import __version__

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_CHUNK_IMAGES = 16
TEXT_CHUNK = 8192
GRID_CELLS = 49
FEATURE_DIM = 2048
NUM_OBJECT_CLASSES = 1601  # Visual Genome: 1600 objects + background
_COMPRESSOR = ZstdCodec(level=3)


class StoreError(RuntimeError):
    """A feature store is missing, invalid, unfinished or incompatible with a request."""


@dataclass(frozen=True)
class ArraySpec:
    """One per-image array: its row shape, dtype and the value of unwritten rows."""

    name: str
    row_shape: tuple[int, ...]
    dtype: str
    fill_value: Any


def image_array_specs(
    grid: bool, regions: bool, max_regions: int, class_probs: bool
) -> list[ArraySpec]:
    """List the per-image arrays that a store with these feature kinds holds."""
    specs = [
        ArraySpec("images/width", (), "int32", 0),
        ArraySpec("images/height", (), "int32", 0),
        ArraySpec("images/failed", (), "bool", False),
        ArraySpec("images/done", (), "bool", False),
    ]
    if grid:
        specs.append(ArraySpec("grid/features", (GRID_CELLS, FEATURE_DIM), "float16", 0.0))
    if regions:
        k = max_regions
        specs += [
            ArraySpec("regions/features", (k, FEATURE_DIM), "float16", 0.0),
            ArraySpec("regions/boxes", (k, 4), "float32", 0.0),
            ArraySpec("regions/count", (), "int32", 0),
            ArraySpec("regions/object_ids", (k,), "int16", -1),
            ArraySpec("regions/object_scores", (k,), "float32", 0.0),
            ArraySpec("regions/attribute_ids", (k,), "int16", -1),
            ArraySpec("regions/attribute_scores", (k,), "float32", 0.0),
        ]
        if class_probs:
            specs.append(ArraySpec("regions/class_probs", (k, NUM_OBJECT_CLASSES), "float16", 0.0))
    return specs


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour shapes the stored numbers."""
    versions = {"dsran": __version__, "python": platform.python_version(), "zarr": zarr.__version__}
    versions["numpy"] = np.__version__
    for name in ("torch", "torchvision", "PIL"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        versions[name if name != "PIL" else "pillow"] = getattr(module, "__version__", "unknown")
    return versions


def _settings_differences(
    old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = ""
) -> list[str]:
    """List the dotted keys whose values differ between two nested settings dicts."""
    differences = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        if key not in old or key not in new:
            differences.append(
                f"{name} ({old.get(key, '<absent>')!r} in the store, {new.get(key, '<absent>')!r} now)"
            )
        elif isinstance(old[key], Mapping) and isinstance(new[key], Mapping):
            differences += _settings_differences(old[key], new[key], prefix=f"{name}.")
        elif old[key] != new[key]:
            differences.append(f"{name} ({old[key]!r} in the store, {new[key]!r} now)")
    return differences


class FeatureStore:
    """A feature store on disk. Create one with :meth:`create`, open one with :meth:`open`."""

    def __init__(self, path: str | Path, group: zarr.Group):
        self.path = Path(path)
        self.group = group

    # ------------------------------------------------------------------ creation

    @classmethod
    def create(
        cls,
        path: str | Path,
        image_paths: Sequence[str],
        settings: Mapping[str, Any],
        chunk_images: int = DEFAULT_CHUNK_IMAGES,
    ) -> FeatureStore:
        """Create an empty store for ``image_paths`` with every per-image array of ``settings``.

        ``settings`` is the extractor configuration: ``{"grid": {...} or None,
        "regions": {...} or None}``; ``regions["max_boxes"]`` sets K and
        ``regions["class_probs"]`` adds ``regions/class_probs``.
        """
        path = Path(path)
        if path.exists():
            raise StoreError(f"cannot create feature store {path}: the path already exists")
        if chunk_images < 1:
            raise StoreError(f"chunk_images must be at least 1, got {chunk_images}")
        _check_unique(image_paths)
        group = zarr.open_group(str(path), mode="w-", zarr_format=3)
        group.attrs.update(
            {
                "schema_version": SCHEMA_VERSION,
                "chunk_images": int(chunk_images),
                "settings": dict(settings),
                "provenance": {
                    "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "versions": library_versions(),
                },
                "failures": [],
            }
        )
        n = len(image_paths)
        paths = group.create_array(
            "images/path",
            shape=(n,),
            chunks=(TEXT_CHUNK,),
            dtype=str,
            fill_value="",
            compressors=_COMPRESSOR,
        )
        if n:
            paths[:] = np.asarray(image_paths, dtype=object)
        store = cls(path, group)
        for spec in store.array_specs():
            group.create_array(
                spec.name,
                shape=(n, *spec.row_shape),
                chunks=(chunk_images, *spec.row_shape),
                dtype=spec.dtype,
                fill_value=spec.fill_value,
                compressors=_COMPRESSOR,
            )
        logger.info("created feature store %s for %d images", path, n)
        return store

    @classmethod
    def open(
        cls, path: str | Path, mode: str = "r", require_complete: bool = False
    ) -> FeatureStore:
        """Open and validate a store; ``require_complete`` also rejects unfinished stores."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise StoreError(
                f"feature store not found: {path} has no zarr.json. "
                "Create it with `dsran extract --images DIR --out STORE` or `dsran import`."
            )
        try:
            group = zarr.open_group(str(path), mode=mode, zarr_format=3)
        except Exception as error:  # zarr raises several unrelated types for a bad group
            raise StoreError(f"cannot open feature store {path}: {error}") from error
        store = cls(path, group)
        if mode != "r":
            store.repair_interrupted_append()
        store.validate()
        if require_complete:
            store.check_complete()
        return store

    # ------------------------------------------------------------------ metadata

    @property
    def attrs(self) -> dict[str, Any]:
        return self.group.attrs.asdict()

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.group.attrs["settings"])

    @property
    def chunk_images(self) -> int:
        return int(self.group.attrs["chunk_images"])

    @property
    def has_grid(self) -> bool:
        return bool(self.settings.get("grid"))

    @property
    def has_regions(self) -> bool:
        return bool(self.settings.get("regions"))

    @property
    def max_regions(self) -> int:
        regions = self.settings.get("regions") or {}
        return int(regions.get("max_boxes", 0))

    @property
    def random_weights(self) -> bool:
        """True when any stored feature kind came from randomly initialised CNN weights."""
        return any(
            bool((section or {}).get("random_weights")) for section in self.settings.values()
        )

    def array_specs(self) -> list[ArraySpec]:
        regions = self.settings.get("regions") or {}
        return image_array_specs(
            grid=self.has_grid,
            regions=self.has_regions,
            max_regions=int(regions.get("max_boxes", 0)),
            class_probs=bool(regions.get("class_probs", False)),
        )

    def __len__(self) -> int:
        return int(self.group["images/path"].shape[0])

    @property
    def num_chunks(self) -> int:
        return -(-len(self) // self.chunk_images)

    def chunk_rows(self, chunk: int) -> slice:
        """Return the rows of every per-image array that chunk ``chunk`` covers."""
        start = chunk * self.chunk_images
        return slice(start, min(start + self.chunk_images, len(self)))

    def array(self, name: str) -> zarr.Array:
        try:
            return self.group[name]
        except KeyError as error:
            raise StoreError(f"feature store {self.path} has no array {name!r}") from error

    def image_paths(self) -> np.ndarray:
        return np.asarray(self.group["images/path"][:], dtype=object)

    def done(self) -> np.ndarray:
        return np.asarray(self.group["images/done"][:], dtype=bool)

    def failed(self) -> np.ndarray:
        return np.asarray(self.group["images/failed"][:], dtype=bool)

    @property
    def failures(self) -> list[dict[str, str]]:
        return list(self.group.attrs.get("failures", []))

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        """Raise :class:`StoreError` when the schema version, shapes or indices are inconsistent."""
        attrs = self.attrs
        version = attrs.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"feature store {self.path} has schema version {version!r}, but this dsran "
                f"({__version__}) reads version {SCHEMA_VERSION}. Re-extract the features, or "
                "use the dsran release that wrote the store."
            )
        for key in ("settings", "chunk_images"):
            if key not in attrs:
                raise StoreError(
                    f"feature store {self.path} is invalid: attribute {key!r} is missing"
                )
        if "images/path" not in self.group:
            raise StoreError(
                f"feature store {self.path} is invalid: array 'images/path' is missing"
            )
        n = len(self)
        for spec in self.array_specs():
            array = self.array(spec.name)
            expected = (n, *spec.row_shape)
            if tuple(array.shape) != expected:
                raise StoreError(
                    f"feature store {self.path} is invalid: {spec.name} has shape {tuple(array.shape)}, "
                    f"expected {expected} for {n} images"
                )
            if array.chunks[0] != self.chunk_images:
                raise StoreError(
                    f"feature store {self.path} is invalid: {spec.name} is chunked by "
                    f"{array.chunks[0]} images, expected {self.chunk_images}"
                )
        if "captions" in self.group:
            text, image = self.array("captions/text"), self.array("captions/image")
            if text.shape != image.shape:
                raise StoreError(
                    f"feature store {self.path} is invalid: captions/text has {text.shape[0]} rows "
                    f"but captions/image has {image.shape[0]}"
                )
            _check_indices(self.path, "captions/image", image[:], n)
        for name, rows in self.splits().items():
            _check_indices(self.path, f"splits/{name}", rows, n)

    def check_complete(self) -> None:
        """Raise :class:`StoreError` unless every image is done or recorded as failed."""
        pending = ~(self.done() | self.failed())
        if pending.any():
            first = self.image_paths()[np.flatnonzero(pending)[0]]
            raise StoreError(
                f"feature store {self.path} is unfinished: {int(pending.sum())} of {len(self)} "
                f"images have no features yet (first: {first}). Run the same `dsran extract` "
                "command again to finish it."
            )

    def check_settings(self, settings: Mapping[str, Any]) -> None:
        """Reject a request to add features made with other extractor settings."""
        stored = self.settings
        for kind in sorted(set(stored) | set(settings)):
            has, wants = bool(stored.get(kind)), bool(settings.get(kind))
            if has != wants:
                flag = f"--{kind}" if has else f"--no-{kind}"
                state = "has" if has else "has no"
                noun = {"regions": "region"}.get(kind, kind)
                raise StoreError(
                    f"feature store {self.path} {state} {noun} features, but this run "
                    f"{'skips' if has else 'asks for'} them. Run with {flag}, or write to a "
                    "new --out path."
                )
        differences = _settings_differences(stored, settings)
        if differences:
            raise StoreError(
                f"feature store {self.path} was written with other extractor settings: "
                + "; ".join(differences)
                + ". Run with the store's settings, or write to a new --out path."
            )

    # ------------------------------------------------------------------ writing

    def append_images(self, new_paths: Sequence[str]) -> None:
        """Add rows for ``new_paths``; their ``done`` flags read False until written."""
        if not new_paths:
            return
        old = len(self)
        _check_unique([*self.image_paths(), *new_paths])
        if any(not path for path in new_paths):
            raise StoreError("an image path is empty; image paths must be non-empty")
        n = old + len(new_paths)
        # images/path defines N, so it grows last: a crash before it leaves arrays that
        # are longer than images/path, which repair_interrupted_append shrinks back.
        for spec in self.array_specs():
            self.array(spec.name).resize((n, *spec.row_shape))
        paths = self.group["images/path"]
        paths.resize((n,))
        paths[old:n] = np.asarray(new_paths, dtype=object)
        logger.info("appended %d images to %s (now %d)", len(new_paths), self.path, n)

    def repair_interrupted_append(self) -> None:
        """Undo the visible part of an append that a crash cut short.

        :meth:`append_images` resizes the per-image arrays, then ``images/path``, then
        writes the new paths. A crash in between leaves arrays longer than
        ``images/path``, or trailing empty paths. Neither kind of row contains data, so
        both are dropped; the next run appends those images again.
        """
        paths = self.group["images/path"]
        values = np.asarray(paths[:], dtype=object)
        n = len(values)
        while n and not values[n - 1]:
            n -= 1
        if n != len(values):
            logger.warning(
                "feature store %s: dropping %d rows of an interrupted append",
                self.path,
                len(values) - n,
            )
            paths.resize((n,))
        for spec in self.array_specs():
            if spec.name not in self.group:
                continue
            array = self.array(spec.name)
            if array.shape[0] > n:
                logger.warning(
                    "feature store %s: resizing %s from %d to %d rows after an interrupted append",
                    self.path,
                    spec.name,
                    array.shape[0],
                    n,
                )
                array.resize((n, *spec.row_shape))

    def read_chunk(self, chunk: int) -> dict[str, np.ndarray]:
        """Read every per-image array of one chunk, as written so far."""
        rows = self.chunk_rows(chunk)
        return {spec.name: self.array(spec.name)[rows] for spec in self.array_specs()}

    def write_chunk(self, chunk: int, data: Mapping[str, np.ndarray]) -> None:
        """Write whole-chunk data for every per-image array, the ``done`` flags last.

        ``data`` must hold every array of :meth:`array_specs` with exactly the chunk's
        rows, so that a crash before the last write leaves the previous flags in place.
        """
        rows = self.chunk_rows(chunk)
        count = rows.stop - rows.start
        specs = self.array_specs()
        missing = [spec.name for spec in specs if spec.name not in data]
        if missing:
            raise StoreError(f"write_chunk({chunk}) is missing arrays {missing}")
        for spec in specs:
            values = np.asarray(data[spec.name])
            if values.shape != (count, *spec.row_shape):
                raise StoreError(
                    f"write_chunk({chunk}): {spec.name} has shape {values.shape}, "
                    f"expected {(count, *spec.row_shape)}"
                )
        for spec in specs:
            if spec.name != "images/done":
                self.array(spec.name)[rows] = np.asarray(data[spec.name]).astype(
                    spec.dtype, copy=False
                )
        self.array("images/done")[rows] = np.asarray(data["images/done"], dtype=bool)

    def record_failures(
        self, failures: Iterable[Mapping[str, str]], succeeded: Iterable[str] = ()
    ) -> None:
        """Merge ``{"path", "reason"}`` records into the store's failure list.

        Only one process may call this at a time (the extraction driver), because Zarr
        attributes are rewritten whole.
        """
        merged = {item["path"]: dict(item) for item in self.failures}
        for path in succeeded:
            merged.pop(path, None)
        for item in failures:
            merged[item["path"]] = {"path": str(item["path"]), "reason": str(item["reason"])}
        self.group.attrs["failures"] = [merged[key] for key in sorted(merged)]

    def update_attrs(self, **values: Any) -> None:
        self.group.attrs.update(values)

    def write_captions(self, text: Sequence[str], image: Sequence[int]) -> None:
        """Replace the captions with ``text`` and their image rows ``image``."""
        image = np.asarray(image, dtype=np.int32)
        if len(text) != len(image):
            raise StoreError(f"{len(text)} caption texts but {len(image)} caption image rows")
        _check_indices(self.path, "captions/image", image, len(self))
        for name in ("captions/text", "captions/image"):
            if name in self.group:
                del self.group[name]
        m = len(text)
        text_array = self.group.create_array(
            "captions/text",
            shape=(m,),
            chunks=(TEXT_CHUNK,),
            dtype=str,
            fill_value="",
            compressors=_COMPRESSOR,
        )
        image_array = self.group.create_array(
            "captions/image",
            shape=(m,),
            chunks=(TEXT_CHUNK,),
            dtype="int32",
            fill_value=-1,
            compressors=_COMPRESSOR,
        )
        if m:
            text_array[:] = np.asarray(text, dtype=object)
            image_array[:] = image

    def write_splits(self, splits: Mapping[str, Sequence[int]]) -> None:
        """Replace every split with ``splits``: name to rows of images/*."""
        if "splits" in self.group:
            del self.group["splits"]
        splits_group = self.group.require_group("splits")
        for name, rows in splits.items():
            rows = np.asarray(rows, dtype=np.int32)
            _check_indices(self.path, f"splits/{name}", rows, len(self))
            array = splits_group.create_array(
                name,
                shape=rows.shape,
                chunks=(max(1, min(len(rows), 65536)),),
                dtype="int32",
                fill_value=-1,
            )
            if len(rows):
                array[:] = rows

    # ------------------------------------------------------------------ reading

    @property
    def has_captions(self) -> bool:
        return "captions" in self.group and "captions/text" in self.group

    def captions(self) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(text, image)``: caption strings and the image row of each."""
        if not self.has_captions:
            raise StoreError(
                f"feature store {self.path} has no captions. Pass --captions FILE to `dsran extract`."
            )
        text = np.asarray(self.group["captions/text"][:], dtype=object)
        image = np.asarray(self.group["captions/image"][:], dtype=np.int64)
        return text, image

    def splits(self) -> dict[str, np.ndarray]:
        if "splits" not in self.group:
            return {}
        group = self.group["splits"]
        return {
            name: np.asarray(array[:], dtype=np.int64) for name, array in sorted(group.arrays())
        }

    def split(self, name: str) -> np.ndarray:
        splits = self.splits()
        if name not in splits:
            raise StoreError(
                f"feature store {self.path} has no split {name!r}; it has {sorted(splits) or 'none'}. "
                "Splits come from the caption files given to `dsran extract --captions`."
            )
        return splits[name]

    def summary(self) -> str:
        """Describe the store's contents, settings and failures in a few lines."""
        done, failed = self.done(), self.failed()
        lines = [
            f"feature store {self.path} (schema {SCHEMA_VERSION})",
            f"  images: {len(self)} ({int(done.sum())} done, {int(failed.sum())} failed, "
            f"{int((~done & ~failed).sum())} pending), chunks of {self.chunk_images}",
        ]
        if self.has_grid:
            lines.append(f"  grid/features: {tuple(self.array('grid/features').shape)} float16")
        if self.has_regions:
            counts = self.array("regions/count")[:][done]
            mean = f", {counts.mean():.1f} boxes per image" if len(counts) else ""
            lines.append(
                f"  regions/features: {tuple(self.array('regions/features').shape)} float16{mean}"
            )
        if self.has_captions:
            text, image = self.captions()
            lines.append(f"  captions: {len(text)} for {len(np.unique(image))} images")
        for name, rows in self.splits().items():
            lines.append(f"  split {name}: {len(rows)} images")
        for kind, section in self.settings.items():
            if not section:
                continue
            if section.get("random_weights"):
                weights = f"random weights (seed {section.get('random_seed', '?')})"
            elif section.get("weights"):
                weights = (
                    f"{section['weights']} (sha256 {str(section.get('weights_sha256'))[:12]}...)"
                )
            else:
                weights = f"imported ({section.get('source_format', 'unknown format')})"
            lines.append(f"  {kind} weights: {weights}, precision {section.get('precision', '-')}")
        if self.random_weights:
            lines.append("  WARNING: features come from randomly initialised CNN weights")
        for item in self.failures[:10]:
            lines.append(f"  failed: {item['path']}: {item['reason']}")
        if len(self.failures) > 10:
            lines.append(f"  ... and {len(self.failures) - 10} more failures")
        return "\n".join(lines)


def _check_unique(paths: Sequence[str]) -> None:
    seen: set[str] = set()
    for path in paths:
        if path in seen:
            raise StoreError(f"image path {path!r} appears twice; image paths must be unique")
        seen.add(path)


def _check_indices(store_path: Path, name: str, rows: np.ndarray, n: int) -> None:
    rows = np.asarray(rows)
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise StoreError(
            f"feature store {store_path} is invalid: {name} has image rows outside 0..{n - 1} "
            f"(min {rows.min()}, max {rows.max()})"
        )
