"""Command defaults from a DVC ``params.yaml``.

The pipeline's stages run ``dsran extract``, ``dsran train`` and ``dsran eval`` with no
options; each command takes its defaults from the section of ``params.yaml`` with its
name. Keys are the commands' option names with underscores (``random_weights``,
``store_split``). Options given on the command line always win.

The file is read by itself only inside a DVC stage, which DVC marks by setting
``DVC_STAGE`` in the command's environment; elsewhere ``dsran --params FILE`` names it.
A command typed in the repository folder therefore never takes the sample's settings
(random weights among them) without being asked to.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
import yaml

logger = logging.getLogger(__name__)

PARAMS_FILE = "params.yaml"


def pipeline_params_file() -> Path | None:
    """Return ``./params.yaml`` when this process runs as a DVC stage and the file exists."""
    if not os.environ.get("DVC_STAGE"):
        return None
    path = Path(PARAMS_FILE)
    return path if path.is_file() else None


def load_default_map(path: Path, command_names: set[str]) -> dict[str, dict[str, Any]]:
    """Read ``path`` and return Click's ``default_map``: command name to option defaults.

    Sections that name no dsran command (other tools may share the file) are ignored.
    """
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise click.ClickException(f"cannot read parameters file {path}: {error}") from error
    if not isinstance(params, Mapping):
        raise click.ClickException(
            f"parameters file {path} must hold a mapping of sections, got {type(params).__name__}"
        )
    default_map: dict[str, dict[str, Any]] = {}
    for name, section in params.items():
        if name not in command_names or section is None:
            continue
        if not isinstance(section, Mapping):
            raise click.ClickException(
                f"section {name!r} of {path} must be a mapping of option names to values, got {section!r}"
            )
        default_map[name] = {
            key.replace("-", "_"): value for key, value in section.items() if value is not None
        }
    return default_map


def check_option_names(command: click.Command, defaults: Mapping[str, Any], source: Path) -> None:
    """Reject keys of a params section that are not options of ``command`` (typos would be ignored)."""
    known = {param.name for param in command.params}
    unknown = sorted(set(defaults) - known)
    if unknown:
        raise click.ClickException(
            f"{source}: section {command.name!r} has unknown keys {unknown}; "
            f"valid keys are {sorted(name for name in known if name)}"
        )
