"""Caption and split readers: COCO captions JSON and the Karpathy split JSON.

Two formats are read, and the format is detected from the content:

- COCO captions (``captions_train2014.json``, ``captions_val2017.json``, ...): a dict
  with ``images`` (``id``, ``file_name``) and ``annotations`` (``image_id``,
  ``caption``). The split name comes from the file name: ``captions_<split><year>.json``
  gives split ``<split>`` (``captions_train2017.json`` -> ``train``,
  ``captions_val2014.json`` -> ``val``). A file named otherwise adds captions but no split.
- Karpathy splits (``dataset_coco.json``, ``dataset_flickr30k.json``): a dict with
  ``images``, each with ``filename``, optional ``filepath``, ``split`` (train, val,
  test or restval) and ``sentences`` (each with ``raw``).

Matching caption entries to stored images: each entry gives candidate paths, most
specific first. A Karpathy entry gives ``filepath/filename`` then ``filename``; a COCO
entry gives ``<split><year>/file_name`` then ``file_name``. A candidate matches a stored
image path when it equals the path or is a suffix of it at a ``/`` boundary
(``train2017/x.jpg`` matches ``images/train2017/x.jpg`` but not ``xtrain2017/x.jpg``),
case-sensitively. The first candidate that matches any stored image decides. If it
matches more than one, the entry is ambiguous and reading fails with
:class:`CaptionError`.

Captions keep the order of their file: entries in file order, sentences in order.
Every caption is kept, whatever the number per image (COCO has images with 6 or 7).
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

KARPATHY_SPLITS = ("train", "val", "test", "restval")
_COCO_FILE_NAME = re.compile(r"captions_(?P<split>[a-z]+)(?P<year>\d{4})\.json$")


class CaptionError(ValueError):
    """A caption file is missing, malformed or cannot be matched to the stored images."""


@dataclass
class CaptionEntry:
    """The captions of one image as a caption file lists them."""

    candidates: tuple[str, ...]  # paths to match against stored images, most specific first
    sentences: list[str]  # caption texts in file order
    split: str | None  # split name, or None when the file gives none
    source: str  # caption file the entry comes from, for messages


@dataclass
class MatchedCaptions:
    """Captions and splits matched to the rows of a feature store."""

    text: list[str] = field(default_factory=list)  # (M,) caption strings
    image: list[int] = field(default_factory=list)  # (M,) image row of each caption
    splits: dict[str, list[int]] = field(default_factory=dict)  # split name -> image rows
    unmatched_images: int = 0  # caption entries whose image is not in the store
    unmatched_captions: int = 0  # captions of those entries
    images_without_captions: int = 0  # stored images that no caption entry names


def read_caption_file(path: str | Path) -> list[CaptionEntry]:
    """Read one COCO captions or Karpathy split file into caption entries."""
    path = Path(path)
    if not path.is_file():
        raise CaptionError(f"caption file not found: {path}")
    try:
        with path.open(encoding="utf-8") as handle:
            content = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CaptionError(f"caption file {path} is not valid JSON: {error}") from error
    if not isinstance(content, dict) or not isinstance(content.get("images"), list):
        raise CaptionError(_unknown_format_message(path))
    if isinstance(content.get("annotations"), list):
        return _read_coco(path, content)
    images = content["images"]
    if images and isinstance(images[0], dict) and "sentences" in images[0]:
        return _read_karpathy(path, content)
    raise CaptionError(_unknown_format_message(path))


def _unknown_format_message(path: Path) -> str:
    return (
        f"caption file {path} has an unknown format: expected COCO captions "
        "(keys 'images' and 'annotations', e.g. captions_train2017.json) or a Karpathy "
        "split file (key 'images' with 'filename', 'split' and 'sentences', e.g. "
        "dataset_coco.json)"
    )


def coco_split_name(path: str | Path) -> tuple[str, str] | None:
    """Return ``(split, year)`` from a COCO captions file name, or None when it has none."""
    match = _COCO_FILE_NAME.search(Path(path).name)
    if match is None:
        return None
    return match["split"], match["year"]


def _read_coco(path: Path, content: dict[str, Any]) -> list[CaptionEntry]:
    split_and_year = coco_split_name(path)
    if split_and_year is None:
        logger.warning(
            "caption file %s is not named captions_<split><year>.json, so its images get no split",
            path,
        )
    sentences: dict[Any, list[str]] = defaultdict(list)
    for number, annotation in enumerate(content["annotations"]):
        try:
            sentences[annotation["image_id"]].append(str(annotation["caption"]).strip())
        except (KeyError, TypeError) as error:
            raise CaptionError(
                f"caption file {path}: annotation {number} has no {error} field; COCO "
                "annotations need 'image_id' and 'caption'"
            ) from None
    entries = []
    seen_ids = set()
    for number, image in enumerate(content["images"]):
        try:
            image_id, file_name = image["id"], str(image["file_name"])
        except (KeyError, TypeError) as error:
            raise CaptionError(
                f"caption file {path}: image entry {number} has no {error} field; COCO "
                "images need 'id' and 'file_name'"
            ) from None
        if image_id in seen_ids:
            raise CaptionError(f"caption file {path}: image id {image_id} is listed twice")
        seen_ids.add(image_id)
        if split_and_year is None:
            candidates: tuple[str, ...] = (file_name,)
            split = None
        else:
            split, year = split_and_year
            candidates = (f"{split}{year}/{file_name}", file_name)
        entries.append(CaptionEntry(candidates, sentences.pop(image_id, []), split, str(path)))
    if sentences:
        missing = sorted(sentences, key=str)[:5]
        logger.warning(
            "caption file %s: %d annotations name image ids missing from its 'images' list "
            "(first: %s); they are skipped",
            path,
            sum(len(texts) for texts in sentences.values()),
            missing,
        )
    return entries


def _read_karpathy(path: Path, content: dict[str, Any]) -> list[CaptionEntry]:
    entries = []
    for number, image in enumerate(content["images"]):
        try:
            file_name = str(image["filename"])
            split = str(image["split"])
            texts = [str(sentence["raw"]).strip() for sentence in image["sentences"]]
        except (KeyError, TypeError) as error:
            raise CaptionError(
                f"caption file {path}: image entry {number} has no {error} field; Karpathy "
                "split entries need 'filename', 'split' and 'sentences' with 'raw'"
            ) from None
        if split not in KARPATHY_SPLITS:
            raise CaptionError(
                f"caption file {path}: image {file_name} has split {split!r}; "
                f"valid splits are {', '.join(KARPATHY_SPLITS)}"
            )
        folder = image.get("filepath")
        candidates = (f"{folder}/{file_name}", file_name) if folder else (file_name,)
        entries.append(CaptionEntry(candidates, texts, split, str(path)))
    return entries


class _SuffixIndex:
    """Stored image paths indexed by every suffix that starts at a ``/`` boundary."""

    def __init__(self, image_paths: Sequence[str]):
        self.image_paths = list(image_paths)
        self.rows: dict[str, list[int]] = defaultdict(list)
        for row, image_path in enumerate(self.image_paths):
            parts = image_path.split("/")
            for start in range(len(parts)):
                self.rows["/".join(parts[start:])].append(row)

    def match(self, entry: CaptionEntry) -> int | None:
        for candidate in entry.candidates:
            rows = self.rows.get(candidate.strip("/"))
            if not rows:
                continue
            if len(rows) > 1:
                examples = ", ".join(self.image_paths[row] for row in rows[:5])
                raise CaptionError(
                    f"caption file {entry.source}: image {candidate!r} matches {len(rows)} "
                    f"stored images ({examples}). Pass --images at a folder where each caption "
                    "file name is unique, or use a caption file whose paths include the folder."
                )
            return rows[0]
        return None


def match_captions(
    caption_files: Sequence[str | Path], image_paths: Sequence[str]
) -> MatchedCaptions:
    """Read every caption file and map its captions and splits onto ``image_paths`` rows.

    An image may receive captions from one caption file entry only: two entries for the
    same stored image (in one file or across files) raise :class:`CaptionError`, because
    they would duplicate captions or put one image in two splits.
    """
    index = _SuffixIndex(image_paths)
    matched = MatchedCaptions()
    owner: dict[int, str] = {}
    for caption_file in caption_files:
        for entry in read_caption_file(caption_file):
            row = index.match(entry)
            if row is None:
                matched.unmatched_images += 1
                matched.unmatched_captions += len(entry.sentences)
                continue
            if row in owner:
                raise CaptionError(
                    f"stored image {image_paths[row]!r} has captions in {owner[row]} and again "
                    f"in {entry.source}. Give each image one caption source (for COCO, either "
                    "the captions_*.json files or dataset_coco.json, not both)."
                )
            owner[row] = entry.source
            matched.text += entry.sentences
            matched.image += [row] * len(entry.sentences)
            if entry.split is not None:
                matched.splits.setdefault(entry.split, []).append(row)

    with_captions = set(matched.image)
    matched.images_without_captions = len(image_paths) - len(with_captions)
    _log_unmatched(matched, len(image_paths))
    return matched


def _log_unmatched(matched: MatchedCaptions, num_images: int) -> None:
    if matched.unmatched_images:
        logger.warning(
            "%d captions of %d caption-file images are skipped: those images are not in "
            "the image folder",
            matched.unmatched_captions,
            matched.unmatched_images,
        )
    if matched.images_without_captions:
        logger.warning(
            "%d of %d stored images have no captions in the caption files",
            matched.images_without_captions,
            num_images,
        )
