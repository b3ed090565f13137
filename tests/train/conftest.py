"""Fixtures of the training tests: the MiniLM text model and small feature stores."""

from __future__ import annotations

import pytest
import torch
from synthetic_store import MINILM, random_store

# The tensors of these tests are small, so a second thread gains little. On a CPU that
# other jobs share, waiting for it at every operator made steps up to 10 times slower
# (MiniLM forward at batch 8: 0.57 s with 2 threads, 0.06 s with 1, on a loaded 2-core VM).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    return str(MINILM)


@pytest.fixture(scope="session")
def tokenizer(minilm_path):
    from dsran.train.text import load_tokenizer

    return load_tokenizer(minilm_path)


@pytest.fixture(scope="session")
def minilm_backbone_state(minilm_path):
    """MiniLM weights, loaded once per session; build models with :func:`small_model`."""
    from dsran.train.text import load_text_backbone

    return load_text_backbone(minilm_path).state_dict()


@pytest.fixture()
def small_model(minilm_path, minilm_backbone_state):
    """Build a seeded DSRAN with MiniLM and a small embedding: ``small_model(**overrides)``."""
    from dsran.train.config import ModelConfig
    from dsran.train.model import DSRAN
    from dsran.train.text import build_backbone_from_config

    def build(seed: int = 0, **overrides) -> DSRAN:
        values = {"embed_size": 64, "text_model": minilm_path, **overrides}
        config = ModelConfig(**values)
        backbone = build_backbone_from_config(minilm_path)
        backbone.load_state_dict(minilm_backbone_state)
        torch.manual_seed(seed)
        return DSRAN(config, backbone)

    return build


@pytest.fixture()
def small_store(tmp_path):
    """40 images of random grid and region features (train 0-19, val 20-39), 2 captions each."""
    return random_store(tmp_path / "feats.zarr", n_images=40, max_boxes=100)
