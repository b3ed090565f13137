"""Loading the published detector checkpoint format by parameter name.

The checkpoints here are built from an independent list of the parameter names and
shapes of MILVLG's detectron2 conversion (bua-caffe-frcn-r101-k10-100.pth), not from
the model's own state dict, so a renamed module fails these tests.
"""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest
import torch
from dsran.extract.detector import VisualGenomeDetector
from dsran.extract.detector_weights import (
    DetectorWeightsError,
    load_detector_weights,
    read_checkpoint,
)
from dsran.extract.regions import RegionExtractor


def _conv_norm(prefix: str, out_channels: int, in_channels: int, kernel: int, counter: bool):
    """A detectron2 Conv2d with a norm: frozen BN has no step counter, trainable BN does."""
    shapes = {f"{prefix}.weight": (out_channels, in_channels, kernel, kernel)}
    for name in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{prefix}.norm.{name}"] = (out_channels,)
    if counter:
        shapes[f"{prefix}.norm.num_batches_tracked"] = ()
    return shapes


def _stage(prefix, blocks, in_channels, bottleneck, out_channels, counter):
    shapes = {}
    for index in range(blocks):
        block = f"{prefix}.{index}"
        block_in = in_channels if index == 0 else out_channels
        if index == 0:
            shapes |= _conv_norm(f"{block}.shortcut", out_channels, block_in, 1, counter)
        shapes |= _conv_norm(f"{block}.conv1", bottleneck, block_in, 1, counter)
        shapes |= _conv_norm(f"{block}.conv2", bottleneck, bottleneck, 3, counter)
        shapes |= _conv_norm(f"{block}.conv3", out_channels, bottleneck, 1, counter)
    return shapes


def published_shapes() -> dict[str, tuple[int, ...]]:
    """Names and shapes of MILVLG's caffe R101 checkpoint with attributes.

    configs/caffe/test-caffe-r101.yaml sets NORM "BN" with FREEZE_AT 3. So the stem, res2
    and res3 have FrozenBatchNorm2d buffers, and res4 and res5 trainable BatchNorm2d ones
    with num_batches_tracked. The 2020 detectron2 anchor generator also saved its cell
    anchors as a persistent buffer.
    """
    shapes = _conv_norm("backbone.stem.conv1", 64, 3, 7, counter=False)
    shapes |= _stage("backbone.res2", 3, 64, 64, 256, counter=False)
    shapes |= _stage("backbone.res3", 4, 256, 128, 512, counter=False)
    shapes |= _stage("backbone.res4", 23, 512, 256, 1024, counter=True)
    rpn = "proposal_generator.rpn_head"
    shapes |= {
        f"{rpn}.conv.weight": (512, 1024, 3, 3),
        f"{rpn}.conv.bias": (512,),
        f"{rpn}.objectness_logits.weight": (24, 512, 1, 1),
        f"{rpn}.objectness_logits.bias": (24,),
        f"{rpn}.anchor_deltas.weight": (48, 512, 1, 1),
        f"{rpn}.anchor_deltas.bias": (48,),
        "proposal_generator.anchor_generator.cell_anchors.0": (12, 4),
    }
    shapes |= _stage("roi_heads.res5", 3, 1024, 512, 2048, counter=True)
    head = "roi_heads.box_predictor"
    shapes |= {
        f"{head}.cls_score.weight": (1601, 2048),
        f"{head}.cls_score.bias": (1601,),
        f"{head}.bbox_pred.weight": (6404, 2048),
        f"{head}.bbox_pred.bias": (6404,),
        f"{head}.cls_embed.weight": (1601, 256),
        f"{head}.attr_linear1.weight": (512, 2304),
        f"{head}.attr_linear1.bias": (512,),
        f"{head}.attr_linear2.weight": (401, 512),
        f"{head}.attr_linear2.bias": (401,),
    }
    return shapes


def zero_state(shapes) -> dict[str, torch.Tensor]:
    """Zero tensors of the given shapes that share one element, so the files stay small."""
    return {name: torch.zeros(()).expand(shape) for name, shape in shapes.items()}


def save_checkpoint(path, state) -> None:
    """Write ``state`` as detectron2 does: a torch.save'd dict with a "model" entry."""
    torch.save({"model": state, "__author__": "test"}, path)


@pytest.fixture(scope="module")
def detector():
    return VisualGenomeDetector()


@pytest.fixture(scope="module")
def published_file(tmp_path_factory):
    """A full-size checkpoint with seeded random values under the published names."""
    generator = torch.Generator().manual_seed(7)
    state = {}
    for name, shape in published_shapes().items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(0)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[name] = torch.randn(shape, generator=generator)
    path = tmp_path_factory.mktemp("weights") / "bua-caffe-frcn-r101-k10-100.pth"
    save_checkpoint(path, state)
    return path, state


def test_model_names_match_published(detector):
    expected = {
        name
        for name in published_shapes()
        if not name.endswith("num_batches_tracked") and "anchor_generator" not in name
    }
    assert set(detector.state_dict()) == expected


def test_load_round_trip(detector, published_file):
    path, state = published_file
    recorded = load_detector_weights(detector, path)
    loaded = detector.state_dict()
    for name in (
        "backbone.res4.22.conv3.norm.running_var",
        "roi_heads.box_predictor.cls_embed.weight",
    ):
        assert torch.equal(loaded[name], state[name])
    assert recorded["weights"] == "bua-caffe-frcn-r101-k10-100.pth"
    assert recorded["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_missing_parameter_is_named(detector, tmp_path):
    state = zero_state(published_shapes())
    del state["roi_heads.box_predictor.attr_linear2.bias"]
    path = tmp_path / "missing.pth"
    save_checkpoint(path, state)
    with pytest.raises(DetectorWeightsError) as error:
        load_detector_weights(detector, path)
    message = str(error.value)
    assert "1 missing: roi_heads.box_predictor.attr_linear2.bias" in message
    assert "mis-shaped" not in message
    assert str(path) in message


def test_mis_shaped_parameter_is_named(detector, tmp_path):
    shapes = published_shapes()
    shapes["roi_heads.box_predictor.cls_score.weight"] = (1600, 2048)
    path = tmp_path / "mis_shaped.pth"
    save_checkpoint(path, zero_state(shapes))
    with pytest.raises(DetectorWeightsError) as error:
        load_detector_weights(detector, path)
    message = str(error.value)
    assert (
        "1 mis-shaped: roi_heads.box_predictor.cls_score.weight (1600, 2048) "
        "(expected (1601, 2048))" in message
    )
    assert "missing" not in message


def test_unexpected_parameter_is_named(detector, tmp_path):
    shapes = published_shapes() | {"roi_heads.mask_head.predictor.weight": (80, 256, 1, 1)}
    path = tmp_path / "unexpected.pth"
    save_checkpoint(path, zero_state(shapes))
    with pytest.raises(DetectorWeightsError, match="1 unexpected: roi_heads.mask_head.predictor"):
        load_detector_weights(detector, path)


def test_numpy_arrays_load_safely(detector, tmp_path):
    state = {
        name: np.full(shape, 0.5, dtype=np.float16) for name, shape in published_shapes().items()
    }
    path = tmp_path / "numpy.pth"
    save_checkpoint(path, state)
    load_detector_weights(detector, path)
    assert torch.all(detector.state_dict()["backbone.stem.conv1.weight"] == 0.5)


def test_folded_batch_norms_keep_identity_statistics(detector, tmp_path):
    shapes = {
        name: shape
        for name, shape in published_shapes().items()
        if not name.endswith(("running_mean", "running_var"))
    }
    path = tmp_path / "folded.pth"
    save_checkpoint(path, zero_state(shapes))
    load_detector_weights(detector, path)
    state = detector.state_dict()
    assert torch.all(state["backbone.res3.1.conv2.norm.running_var"] == 1)
    assert torch.all(state["backbone.res3.1.conv2.norm.running_mean"] == 0)


def test_some_missing_statistics_are_an_error(detector, tmp_path):
    state = zero_state(published_shapes())
    del state["backbone.res2.0.conv1.norm.running_var"]
    path = tmp_path / "partial.pth"
    save_checkpoint(path, state)
    with pytest.raises(
        DetectorWeightsError, match="missing: backbone.res2.0.conv1.norm.running_var"
    ):
        load_detector_weights(detector, path)


def test_missing_file_says_what_to_download(tmp_path):
    with pytest.raises(DetectorWeightsError, match="bua-caffe-frcn-r101-k10-100.pth"):
        read_checkpoint(tmp_path / "absent.pth")


def test_non_dict_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(DetectorWeightsError, match="hold a Tensor, expected a dict"):
        read_checkpoint(path)


class _Payload:
    """An arbitrary class: the restricted unpickler must refuse to build it."""


def test_arbitrary_objects_are_refused(tmp_path):
    path = tmp_path / "object.pth"
    with path.open("wb") as stream:
        pickle.dump({"model": _Payload()}, stream, protocol=2)
    with pytest.raises(DetectorWeightsError, match="cannot read region detector weights"):
        read_checkpoint(path)


def test_extractor_records_weights(published_file):
    path, _ = published_file
    settings = RegionExtractor(weights=path).settings()
    assert settings["random_weights"] is False
    assert settings["weights"] == path.name
    assert settings["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "random_seed" not in settings
