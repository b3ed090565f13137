"""The Visual Genome object and attribute vocabularies of the region detector.

Stored ids follow the published feature files: ``regions/object_ids`` index the 1600
object names and ``regions/attribute_ids`` the 400 attribute names, both 0-based, with
the classifier's background output (index 0 of 1601) and the attribute head's
"no attribute" output (index 0 of 401) left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

NUM_OBJECTS = 1600
NUM_ATTRIBUTES = 400


@dataclass(frozen=True)
class Vocabulary:
    """Display names of the Visual Genome classes, indexed by stored id."""

    objects: tuple[str, ...]  # 1600 object names, the first synonym of each line
    attributes: tuple[str, ...]  # 400 attribute names, the first synonym of each line

    def object_name(self, object_id: int) -> str:
        """Return the name of a stored object id (0..1599)."""
        return _lookup(self.objects, object_id, "object")

    def attribute_name(self, attribute_id: int) -> str:
        """Return the name of a stored attribute id (0..399)."""
        return _lookup(self.attributes, attribute_id, "attribute")

    def label(self, object_id: int, attribute_id: int | None = None) -> str:
        """Return "attribute object", or only the object name when ``attribute_id`` is None or -1."""
        name = self.object_name(object_id)
        if attribute_id is None or attribute_id < 0:
            return name
        return f"{self.attribute_name(attribute_id)} {name}"


def _lookup(names: tuple[str, ...], index: int, kind: str) -> str:
    if not 0 <= index < len(names):
        raise ValueError(
            f"invalid Visual Genome {kind} id {index}: valid ids are 0..{len(names) - 1} "
            "(padding rows store -1 and have no name)"
        )
    return names[index]


def _read_names(file_name: str, expected: int) -> tuple[str, ...]:
    text = resources.files("dsran.extract").joinpath("vocab", file_name).read_text(encoding="utf-8")
    names = tuple(line.split(",")[0].strip() for line in text.splitlines())
    if len(names) != expected:
        raise RuntimeError(
            f"the packaged vocabulary {file_name} has {len(names)} lines, expected {expected}; "
            "reinstall dsran"
        )
    return names


@lru_cache(maxsize=1)
def load_vocabulary() -> Vocabulary:
    """Read the packaged object and attribute vocabularies once."""
    return Vocabulary(
        objects=_read_names("objects_vocab.txt", NUM_OBJECTS),
        attributes=_read_names("attributes_vocab.txt", NUM_ATTRIBUTES),
    )
