"""Click commands of stage 1: ``dsran extract`` and ``dsran info``."""

from __future__ import annotations

import click
from dsran.extract.store import FeatureStore, StoreError


@click.command("extract")
def extract_command() -> None:
    """Extract CNN features of an image folder into a Zarr feature store."""
    raise click.ClickException("not implemented yet")  # TODO: grid extraction lands next


@click.command("info")
@click.argument("store", type=click.Path(file_okay=False, path_type=str))
def info_command(store: str) -> None:
    """Print a summary of a feature store: images, features, captions, splits, failures."""
    try:
        click.echo(FeatureStore.open(store).summary())
    except StoreError as error:
        raise click.ClickException(str(error)) from error
