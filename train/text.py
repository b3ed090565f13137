"""Finding and loading the text model (a transformers encoder and its tokenizer) offline."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from torch import nn

logger = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"


class TextModelNotFoundError(FileNotFoundError):
    """The configured text model is neither a local folder nor in the Hugging Face cache."""


def resolve_text_model(spec: str) -> str:
    """Turn ``model.text_model`` into a folder path or a Hugging Face model id.

    ``package:MODULE/SUBDIR`` names a folder inside an installed Python package, an
    existing folder is used as it is, and anything else is a model id for the local
    Hugging Face cache.
    """
    if spec.startswith(PACKAGE_PREFIX):
        module_name, _, subdir = spec[len(PACKAGE_PREFIX) :].partition("/")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise TextModelNotFoundError(
                f"text model {spec!r}: Python package {module_name!r} is not installed. "
                f"Install it (pip install {module_name.replace('_', '-')}) or set "
                "--text-model to a model folder."
            ) from error
        folder = Path(module.__file__).parent / subdir
        if not folder.is_dir():
            raise TextModelNotFoundError(
                f"text model {spec!r}: folder {folder} does not exist in package {module_name!r}"
            )
        return str(folder)
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path)
    if path.is_absolute() or spec.startswith((".", "~")):
        raise TextModelNotFoundError(
            f"text model folder not found: {path}. Pass --text-model with a folder that holds "
            "config.json, the weights and the tokenizer files."
        )
    return spec


def _not_found_message(spec: str, error: Exception) -> str:
    from huggingface_hub import constants

    return (
        f"text model {spec!r} is not a local folder and is not in the Hugging Face cache "
        f"{constants.HF_HUB_CACHE} (set by HF_HOME). dsran never downloads models. On a "
        f"machine with internet run `huggingface-cli download {spec}` and copy the cache "
        "folder here (or point HF_HOME at it), or save the model with save_pretrained() and "
        f"pass --text-model FOLDER. Loader error: {error}"
    )


def load_text_backbone(spec: str) -> nn.Module:
    """Load the pretrained encoder of ``model.text_model`` without network access."""
    from transformers import AutoModel

    source = resolve_text_model(spec)
    try:
        model = AutoModel.from_pretrained(source, local_files_only=True)
    except OSError as error:
        raise TextModelNotFoundError(_not_found_message(spec, error)) from error
    logger.info("loaded text model %s from %s", spec, source)
    return model


def load_tokenizer(spec: str):
    """Load the tokenizer of ``model.text_model`` (or of a run's text_model folder)."""
    from transformers import AutoTokenizer

    source = resolve_text_model(spec)
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except OSError as error:
        raise TextModelNotFoundError(_not_found_message(spec, error)) from error


def build_backbone_from_config(folder: str | Path) -> nn.Module:
    """Build an encoder with the architecture saved in ``folder`` and untrained weights.

    A run folder stores the architecture and the tokenizer; its checkpoint holds the
    fine-tuned weights, which the caller loads next.
    """
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    return AutoModel.from_config(config)


def save_text_model_files(backbone: nn.Module, tokenizer, folder: str | Path) -> None:
    """Save the encoder's architecture (config.json, no weights) and the tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backbone.config.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
