"""Report files: JSON, DVC metrics, Markdown beside the paper, plots, ranks CSV, failures."""

import csv
import json

import numpy as np
import pytest
import torch
from dsran.evaluate.protocols import COCO_TEST_IMAGES, build_eval_set, evaluate_protocol
from dsran.evaluate.report import (
    build_results,
    format_failures,
    markdown_report,
    write_reports,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STORE = {
    "path": "feats.zarr",
    "provenance": {"created_utc": "2026-01-01T00:00:00+00:00", "versions": {"dsran": "0.1.0"}},
    "settings": {"grid": {"random_weights": True}, "regions": None},
    "random_weights": True,
}
MODELS = [{"path": "runs/tiny", "best_epoch": 3, "val_rsum": 12.5, "random_cnn_weights": True}]


def make_eval_set(captions_per_image):
    num_images = len(captions_per_image)
    caption_image = np.repeat(np.arange(num_images), captions_per_image)
    return build_eval_set(
        "test",
        np.arange(num_images) + 10,  # store rows differ from positions
        caption_image + 10,
        np.array([f"img{i}.jpg" for i in range(num_images + 10)], dtype=object),
        np.array([f"caption {c}" for c in range(len(caption_image))], dtype=object),
    )


@pytest.fixture
def small_result():
    """Four images with 4, 6, 4 and 6 captions, two of them misplaced.

    Caption 0 (of image 0) matches image 2 and ranks 2nd. Caption 4 (of image 1)
    scores 1.5 with image 0 and 1.0 with image 3, so it ranks 3rd and image 0 ranks
    its own best caption 2nd.
    """
    eval_set = make_eval_set([4, 6, 4, 6])
    targets = eval_set.caption_image.copy()
    targets[0], targets[4] = 2, 3
    images = torch.eye(4)
    captions = images[torch.from_numpy(targets)]
    captions[4] += 1.5 * images[0]
    result = evaluate_protocol("test", eval_set, [images], [captions], device="cpu")
    return result, eval_set


def test_reports_written(tmp_path, small_result):
    result, eval_set = small_result
    paths = write_reports(tmp_path / "eval", result, eval_set, MODELS, STORE)

    assert sorted(path.name for path in paths.values()) == [
        "metrics.json",
        "rank_histogram.png",
        "ranks.csv",
        "recall_at_k.png",
        "results.json",
        "results.md",
    ]
    for name in ("recall_at_k.png", "rank_histogram.png"):
        data = (tmp_path / "eval" / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
        assert len(data) > 5000, name

    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["protocol"] == "test"
    assert results["num_images"] == 4
    assert results["num_captions"] == 20
    assert results["metrics"] == pytest.approx(result.metrics)
    assert results["folds"][0]["name"] == "all"
    assert results["models"] == MODELS
    assert results["store"]["provenance"] == STORE["provenance"]
    assert results["random_cnn_weights"] is True
    assert results["paper"]["metrics"]["rsum"] == 498.7
    assert "strictly above" in results["tie_rule"]

    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["rsum"] == pytest.approx(result.metrics["rsum"], abs=1e-4)
    assert metrics["num_captions"] == 20
    assert all(not isinstance(value, dict) for value in metrics.values())


def test_ranks_csv_rows(tmp_path, small_result):
    result, eval_set = small_result
    write_reports(tmp_path, result, eval_set, MODELS, STORE)
    with (tmp_path / "ranks.csv").open() as file:
        rows = list(csv.DictReader(file))

    assert len(rows) == 4 + 20
    image_rows = [row for row in rows if row["direction"] == "i2t"]
    caption_rows = [row for row in rows if row["direction"] == "t2i"]
    assert [int(row["rank"]) for row in image_rows] == result.folds[0].ranks.i2t.tolist()
    assert [int(row["rank"]) for row in caption_rows] == result.folds[0].ranks.t2i.tolist()
    # Image 0 (store row 10) ranks caption 4 first; its own best caption is caption 1.
    assert image_rows[0]["query_row"] == "10"
    assert image_rows[0]["query"] == "img10.jpg"
    assert image_rows[0]["top1"] == "caption 4"
    assert image_rows[0]["positive"] == "caption 1"
    assert image_rows[0]["rank"] == "2"
    # Caption 0 of image 0 points at image 2 (store row 12).
    assert caption_rows[0]["positive"] == "img10.jpg"
    assert caption_rows[0]["top1_row"] == "12"


def test_markdown_beside_paper(small_result):
    result, eval_set = small_result
    text = markdown_report(build_results(result, eval_set, MODELS, STORE))
    assert "randomly initialised weights" in text
    assert "| 74.6 | 93.8 | 97.2 | 57.8 | 84.8 | 90.6 | 498.7 |" in text
    assert "Flickr30K 1K test" in text
    assert f"| {result.metrics['rsum']:.1f} |" in text
    assert "runs/tiny" in text

    pretrained = {**STORE, "random_weights": False}
    models = [{**MODELS[0], "random_cnn_weights": False}, {"path": "runs/other"}]
    text = markdown_report(build_results(result, eval_set, models, pretrained))
    assert "randomly initialised" not in text
    assert "two-model ensemble" in text
    assert "| 76.3 | 94.4 | 97.5 | 60.0 | 85.8 | 91.9 | 505.9 |" in text


def test_fold_reports():
    eval_set = make_eval_set([1] * COCO_TEST_IMAGES)
    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(COCO_TEST_IMAGES, 8, generator=generator))
    captions = torch.nn.functional.normalize(
        images + 0.3 * torch.randn(images.shape, generator=generator)
    )
    result = evaluate_protocol("1k-5fold", eval_set, [images], [captions], device="cpu")

    results = build_results(result, eval_set, MODELS, STORE)
    text = markdown_report(results)

    assert [fold["name"] for fold in results["folds"]] == [f"fold{i}" for i in range(1, 6)]
    assert results["paper"]["metrics"]["rsum"] == 518.4
    assert "## Folds" in text
    for fold in results["folds"]:
        assert f"| {fold['name']} | {fold['metrics']['i2t_r1']:.1f} |" in text
    mean_r1 = np.mean([fold["metrics"]["t2i_r1"] for fold in results["folds"]])
    assert results["metrics"]["t2i_r1"] == pytest.approx(mean_r1)


def test_failures_list_worst_queries(small_result):
    result, eval_set = small_result
    text = format_failures(result, eval_set, 1)
    lines = text.splitlines()

    assert lines[0] == "Worst 1 text queries (text-to-image):"
    assert lines[1] == "  rank 3 (all): 'caption 4'"
    assert lines[2] == "      its image: img11.jpg"
    assert lines[3] == "      top-1 image: img10.jpg"
    assert lines[4] == "Worst 1 image queries (image-to-text):"
    assert lines[5] == "  rank 2 (all): img10.jpg"
    assert lines[6:10] == [f"      its caption: 'caption {c}'" for c in range(4)]
    assert lines[10] == "      top-1 caption: 'caption 4'"
