"""Converting the authors' DSRAN checkpoints and running the official variant.

The tests write checkpoints with the names and shapes of the authors' modules
(model_bert.py, GAT.py, pytorch_pretrained_bert, their torchvision-style ResNet152) and
random values. BERT and the embedding are small, but feature sizes (2048, 1601 classes,
6 box values) are the real ones. The expected embeddings are computed from the
checkpoint tensors with plain torch operations, not with dsran's model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from dsran.extract.store import FeatureStore, StoreError
from dsran.pipelines.cli import cli
from synthetic_store import CONCEPT_WORDS, MINILM

EMBED = 32  # embedding size D; 8 graph-attention heads of 4
BERT_HIDDEN = 32
BERT_LAYERS = 2
BERT_HEADS = 2
BERT_INTERMEDIATE = 48
BERT_POSITIONS = 40
MAX_LENGTH = 32  # caption length of the authors' data loader
REGIONS = 12  # region slots per image in the test stores
NUM_CLASSES = 1601
BOX_VALUES = 6
FEATURE_DIM = 2048
NUM_IMAGES = 10


# ---------------------------------------------------------------------- builders


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> Path:
    """A small BERT folder: config.json of a 2-layer BERT and MiniLM's uncased vocabulary."""
    from transformers import AutoTokenizer, BertConfig

    folder = tmp_path_factory.mktemp("bert")
    tokenizer = AutoTokenizer.from_pretrained(str(MINILM), local_files_only=True)
    BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=BERT_HIDDEN,
        num_hidden_layers=BERT_LAYERS,
        num_attention_heads=BERT_HEADS,
        intermediate_size=BERT_INTERMEDIATE,
        max_position_embeddings=BERT_POSITIONS,
    ).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tokenizer(bert_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bert_folder), local_files_only=True)


def official_shapes(branches: int, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the authors' DSRAN state dict (BERT variant), without the ResNet."""
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out_features: int, in_features: int) -> None:
        shapes[f"{name}.weight"] = (out_features, in_features)
        shapes[f"{name}.bias"] = (out_features,)

    def batch_norm(name: str, size: int) -> None:
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{suffix}"] = (size,)
        shapes[f"{name}.num_batches_tracked"] = ()

    def bert_layer_norm(name: str, old_names: bool) -> None:
        for suffix in ("gamma", "beta") if old_names else ("weight", "bias"):
            shapes[f"{name}.{suffix}"] = (BERT_HIDDEN,)

    def gat(name: str) -> None:
        for part in ("mha.query", "mha.key", "mha.value", "fc_in", "fc_int", "fc_out"):
            linear(f"{name}.encoder.0.{part}", EMBED, EMBED)
        batch_norm(f"{name}.encoder.0.bn_in", EMBED)
        batch_norm(f"{name}.encoder.0.bn_out", EMBED)

    def fusion(name: str) -> None:
        for part in ("gate0", "gate1", "fusion0", "fusion1"):
            linear(f"{name}.{part}", EMBED, EMBED)

    linear("img_enc.fc.0", EMBED, FEATURE_DIM)
    bert = "txt_enc.bert"
    shapes[f"{bert}.embeddings.word_embeddings.weight"] = (vocab_size, BERT_HIDDEN)
    shapes[f"{bert}.embeddings.position_embeddings.weight"] = (BERT_POSITIONS, BERT_HIDDEN)
    shapes[f"{bert}.embeddings.token_type_embeddings.weight"] = (2, BERT_HIDDEN)
    # Old pytorch_pretrained_bert releases name LayerNorm parameters gamma and beta, later
    # ones weight and bias; the embeddings use the old names, the layers the new ones.
    bert_layer_norm(f"{bert}.embeddings.LayerNorm", old_names=True)
    for layer in range(BERT_LAYERS):
        prefix = f"{bert}.encoder.layer.{layer}"
        for part in ("query", "key", "value"):
            linear(f"{prefix}.attention.self.{part}", BERT_HIDDEN, BERT_HIDDEN)
        linear(f"{prefix}.attention.output.dense", BERT_HIDDEN, BERT_HIDDEN)
        bert_layer_norm(f"{prefix}.attention.output.LayerNorm", old_names=layer == 0)
        linear(f"{prefix}.intermediate.dense", BERT_INTERMEDIATE, BERT_HIDDEN)
        linear(f"{prefix}.output.dense", BERT_HIDDEN, BERT_INTERMEDIATE)
        bert_layer_norm(f"{prefix}.output.LayerNorm", old_names=False)
    linear(f"{bert}.pooler.dense", BERT_HIDDEN, BERT_HIDDEN)
    linear("txt_enc.fc.0", EMBED, BERT_HIDDEN)
    linear("rcnn_enc.fc_image.0", FEATURE_DIM, FEATURE_DIM)
    linear("rcnn_enc.fc_image.2", EMBED, FEATURE_DIM)
    linear("rcnn_enc.fc_pos.0", EMBED, BOX_VALUES + NUM_CLASSES)
    linear("rcnn_enc.fc", EMBED, 2 * EMBED)
    for name in ("gat_1", "gat_2", "gat_cap", "gat_cat"):
        gat(name)
    for branch in range(1, branches):
        gat(f"gat_cat_{branch}")
    if branches >= 2:
        fusion("fusion")
    if branches == 4:
        fusion("fusion_1")
        fusion("fusion_2")
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if name.endswith("num_batches_tracked"):
        return torch.tensor(1234)
    if name.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=generator)
    if name.endswith(("bn_in.weight", "bn_out.weight", ".gamma", "LayerNorm.weight")):
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    return 0.05 * torch.randn(shape, generator=generator)


@pytest.fixture(scope="module")
def resnet_state() -> dict[str, torch.Tensor]:
    """Random tensors under torchvision's ResNet152 names, which the authors' resnet.py shares."""
    from torchvision.models import resnet152

    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in resnet152().state_dict().items()}
    generator = torch.Generator().manual_seed(7)
    return {name: random_tensor(name, shape, generator) for name, shape in shapes.items()}


def official_options(branches: int, **changes) -> argparse.Namespace:
    """The argparse options of the authors' train_bert.py, as a checkpoint stores them."""
    values = {
        "data_path": "data",
        "data_name": "f30k",
        "margin": 0.2,
        "num_epochs": 12,
        "batch_size": 128,
        "embed_size": EMBED,
        "crop_size": 224,
        "learning_rate": 2e-5,
        "lr_update": 6,
        "workers": 10,
        "log_step": 100,
        "logger_name": "runs/grg",
        "resume": "",
        "img_dim": FEATURE_DIM,
        "ft_res": False,
        "bert_path": "uncased_L-12_H-768_A-12/",
        "ft_bert": True,
        "bert_size": BERT_HIDDEN,
        "warmup": -1,
        "K": branches,
        "feature_path": "data/joint-pretrain/flickr30k/",
        "region_bbox_file": "data/flickr30k_detection.h5",
        "l_train": 1133,
    }
    values.update(changes)
    return argparse.Namespace(**values)


def official_state(
    branches: int, vocab_size: int, resnet: dict[str, torch.Tensor] | None = None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A random state dict of the authors' DSRAN, names without ``module.``."""
    generator = torch.Generator().manual_seed(seed)
    state = {
        name: random_tensor(name, shape, generator)
        for name, shape in official_shapes(branches, vocab_size).items()
    }
    for name, tensor in (resnet or {}).items():
        state[f"img_enc.cnn.{name}"] = tensor
    return state


def save_official(path: Path, state: dict[str, torch.Tensor], options: argparse.Namespace, **extra):
    """Save as the authors' save_checkpoint does: DataParallel names, opt, epoch, Eiters."""
    content = {
        "epoch": 9,
        "model": {f"module.{name}": tensor for name, tensor in state.items()},
        "best_rsum": 501.25,
        "opt": options,
        "Eiters": 10197,
        **extra,
    }
    torch.save(content, path)
    return path


def write_store(
    path: Path,
    seed: int = 0,
    class_probs: bool = True,
    counts: np.ndarray | None = None,
    grid_settings: dict | None = None,
) -> FeatureStore:
    """A store of NUM_IMAGES random images with grid and region arrays; all in split test."""
    rng = np.random.default_rng(seed)
    grid = grid_settings if grid_settings is not None else {"random_weights": True}
    settings = {
        "grid": grid,
        "regions": {"max_boxes": REGIONS, "class_probs": class_probs, "random_weights": True},
    }
    store = FeatureStore.create(
        path, [f"images/{i:03d}.jpg" for i in range(NUM_IMAGES)], settings, chunk_images=4
    )
    counts = np.full(NUM_IMAGES, REGIONS) if counts is None else counts
    for chunk in range(store.num_chunks):
        rows = store.chunk_rows(chunk)
        n = rows.stop - rows.start
        real = np.arange(REGIONS)[None, :] < counts[rows][:, None]
        x1 = rng.uniform(0, 300, (n, REGIONS))
        y1 = rng.uniform(0, 200, (n, REGIONS))
        boxes = np.stack(
            [x1, y1, x1 + rng.uniform(5, 300, x1.shape), y1 + rng.uniform(5, 250, y1.shape)], -1
        )
        probs = rng.dirichlet(np.full(NUM_CLASSES, 0.05), (n, REGIONS))
        data = {
            "images/width": np.full(n, 640, np.int32),
            "images/height": np.full(n, 480, np.int32),
            "images/failed": np.zeros(n, bool),
            "images/done": np.ones(n, bool),
            "grid/features": rng.standard_normal((n, 49, FEATURE_DIM)).astype(np.float16),
            "regions/features": (rng.standard_normal((n, REGIONS, FEATURE_DIM)) * real[..., None])
            .clip(0, None)
            .astype(np.float16),
            "regions/boxes": (boxes * real[..., None]).astype(np.float32),
            "regions/count": counts[rows].astype(np.int32),
            "regions/object_ids": np.where(real, 3, -1).astype(np.int16),
            "regions/object_scores": (rng.uniform(0.2, 1.0, (n, REGIONS)) * real).astype(
                np.float32
            ),
            "regions/attribute_ids": np.where(real, 5, -1).astype(np.int16),
            "regions/attribute_scores": (rng.uniform(0, 1, (n, REGIONS)) * real).astype(np.float32),
        }
        if class_probs:
            data["regions/class_probs"] = (probs * real[..., None]).astype(np.float16)
        store.write_chunk(chunk, data)
    texts, caption_image = [], []
    for image in range(NUM_IMAGES):
        for _ in range(2):
            words = rng.choice(CONCEPT_WORDS, size=rng.integers(2, 6))
            texts.append("a photo of " + " and ".join(words))
            caption_image.append(image)
    store.write_captions(texts, caption_image)
    store.write_splits({"test": range(NUM_IMAGES)})
    return store


def convert(*args: str):
    return CliRunner().invoke(cli, ["--no-params", "convert-official", *args])


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> FeatureStore:
    return write_store(tmp_path_factory.mktemp("store") / "feats.zarr")


@pytest.fixture(scope="module")
def k4_checkpoint(tmp_path_factory, tokenizer, resnet_state):
    """An official K = 4 checkpoint with its ResNet152; returns (path, state without prefix)."""
    state = official_state(4, tokenizer.vocab_size, resnet_state)
    path = tmp_path_factory.mktemp("official") / "model_best.pth.tar"
    return save_official(path, state, official_options(4)), state


@pytest.fixture(scope="module")
def k4_run(tmp_path_factory, k4_checkpoint, bert_folder, store):
    out = tmp_path_factory.mktemp("runs") / "official-k4"
    result = convert(
        str(k4_checkpoint[0]),
        "--out",
        str(out),
        "--feats",
        str(store.path),
        "--text-model",
        str(bert_folder),
        "--trust-pickle",
    )
    assert result.exit_code == 0, result.output
    return out


# ---------------------------------------------------------------------- reference model


def linear(x, state, name):
    return x @ state[f"{name}.weight"].T + state[f"{name}.bias"]


def batch_norm(x, state, name, eps=1e-5):
    scale = state[f"{name}.weight"] / torch.sqrt(state[f"{name}.running_var"] + eps)
    return (x - state[f"{name}.running_mean"]) * scale + state[f"{name}.bias"]


def layer_norm(x, state, name, eps=1e-12):
    weight = state[f"{name}.gamma"] if f"{name}.gamma" in state else state[f"{name}.weight"]
    bias = state[f"{name}.beta"] if f"{name}.beta" in state else state[f"{name}.bias"]
    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + eps) * weight + bias


def attention(q, k, v, heads):
    batch, nodes, dim = q.shape

    def split(t):
        return t.view(batch, nodes, heads, dim // heads).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(dim // heads)
    return (torch.softmax(scores, -1) @ split(v)).transpose(1, 2).reshape(batch, nodes, dim)


def graph_attention(x, state, name):
    """One layer of the authors' GATLayer in eval mode."""
    q, k, v = (linear(x, state, f"{name}.mha.{part}") for part in ("query", "key", "value"))
    h = batch_norm(
        linear(attention(q, k, v, 8), state, f"{name}.fc_in") + x, state, f"{name}.bn_in"
    )
    out = linear(torch.relu(linear(h, state, f"{name}.fc_int")), state, f"{name}.fc_out")
    return batch_norm(out + h, state, f"{name}.bn_out")


def fuse(a, b, state, name):
    a, b = linear(a, state, f"{name}.gate0"), linear(b, state, f"{name}.gate1")
    gate = torch.sigmoid(linear(a, state, f"{name}.fusion0") + linear(b, state, f"{name}.fusion1"))
    return gate * a + (1 - gate) * b


def unit(x):
    return x / x.pow(2).sum(-1, keepdim=True).sqrt()


def box_inputs(boxes, scores, probs):
    """The 6 + 1601 region inputs of one image, as the authors' get_rcnn computes them."""
    boxes = boxes.clone()
    width = boxes[:, [0, 2]].max() + 1e-5
    height = boxes[:, [1, 3]].max() + 1e-5
    boxes[:, [0, 2]] /= width
    boxes[:, [1, 3]] /= height
    area = ((boxes[:, 3] - boxes[:, 1]) * (boxes[:, 2] - boxes[:, 0])).clamp(min=0)
    values = torch.cat([boxes, area[:, None], scores[:, None]], 1)

    def normalise(x):
        mean = x.mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + 1e-5)

    return torch.cat([normalise(values), normalise(probs)], 1)


def reference_images(state, store, rows, branches):
    arrays = {
        name: torch.from_numpy(np.asarray(store.array(name)[rows])).float()
        for name in ("grid/features", "regions/features", "regions/boxes", "regions/object_scores")
    }
    probs = torch.from_numpy(np.asarray(store.array("regions/class_probs")[rows])).float()
    grid = torch.relu(linear(arrays["grid/features"], state, "img_enc.fc.0"))
    grid = graph_attention(grid, state, "gat_1.encoder.0")
    positions = torch.stack(
        [
            box_inputs(arrays["regions/boxes"][i], arrays["regions/object_scores"][i], probs[i])
            for i in range(len(rows))
        ]
    )
    features = torch.relu(linear(arrays["regions/features"], state, "rcnn_enc.fc_image.0"))
    regions = torch.relu(linear(features, state, "rcnn_enc.fc_image.2"))
    regions = regions + torch.relu(linear(positions, state, "rcnn_enc.fc_pos.0"))
    regions = graph_attention(regions, state, "gat_2.encoder.0")
    joint = torch.cat([grid, regions], 1)
    names = ["gat_cat"] + [f"gat_cat_{i}" for i in range(1, branches)]
    means = [graph_attention(joint, state, f"{name}.encoder.0").mean(1) for name in names]
    if branches == 1:
        return unit(means[0])
    if branches == 2:
        return unit(fuse(means[0], means[1], state, "fusion"))
    first = fuse(means[0], means[1], state, "fusion_1")
    second = fuse(means[2], means[3], state, "fusion_2")
    return unit(fuse(first, second, state, "fusion"))


def official_token_ids(tokenizer, text):
    """[CLS] + word pieces + [SEP], cut to 32 and padded with 0, as the authors' loader does."""
    tokens = ["[CLS]", *tokenizer.tokenize(text), "[SEP]"]
    ids = tokenizer.convert_tokens_to_ids(tokens)[:MAX_LENGTH]
    return ids + [0] * (MAX_LENGTH - len(ids))


def reference_bert(ids, state):
    bert = "txt_enc.bert"
    x = (
        state[f"{bert}.embeddings.word_embeddings.weight"][ids]
        + state[f"{bert}.embeddings.position_embeddings.weight"][: ids.shape[1]]
        + state[f"{bert}.embeddings.token_type_embeddings.weight"][0]
    )
    x = layer_norm(x, state, f"{bert}.embeddings.LayerNorm")
    for layer in range(BERT_LAYERS):
        name = f"{bert}.encoder.layer.{layer}"
        q, k, v = (
            linear(x, state, f"{name}.attention.self.{p}") for p in ("query", "key", "value")
        )
        context = attention(q, k, v, BERT_HEADS)
        x = layer_norm(
            linear(context, state, f"{name}.attention.output.dense") + x,
            state,
            f"{name}.attention.output.LayerNorm",
        )
        inner = linear(x, state, f"{name}.intermediate.dense")
        inner = inner * 0.5 * (1.0 + torch.erf(inner / math.sqrt(2.0)))
        x = layer_norm(
            linear(inner, state, f"{name}.output.dense") + x, state, f"{name}.output.LayerNorm"
        )
    return x


def reference_captions(state, tokenizer, texts):
    ids = torch.tensor([official_token_ids(tokenizer, text) for text in texts])
    words = torch.relu(linear(reference_bert(ids, state), state, "txt_enc.fc.0"))
    return unit(graph_attention(words, state, "gat_cap.encoder.0").mean(1))


# ---------------------------------------------------------------------- conversion


class CreateFolderOnLoad:
    """Unpickling this object creates a folder: a stand-in for code a pickle can run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_convert_refuses_untrusted_pickle(tmp_path, tokenizer, bert_folder):
    marker = tmp_path / "code-ran"
    state = official_state(1, tokenizer.vocab_size)
    checkpoint = save_official(
        tmp_path / "model_best.pth.tar",
        state,
        official_options(1),
        payload=CreateFolderOnLoad(marker),
    )
    out = tmp_path / "run"
    result = convert(str(checkpoint), "--out", str(out), "--text-model", str(bert_folder))
    assert result.exit_code == 1
    assert "unpickling runs whatever code the file names" in result.output
    assert "--trust-pickle" in result.output
    assert not marker.exists()
    assert not out.exists()


def test_convert_round_trip_uses_every_tensor(k4_run, k4_checkpoint):
    from dsran.train.run import load_run

    run = load_run(k4_run)
    converted = run.model.state_dict()
    _, official = k4_checkpoint
    used = {
        name: tensor
        for name, tensor in official.items()
        if not name.startswith(("img_enc.cnn.", "rcnn_enc.fc.", "txt_enc.bert.pooler."))
    }

    def found_in(tensor, candidates):
        for other in candidates:
            if other.shape == tensor.shape and torch.equal(other, tensor):
                return True
            # Query, key and value are stacked along the output axis in one tensor.
            stacked = tensor.dim() > 0 and other.shape == (3 * tensor.shape[0], *tensor.shape[1:])
            if stacked and any(torch.equal(part, tensor) for part in other.chunk(3)):
                return True
        return False

    unused = [
        name
        for name, tensor in used.items()
        if not name.endswith("num_batches_tracked") and not found_in(tensor, converted.values())
    ]
    assert unused == []
    not_from_checkpoint = [
        name
        for name, tensor in converted.items()
        if not name.endswith("num_batches_tracked")
        and not found_in(tensor, used.values())
        and not any(
            found_in(part, used.values()) for part in (tensor.chunk(3) if tensor.dim() else [])
        )
    ]
    assert not_from_checkpoint == []


def test_convert_writes_official_config(k4_run):
    from dsran.train.config import load_config

    config = load_config(k4_run / "config.yaml")
    assert config.model.grid_encoder == "official"
    assert config.model.region_encoder == "official"
    assert config.model.official_masking is True
    assert config.model.jsr_branches == 4
    assert config.model.ssr_layers == 1
    assert config.model.embed_size == EMBED
    assert config.data.max_length == MAX_LENGTH
    assert config.optim.lr_update == 6
    assert config.optim.warmup_fraction == 0.0


def test_convert_records_metadata(k4_run, store):
    metadata = json.loads((k4_run / "metadata.json").read_text())
    assert metadata["feats"] == str(store.path.resolve())
    assert metadata["best_epoch"] == 9
    assert metadata["val_rsum"] == 501.25
    assert metadata["converted_from"]["opt"]["K"] == 4
    assert sorted(metadata["converted_from"]["ignored_parameters"]) == [
        "rcnn_enc.fc.bias",
        "rcnn_enc.fc.weight",
        "txt_enc.bert.pooler.dense.bias",
        "txt_enc.bert.pooler.dense.weight",
    ]
    # The store's grid features come from random weights, but the checkpoint's ResNet is trained.
    assert metadata["resnet_comparison"]["status"] == "mismatch"
    assert any("random ResNet152 weights" in warning for warning in metadata["warnings"])


def test_convert_reports_unknown_names(tmp_path, tokenizer, bert_folder):
    state = official_state(2, tokenizer.vocab_size)
    state["txt_enc.rnn.weight_ih_l0"] = torch.zeros(3, 3)
    state["gat_cat_2.encoder.0.fc_in.weight"] = torch.zeros(EMBED, EMBED)
    checkpoint = save_official(tmp_path / "ckpt.pth.tar", state, official_options(2))
    result = convert(
        str(checkpoint), "--out", str(tmp_path / "run"), "--text-model", str(bert_folder),
        "--trust-pickle",
    )  # fmt: skip
    assert result.exit_code == 1
    assert "2 checkpoint names with no dsran counterpart" in result.output
    assert "txt_enc.rnn.weight_ih_l0" in result.output
    assert "gat_cat_2.encoder.0.fc_in.weight" in result.output
    assert not (tmp_path / "run").exists()


def test_convert_reports_missing_names(tmp_path, tokenizer, bert_folder):
    state = official_state(2, tokenizer.vocab_size)
    del state["fusion.fusion1.bias"]
    del state["txt_enc.bert.encoder.layer.0.output.dense.weight"]
    del state["gat_2.encoder.0.mha.key.bias"]
    checkpoint = save_official(tmp_path / "ckpt.pth.tar", state, official_options(2))
    result = convert(
        str(checkpoint), "--out", str(tmp_path / "run"), "--text-model", str(bert_folder),
        "--trust-pickle",
    )  # fmt: skip
    assert result.exit_code == 1
    assert "image_encoder.fusion.pairs.0.gate_b.bias" in result.output
    assert "text_encoder.backbone.encoder.layer.0.output.dense.weight" in result.output
    assert "image_encoder.region_ssr.layers.0.qkv.bias (no mha.key)" in result.output


def test_convert_rejects_wrong_text_model(tmp_path, tokenizer):
    from transformers import BertConfig

    folder = tmp_path / "bert-3-layers"
    BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=BERT_HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=BERT_HEADS,
        intermediate_size=BERT_INTERMEDIATE,
        max_position_embeddings=BERT_POSITIONS,
    ).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    state = official_state(1, tokenizer.vocab_size)
    checkpoint = save_official(tmp_path / "ckpt.pth.tar", state, official_options(1))
    result = convert(
        str(checkpoint), "--out", str(tmp_path / "run"), "--text-model", str(folder),
        "--trust-pickle",
    )  # fmt: skip
    assert result.exit_code == 1
    assert "text_encoder.backbone.encoder.layer.2.output.dense.weight" in result.output
    assert "Check --text-model" in result.output


# ---------------------------------------------------------------------- embeddings


def test_converted_k4_matches_reference(k4_run, k4_checkpoint, store, tokenizer):
    from dsran.train.encode import encode_captions, encode_images
    from dsran.train.run import load_run

    run = load_run(k4_run)
    _, state = k4_checkpoint
    rows = np.arange(NUM_IMAGES)
    images = encode_images(run.model, store, rows, batch_size=4, precision="fp32")
    texts = list(store.captions()[0][:6]) + [" ".join(["a dog and a cat"] * 12)]
    captions = encode_captions(
        run.model, run.tokenizer, texts, max_length=MAX_LENGTH, precision="fp32"
    )
    with torch.no_grad():
        expected_images = reference_images(state, store, rows, 4)
        expected_captions = reference_captions(state, tokenizer, texts)
    torch.testing.assert_close(images, expected_images, atol=1e-5, rtol=0)
    torch.testing.assert_close(captions, expected_captions, atol=1e-5, rtol=0)


@pytest.mark.parametrize("branches", [1, 2])
def test_converted_k1_k2_match_reference(tmp_path, branches, store, tokenizer, bert_folder):
    from dsran.train.encode import encode_images
    from dsran.train.run import load_run

    state = official_state(branches, tokenizer.vocab_size, seed=branches)
    checkpoint = save_official(tmp_path / "ckpt.pth.tar", state, official_options(branches))
    out = tmp_path / "run"
    result = convert(
        str(checkpoint), "--out", str(out), "--text-model", str(bert_folder), "--trust-pickle"
    )
    assert result.exit_code == 0, result.output
    run = load_run(out)
    rows = np.arange(4)
    images = encode_images(run.model, store, rows, precision="fp32")
    with torch.no_grad():
        expected = reference_images(state, store, rows, branches)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)


def test_official_masking_without_padding_unchanged(k4_run, store, tokenizer):
    """Check that masks change nothing when every region is real and captions fill max_length."""
    from dsran.train.encode import encode_captions, encode_images
    from dsran.train.run import load_run

    run = load_run(k4_run)
    rows = np.arange(NUM_IMAGES)
    official_images = encode_images(run.model, store, rows, precision="fp32")
    # 40 words give more than 32 tokens: cut, the caption fills every position.
    texts = ["a dog on a beach with a ball " * 5, "two cats under a table near a tree " * 5]
    official_captions = encode_captions(
        run.model, run.tokenizer, texts, MAX_LENGTH, precision="fp32"
    )

    run.model.image_encoder.official_masking = False
    run.model.text_encoder.official_masking = False
    run.model.config.official_masking = False
    masked_images = encode_images(run.model, store, rows, precision="fp32")
    # Masked tokenisation keeps [SEP] at the end; give the ids of the official form instead.
    ids = torch.tensor([official_token_ids(tokenizer, text) for text in texts])
    assert (ids != 0).all()
    with torch.no_grad():
        masked_captions = run.model.encode_captions(ids, torch.ones_like(ids))
    torch.testing.assert_close(masked_images, official_images, atol=1e-5, rtol=0)
    torch.testing.assert_close(masked_captions, official_captions, atol=1e-5, rtol=0)


def test_official_tokenization(tokenizer):
    from dsran.train.data import tokenize

    long_text = "a dog and a cat " * 10
    ids, lengths = tokenize(tokenizer, ["a dog", long_text], MAX_LENGTH, official=True)
    assert ids.shape == (2, MAX_LENGTH)
    assert list(lengths) == [MAX_LENGTH, MAX_LENGTH]
    assert ids[0].tolist() == official_token_ids(tokenizer, "a dog")
    assert ids[0, 4:].tolist() == [0] * (MAX_LENGTH - 4)
    # The authors cut after adding [SEP], so a long caption ends without it.
    assert ids[1].tolist() == official_token_ids(tokenizer, long_text)
    assert tokenizer.sep_token_id not in ids[1].tolist()


def test_box_inputs_skip_padded_regions():
    from dsran.train.model import official_box_inputs

    generator = torch.Generator().manual_seed(3)
    boxes = torch.rand(2, 5, 4, generator=generator) * 100
    boxes[..., 2:] += boxes[..., :2]
    scores = torch.rand(2, 5, generator=generator)
    probs = torch.rand(2, 5, NUM_CLASSES, generator=generator)
    count = torch.tensor([5, 3])
    # Padded slots hold large values here, so using them would change the scale.
    boxes[1, 3:] = 10_000.0
    inputs = official_box_inputs(boxes, scores, probs, count)
    assert inputs.shape == (2, 5, BOX_VALUES + NUM_CLASSES)
    torch.testing.assert_close(inputs[0], box_inputs(boxes[0], scores[0], probs[0]))
    torch.testing.assert_close(inputs[1, :3], box_inputs(boxes[1, :3], scores[1, :3], probs[1, :3]))
    assert torch.count_nonzero(inputs[1, 3:]) == 0


# ---------------------------------------------------------------------- stores and eval


def test_store_without_class_probs_names_fix(tmp_path, k4_run):
    from dsran.train.encode import encode_images
    from dsran.train.run import load_run

    plain = write_store(tmp_path / "plain.zarr", class_probs=False)
    run = load_run(k4_run)
    with pytest.raises(StoreError, match="dsran extract --class-probs"):
        encode_images(run.model, plain, np.arange(3))


def test_eval_scores_converted_run(k4_run, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(
        cli,
        ["--no-params", "eval", "--split", "test", "--model", str(k4_run), "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["rsum"] <= 600.0
    results = json.loads((out / "results.json").read_text())
    assert results["models"][0]["best_epoch"] == 9


def test_eval_on_padded_store(k4_run, tmp_path):
    padded = write_store(
        tmp_path / "padded.zarr", seed=1, counts=np.array([12, 3, 7, 12, 1, 5, 12, 9, 2, 12])
    )
    out = tmp_path / "report"
    result = CliRunner().invoke(
        cli,
        ["--no-params", "eval", "--split", "test", "--model", str(k4_run), "--feats",
         str(padded.path), "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert np.isfinite(json.loads((out / "metrics.json").read_text())["rsum"])


# ---------------------------------------------------------------------- ResNet152


def test_resnet_export_and_match(tmp_path, k4_checkpoint, bert_folder, resnet_state):
    exported = tmp_path / "official-resnet152.pth"
    first = convert(
        str(k4_checkpoint[0]), "--out", str(tmp_path / "run1"), "--text-model",
        str(bert_folder), "--trust-pickle", "--export-resnet", str(exported),
    )  # fmt: skip
    assert first.exit_code == 0, first.output
    saved = torch.load(exported, weights_only=True)
    assert set(saved) == set(resnet_state)
    assert torch.equal(saved["layer4.2.bn3.running_var"], resnet_state["layer4.2.bn3.running_var"])

    from dsran.train.official import sha256_of

    settings = {"weights": exported.name, "weights_sha256": sha256_of(exported)}
    matching = write_store(tmp_path / "match.zarr", grid_settings=settings)
    second = convert(
        str(k4_checkpoint[0]), "--out", str(tmp_path / "run2"), "--text-model",
        str(bert_folder), "--trust-pickle", "--feats", str(matching.path),
        "--grid-weights", str(exported),
    )  # fmt: skip
    assert second.exit_code == 0, second.output
    comparison = json.loads((tmp_path / "run2" / "metadata.json").read_text())["resnet_comparison"]
    assert comparison["status"] == "match"


def test_resnet_statistics_mismatch_warns(tmp_path, k4_checkpoint, bert_folder, resnet_state):
    reference = dict(resnet_state)
    reference["layer2.0.bn1.running_mean"] = reference["layer2.0.bn1.running_mean"] + 0.25
    weights = tmp_path / "resnet152-imagenet.pth"
    torch.save(reference, weights)
    from dsran.train.official import sha256_of

    settings = {"weights": weights.name, "weights_sha256": sha256_of(weights)}
    store = write_store(tmp_path / "feats.zarr", grid_settings=settings)
    result = convert(
        str(k4_checkpoint[0]), "--out", str(tmp_path / "run"), "--text-model",
        str(bert_folder), "--trust-pickle", "--feats", str(store.path),
        "--grid-weights", str(weights),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Only BatchNorm statistics differ" in result.output
    metadata = json.loads((tmp_path / "run" / "metadata.json").read_text())
    comparison = metadata["resnet_comparison"]
    assert comparison["status"] == "mismatch"
    assert comparison["differing_batchnorm_statistics"] == ["layer2.0.bn1.running_mean"]
    assert comparison["differing_parameters"] == []
    assert comparison["max_abs_difference"] == pytest.approx(0.25)
    assert comparison["message"] in metadata["warnings"]


def test_resnet_file_not_found_reported(tmp_path, k4_checkpoint, bert_folder, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    settings = {"weights": "resnet152-b121ed2d.pth", "weights_sha256": "ab" * 32}
    store = write_store(tmp_path / "feats.zarr", grid_settings=settings)
    result = convert(
        str(k4_checkpoint[0]), "--out", str(tmp_path / "run"), "--text-model",
        str(bert_folder), "--trust-pickle", "--feats", str(store.path),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    comparison = json.loads((tmp_path / "run" / "metadata.json").read_text())["resnet_comparison"]
    assert comparison["status"] == "not_compared"
    assert "resnet152-b121ed2d.pth" in comparison["message"]
    assert "was not found" in comparison["message"]
    assert "the file name the authors' code loads" in comparison["message"]


def test_config_rejects_unknown_region_encoder():
    from dsran.train.config import ConfigError, resolve_config

    with pytest.raises(ConfigError, match="invalid model.region_encoder 'mlp'.*'official'"):
        resolve_config(None, ["model.region_encoder=mlp"])
