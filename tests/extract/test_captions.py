"""COCO captions and Karpathy split readers on fixture files written from the formats."""

from __future__ import annotations

import json
import logging

import pytest
from dsran.extract.captions import (
    CaptionError,
    coco_split_name,
    match_captions,
    read_caption_file,
)


def write_json(path, content):
    path.write_text(json.dumps(content))
    return path


def coco_file(path, images, captions_per_image):
    """A COCO captions file: images {id: file_name}, captions {id: [text, ...]}."""
    annotations = []
    for image_id, texts in captions_per_image.items():
        for text in texts:
            annotations.append({"image_id": image_id, "id": len(annotations), "caption": text})
    content = {
        "info": {},
        "licenses": [],
        "images": [{"id": image_id, "file_name": name} for image_id, name in images.items()],
        "annotations": annotations,
    }
    return write_json(path, content)


def karpathy_file(path, entries):
    """A Karpathy split file from (filepath or None, filename, split, [raw, ...])."""
    images = []
    for number, (folder, file_name, split, texts) in enumerate(entries):
        image = {
            "filename": file_name,
            "split": split,
            "imgid": number,
            "sentences": [{"raw": text, "tokens": text.lower().split()} for text in texts],
        }
        if folder is not None:
            image["filepath"] = folder
        images.append(image)
    return write_json(path, {"dataset": "coco", "images": images})


def test_coco_split_name():
    assert coco_split_name("a/captions_train2017.json") == ("train", "2017")
    assert coco_split_name("captions_val2014.json") == ("val", "2014")
    assert coco_split_name("my_captions.json") is None


def test_coco_train_and_val_files(tmp_path):
    train = coco_file(
        tmp_path / "captions_train2017.json",
        {1: "000001.jpg", 2: "000002.jpg"},
        {2: ["two a", "two b"], 1: ["one a ", "one b", "one c", "one d", "one e", "one f"]},
    )
    val = coco_file(
        tmp_path / "captions_val2017.json",
        {3: "000003.jpg"},
        {3: ["three " + str(n) for n in range(7)]},
    )
    paths = ["train2017/000001.jpg", "train2017/000002.jpg", "val2017/000003.jpg"]
    matched = match_captions([train, val], paths)
    assert matched.text[:6] == ["one a", "one b", "one c", "one d", "one e", "one f"]
    assert matched.image == [0] * 6 + [1] * 2 + [2] * 7
    assert matched.splits == {"train": [0, 1], "val": [2]}
    assert matched.unmatched_images == 0
    assert matched.images_without_captions == 0


def test_coco_2014_names_match_by_basename(tmp_path):
    val = coco_file(
        tmp_path / "captions_val2014.json",
        {9: "COCO_val2014_000000000009.jpg"},
        {9: ["a plate of food"]},
    )
    matched = match_captions([val], ["COCO_val2014_000000000009.jpg"])
    assert matched.image == [0]
    assert matched.splits == {"val": [0]}


def test_coco_file_without_split_name(tmp_path, caplog):
    other = coco_file(tmp_path / "extra.json", {1: "a.jpg"}, {1: ["x"]})
    with caplog.at_level(logging.WARNING):
        matched = match_captions([other], ["a.jpg"])
    assert matched.splits == {}
    assert "captions_<split><year>.json" in caplog.text


def test_karpathy_splits_and_counts(tmp_path):
    split_file = karpathy_file(
        tmp_path / "dataset_coco.json",
        [
            ("val2014", "COCO_val2014_1.jpg", "test", ["t1", "t2", "t3", "t4"]),
            ("train2014", "COCO_train2014_2.jpg", "train", ["r1", "r2", "r3", "r4", "r5"]),
            ("val2014", "COCO_val2014_3.jpg", "restval", ["v1"] * 6),
            ("val2014", "COCO_val2014_4.jpg", "val", ["w1"] * 5),
        ],
    )
    paths = [
        "train2014/COCO_train2014_2.jpg",
        "val2014/COCO_val2014_1.jpg",
        "val2014/COCO_val2014_3.jpg",
        "val2014/COCO_val2014_4.jpg",
    ]
    matched = match_captions([split_file], paths)
    assert matched.image == [1] * 4 + [0] * 5 + [2] * 6 + [3] * 5
    assert matched.text[:4] == ["t1", "t2", "t3", "t4"]
    assert matched.splits == {"test": [1], "train": [0], "restval": [2], "val": [3]}


def test_karpathy_flickr_without_filepath(tmp_path):
    split_file = karpathy_file(
        tmp_path / "dataset_flickr30k.json",
        [(None, "1000092795.jpg", "train", ["a", "b", "c", "d", "e"])],
    )
    matched = match_captions([split_file], ["flickr30k-images/1000092795.jpg"])
    assert matched.image == [0] * 5
    assert matched.splits == {"train": [0]}


def test_karpathy_filepath_disambiguates(tmp_path):
    split_file = karpathy_file(tmp_path / "dataset_coco.json", [("val2014", "x.jpg", "val", ["a"])])
    matched = match_captions([split_file], ["train2014/x.jpg", "val2014/x.jpg"])
    assert matched.image == [1]


def test_ambiguous_file_name_rejected(tmp_path):
    other = coco_file(tmp_path / "extra.json", {1: "x.jpg"}, {1: ["a"]})
    with pytest.raises(CaptionError, match=r"'x.jpg' matches 2 stored images \(a/x.jpg, b/x.jpg\)"):
        match_captions([other], ["a/x.jpg", "b/x.jpg"])


def test_suffix_match_stops_at_slash(tmp_path):
    other = coco_file(tmp_path / "extra.json", {1: "x.jpg"}, {1: ["a"]})
    matched = match_captions([other], ["ax.jpg"])
    assert matched.image == []
    assert matched.unmatched_images == 1


def test_two_sources_for_one_image_rejected(tmp_path):
    first = coco_file(tmp_path / "captions_train2014.json", {1: "x.jpg"}, {1: ["a"]})
    second = karpathy_file(tmp_path / "dataset_coco.json", [("train2014", "x.jpg", "train", ["b"])])
    with pytest.raises(CaptionError, match="has captions in .*captions_train2014.json and again"):
        match_captions([first, second], ["train2014/x.jpg"])


def test_unmatched_counts_and_warnings(tmp_path, caplog):
    train = coco_file(
        tmp_path / "captions_train2017.json",
        {1: "a.jpg", 2: "gone.jpg"},
        {1: ["a1", "a2"], 2: ["g1", "g2", "g3"]},
    )
    with caplog.at_level(logging.WARNING):
        matched = match_captions([train], ["a.jpg", "lonely.jpg"])
    assert matched.unmatched_images == 1
    assert matched.unmatched_captions == 3
    assert matched.images_without_captions == 1
    assert "3 captions of 1 caption-file images are skipped" in caplog.text
    assert "1 of 2 stored images have no captions" in caplog.text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"annotations": []}, "unknown format"),
        ([1, 2], "unknown format"),
        ({"images": [{"filename": "a.jpg"}]}, "unknown format"),
        ({"images": [{"id": 1}], "annotations": []}, "image entry 0 has no 'file_name'"),
        (
            {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"caption": "x"}]},
            "annotation 0 has no 'image_id'",
        ),
        (
            {"images": [{"filename": "a.jpg", "sentences": [], "split": "dev"}]},
            "split 'dev'; valid splits are train, val, test, restval",
        ),
        (
            {"images": [{"filename": "a.jpg", "sentences": [{"tokens": []}], "split": "val"}]},
            "image entry 0 has no 'raw'",
        ),
    ],
)
def test_malformed_files_rejected(tmp_path, content, message):
    path = write_json(tmp_path / "bad.json", content)
    with pytest.raises(CaptionError, match=message):
        read_caption_file(path)


def test_invalid_json_and_missing_file(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(CaptionError, match="is not valid JSON"):
        read_caption_file(tmp_path / "broken.json")
    with pytest.raises(CaptionError, match="caption file not found"):
        read_caption_file(tmp_path / "absent.json")
