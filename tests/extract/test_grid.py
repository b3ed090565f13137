"""The grid extractor, its weights lookup and the device and precision helpers."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from dsran.extract.base import (
    ExtractorError,
    ExtractorOptions,
    FeatureExtractor,
    build_extractor,
    cpu_supports_bf16,
    resolve_device,
    resolve_precision,
)
from dsran.extract.grid import GridExtractor, build_resnet152_body
from dsran.pipelines.cli import cli
from PIL import Image
from torchvision.models import resnet152

from tests.extract.conftest import SAMPLE_IMAGES, extract_args

CACHED_NAME = "resnet152-394f9c45.pth"  # torchvision ResNet152_Weights.IMAGENET1K_V1


@pytest.fixture()
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def test_missing_weights_message(empty_torch_home, mini_images, tmp_path):
    out = tmp_path / "feats.zarr"
    args = [arg for arg in extract_args(mini_images, out) if arg != "--random-weights"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert f"Put {CACHED_NAME}" in result.output
    assert f"in {empty_torch_home / 'hub' / 'checkpoints'}" in result.output
    assert "--grid-weights PATH" in result.output
    assert "--random-weights" in result.output
    assert not out.exists()


def test_weights_from_cache_and_file(empty_torch_home):
    checkpoints = empty_torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    network = resnet152()
    torch.save(network.state_dict(), checkpoints / CACHED_NAME)
    sha256 = hashlib.sha256((checkpoints / CACHED_NAME).read_bytes()).hexdigest()

    cached = GridExtractor.from_options(ExtractorOptions(device="cpu", precision="fp32"))
    assert cached.weights == checkpoints / CACHED_NAME
    settings = cached.settings()
    assert settings["weights"] == CACHED_NAME
    assert settings["weights_sha256"] == sha256
    assert settings["random_weights"] is False

    body = build_resnet152_body(checkpoints / CACHED_NAME, seed=0)
    assert torch.equal(body[4][0].conv1.weight, network.layer1[0].conv1.weight)
    assert torch.equal(body[7][2].bn3.running_var, network.layer4[2].bn3.running_var)

    explicit = GridExtractor.from_options(
        ExtractorOptions(device="cpu", grid_weights=str(checkpoints / CACHED_NAME))
    )
    assert explicit.settings()["weights_sha256"] == sha256


def test_bad_weights_files(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1), "extra.bias": torch.zeros(1)}, tmp_path / "w.pth")
    with pytest.raises(
        ExtractorError, match=r"do not match torchvision's ResNet152: \d+ missing"
    ) as error:
        GridExtractor.from_options(ExtractorOptions(grid_weights=str(tmp_path / "w.pth")))
    assert "1 unexpected (first: ['extra.bias'])" in str(error.value)
    assert "conv1.weight (1,) (expected (64, 3, 7, 7))" in str(error.value)

    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ExtractorError, match="cannot read grid weights .*text.pth"):
        GridExtractor.from_options(ExtractorOptions(grid_weights=str(tmp_path / "text.pth")))

    with pytest.raises(ExtractorError, match="grid weights file not found: .*absent.pth"):
        GridExtractor.from_options(ExtractorOptions(grid_weights=str(tmp_path / "absent.pth")))


def test_grid_features_row_major():
    options = ExtractorOptions(device="cpu", precision="fp32", random_weights=True)
    extractor = build_extractor("grid", options)
    assert isinstance(extractor, FeatureExtractor)
    assert extractor.kind == "grid"
    settings = extractor.settings()
    assert json.loads(json.dumps(settings)) == settings
    assert settings["random_weights"] is True

    path = sorted((SAMPLE_IMAGES / "train2017").glob("*.jpg"))[0]
    with Image.open(path) as image:
        item = extractor.preprocess(image.convert("RGB"))
    assert item.shape == (3, 224, 224)
    features = extractor.extract([item])["grid/features"]
    assert features.shape == (1, 49, 2048)
    assert features.dtype == np.float32
    assert np.isfinite(features).all()
    assert np.abs(features).max() < 1000, "random weights must stay in float16 range"

    with torch.inference_mode():
        maps = extractor.network(item[None].to(memory_format=torch.channels_last)).float()
    assert np.array_equal(features[0, 1 * 7 + 3], maps[0, :, 1, 3].numpy())
    assert np.array_equal(features[0, 6 * 7 + 0], maps[0, :, 6, 0].numpy())


def test_random_weights_are_seeded():
    first = build_resnet152_body(None, seed=3)
    second = build_resnet152_body(None, seed=3)
    other = build_resnet152_body(None, seed=4)
    assert torch.equal(first[7][0].conv2.weight, second[7][0].conv2.weight)
    assert not torch.equal(first[7][0].conv2.weight, other[7][0].conv2.weight)


def test_precision_resolution():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_supports_bf16() else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    with pytest.raises(ExtractorError, match="'fp16' needs a CUDA device; on CPU use"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ExtractorError, match="valid precisions are auto, fp32, bf16, fp16"):
        resolve_precision("fp64", cpu)


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(
        ExtractorError, match="unknown device 'tpu'; valid devices are auto, cpu, cuda"
    ):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ExtractorError, match="no CUDA device"):
            resolve_device("cuda")


def test_unknown_kind_lists_valid_ones():
    with pytest.raises(ExtractorError, match="unknown feature kind 'pixels'; valid kinds are grid"):
        build_extractor("pixels", ExtractorOptions())
