"""Imports of MILVLG .npz and bottom-up-attention TSV feature dumps into a feature store.

The dumps are written here the way the published tools write them: ``np.savez_compressed``
with an ``info`` dict (MILVLG's save_roi_features) and ``csv.DictWriter`` rows of base64
float32 arrays (generate_tsv.py).
"""

from __future__ import annotations

import base64
import csv
import os

import numpy as np
import pytest
from dsran.extract.importers import (
    FeatureImportError,
    ImageMatcher,
    import_regions,
    import_settings,
    iter_bottom_up_tsv,
    iter_milvlg_folder,
    read_milvlg_npz,
)
from dsran.extract.store import FeatureStore, StoreError

IMAGES = ["train2017/000000000790.jpg", "val2017/000000000139.jpg", "val2017/000000000285.jpg"]


def _regions(seed: int, count: int) -> dict[str, np.ndarray]:
    generator = np.random.default_rng(seed)
    corners = generator.uniform(0, 300, size=(count, 2)).astype(np.float32)
    return {
        "features": generator.uniform(0, 8, size=(count, 2048)).astype(np.float32),
        "boxes": np.concatenate([corners, corners + 20], axis=1),
        "objects_id": generator.integers(0, 1600, size=count),
        "objects_conf": generator.uniform(0.2, 1, size=count).astype(np.float32),
        "attrs_id": generator.integers(0, 400, size=count),
        "attrs_conf": generator.uniform(0, 1, size=count).astype(np.float32),
    }


def write_milvlg_npz(path, image_id: str, regions, width=640, height=480) -> None:
    """Write one file as MILVLG's save_roi_features does."""
    info = {
        "image_id": image_id,
        "image_h": height,
        "image_w": width,
        "num_boxes": len(regions["features"]),
        "objects_id": regions["objects_id"],
        "objects_conf": regions["objects_conf"],
        "attrs_id": regions["attrs_id"],
        "attrs_conf": regions["attrs_conf"],
    }
    np.savez_compressed(
        path,
        x=regions["features"],
        bbox=regions["boxes"],
        num_bbox=len(regions["features"]),
        image_h=height,
        image_w=width,
        info=info,
    )


def write_tsv(path, rows, as_bytes_repr: bool, lxmert: bool = False) -> None:
    """Write rows as generate_tsv.py does: no header, base64 float32 arrays."""

    def encode(array: np.ndarray) -> str:
        encoded = base64.b64encode(np.ascontiguousarray(array))
        # Python 3 ports write str(bytes), which keeps the b'...' wrapper.
        return str(encoded) if as_bytes_repr else encoded.decode("ascii")

    if lxmert:
        fields = ["img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id"]
        fields += ["attrs_conf", "num_boxes", "boxes", "features"]
    else:
        fields = ["image_id", "image_w", "image_h", "num_boxes", "boxes", "features"]
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, delimiter="\t", fieldnames=fields)
        for image_id, regions in rows:
            row = {
                "num_boxes": len(regions["features"]),
                "boxes": encode(regions["boxes"]),
                "features": encode(regions["features"]),
            }
            prefix = "img" if lxmert else "image"
            row |= {f"{prefix}_id": image_id, f"{prefix}_w": 640, f"{prefix}_h": 480}
            if lxmert:
                for field in ("objects_id", "objects_conf", "attrs_id", "attrs_conf"):
                    row[field] = encode(regions[field])
            writer.writerow(row)


@pytest.fixture
def npz_folder(tmp_path):
    folder = tmp_path / "npz"
    folder.mkdir()
    dumps = {"000000000790": _regions(1, 12), "000000000139": _regions(2, 3)}
    for image_id, regions in dumps.items():
        write_milvlg_npz(folder / f"{image_id}.npz", image_id, regions)
    return folder, dumps


def test_npz_import_writes_regions(npz_folder, tmp_path):
    folder, dumps = npz_folder
    out = tmp_path / "feats.zarr"
    settings = import_settings("milvlg-npz", [folder], max_boxes=16)
    report = import_regions(iter_milvlg_folder(folder), out, IMAGES, settings, chunk_images=2)
    assert report.imported == 2
    assert report.missing == 1
    assert report.unmatched == []

    store = FeatureStore.open(out, require_complete=True)
    assert store.settings["regions"]["source_format"] == "milvlg-npz"
    assert store.max_regions == 16
    assert store.done().tolist() == [True, True, False]
    assert store.failed().tolist() == [False, False, True]
    assert store.failures[0]["path"] == IMAGES[2]

    expected = dumps["000000000790"]
    features = store.array("regions/features")[0]
    assert np.allclose(features[:12], expected["features"], rtol=1e-3)
    assert not features[12:].any()
    assert np.array_equal(store.array("regions/boxes")[0][:12], expected["boxes"])
    assert store.array("regions/count")[:].tolist() == [12, 3, 0]
    object_ids = store.array("regions/object_ids")[1]
    assert object_ids[:3].tolist() == dumps["000000000139"]["objects_id"].tolist()
    assert (object_ids[3:] == -1).all()
    attribute_scores = store.array("regions/attribute_scores")[1][:3]
    assert np.array_equal(attribute_scores, dumps["000000000139"]["attrs_conf"])
    assert store.array("images/width")[0] == 640
    assert store.array("images/height")[0] == 480


def test_npz_reader_refuses_code_in_info(tmp_path):
    path = tmp_path / "evil.npz"
    regions = _regions(3, 2)
    np.savez(
        path,
        x=regions["features"],
        bbox=regions["boxes"],
        image_w=10,
        image_h=10,
        info=np.array(os.system, dtype=object),
    )
    with pytest.raises(FeatureImportError, match="refusing to load"):
        read_milvlg_npz(path)


def test_npz_without_features_is_rejected(tmp_path):
    path = tmp_path / "partial.npz"
    np.savez(path, bbox=np.zeros((1, 4), np.float32), image_w=10, image_h=10)
    with pytest.raises(FeatureImportError, match=r"arrays \['x'\] are missing"):
        read_milvlg_npz(path)


@pytest.mark.parametrize("as_bytes_repr", [True, False])
def test_tsv_import_matches_coco_ids(tmp_path, as_bytes_repr):
    images = ["val2014/COCO_val2014_000000000042.jpg", "val2014/COCO_val2014_000000000073.jpg"]
    rows = [(73, _regions(4, 5)), (42, _regions(5, 10))]
    path = tmp_path / "karpathy_val_resnet101_faster_rcnn_genome.tsv"
    write_tsv(path, rows, as_bytes_repr)
    out = tmp_path / "feats.zarr"
    settings = import_settings("bottom-up-tsv", [path], max_boxes=10)
    report = import_regions(iter_bottom_up_tsv(path), out, images, settings)
    assert report.imported == 2

    store = FeatureStore.open(out, require_complete=True)
    assert store.array("regions/count")[:].tolist() == [10, 5]
    boxes = store.array("regions/boxes")[1][:5]
    assert np.array_equal(boxes, rows[0][1]["boxes"])
    # The plain TSV has no predictions: ids stay -1 and scores 0 on real rows too.
    assert (store.array("regions/object_ids")[:] == -1).all()
    assert not store.array("regions/object_scores")[:].any()


def test_tsv_lxmert_variant_keeps_predictions(tmp_path):
    regions = _regions(6, 4)
    path = tmp_path / "lxmert.tsv"
    write_tsv(path, [("COCO_val2014_000000000042", regions)], as_bytes_repr=False, lxmert=True)
    (record,) = list(iter_bottom_up_tsv(path))
    assert record.image_id == "COCO_val2014_000000000042"
    assert record.object_ids.tolist() == regions["objects_id"].tolist()
    assert np.array_equal(record.attribute_scores, regions["attrs_conf"])
    assert record.width == 640
    assert record.height == 480


def test_tsv_box_count_mismatch_is_rejected(tmp_path):
    regions = _regions(7, 3)
    path = tmp_path / "bad.tsv"
    write_tsv(path, [(1, regions)], as_bytes_repr=False)
    text = path.read_text().replace("\t3\t", "\t4\t", 1)
    path.write_text(text)
    with pytest.raises(FeatureImportError, match=r"bad.tsv:1: num_boxes is 4"):
        list(iter_bottom_up_tsv(path))


def test_tsv_wrong_field_count_is_rejected(tmp_path):
    path = tmp_path / "short.tsv"
    path.write_text("1\t640\t480\n")
    with pytest.raises(FeatureImportError, match="has 3 tab-separated fields per row, expected 6"):
        list(iter_bottom_up_tsv(path))


def test_too_many_regions_names_the_fix(npz_folder, tmp_path):
    folder, _ = npz_folder
    settings = import_settings("milvlg-npz", [folder], max_boxes=10)
    with pytest.raises(FeatureImportError, match="has 12 regions .* import with --max-boxes 12"):
        import_regions(iter_milvlg_folder(folder), tmp_path / "feats.zarr", IMAGES, settings)


def test_import_resumes_and_checks_settings(npz_folder, tmp_path):
    folder, dumps = npz_folder
    out = tmp_path / "feats.zarr"
    settings = import_settings("milvlg-npz", [folder], max_boxes=16)
    import_regions(iter_milvlg_folder(folder), out, IMAGES, settings)

    write_milvlg_npz(folder / "000000000285.npz", "000000000285", _regions(8, 2))
    report = import_regions(iter_milvlg_folder(folder), out, IMAGES, settings)
    assert report.skipped_done == 2
    assert report.imported == 1
    store = FeatureStore.open(out, require_complete=True)
    assert store.done().all()
    assert store.failures == []

    other = import_settings("milvlg-npz", [folder], max_boxes=20)
    with pytest.raises(StoreError, match="max_boxes"):
        import_regions(iter_milvlg_folder(folder), out, IMAGES, other)


def test_unmatched_records_are_reported(npz_folder, tmp_path):
    folder, _ = npz_folder
    write_milvlg_npz(folder / "999.npz", "999", _regions(9, 2))
    settings = import_settings("milvlg-npz", [folder], max_boxes=16)
    report = import_regions(iter_milvlg_folder(folder), tmp_path / "feats.zarr", IMAGES, settings)
    assert report.unmatched == ["999"]


def test_matcher_rejects_ambiguous_stems():
    matcher = ImageMatcher(["a/x.jpg", "b/x.jpg", "b/y_0007.png"])
    assert matcher.row("b/x") == 1
    assert matcher.row("y_0007") == 2
    assert matcher.row("7") == 2
    assert matcher.row("z") is None
    with pytest.raises(FeatureImportError, match="matches 2 images by stem"):
        matcher.row("x")


def test_unknown_format_lists_valid_ones():
    with pytest.raises(FeatureImportError, match="valid formats are milvlg-npz, bottom-up-tsv"):
        import_settings("h5", [], max_boxes=100)
