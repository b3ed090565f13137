"""Click commands of stage 1: ``dsran extract`` and ``dsran info``."""

from __future__ import annotations

from pathlib import Path

import click
from dsran.extract.base import DEVICES, PRECISIONS, ExtractorError, ExtractorOptions
from dsran.extract.captions import CaptionError
from dsran.extract.runner import ExtractConfig, run_extraction
from dsran.extract.store import FeatureStore, StoreError


@click.command("extract")
@click.option(
    "--images",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Image folder, searched recursively; image ids are paths relative to it.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Feature store (Zarr folder): created when missing, else resumed and extended.",
)
@click.option(
    "--captions",
    "captions",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="COCO captions JSON (captions_<split><year>.json) or Karpathy split JSON "
    "(dataset_coco.json); repeat for several files, e.g. train and val.",
)
@click.option("--grid/--no-grid", default=True, help="Extract ResNet152 grid features.")
@click.option(
    "--regions/--no-regions",
    default=False,
    help="Extract Faster R-CNN region features (not available yet; the default is --no-regions).",
)
@click.option(
    "--grid-weights",
    type=click.Path(dir_okay=False, path_type=Path),
    help="torchvision ResNet152 state dict file. Default: torchvision's cache "
    "($TORCH_HOME/hub/checkpoints/resnet152-394f9c45.pth).",
)
@click.option(
    "--random-weights",
    is_flag=True,
    help="Use seeded random CNN weights instead of trained ones (tests and demos); the "
    "store records it.",
)
@click.option(
    "--device", type=click.Choice(DEVICES), default="auto", show_default=True, help="Device."
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="auto",
    show_default=True,
    help="Network precision. auto: fp16 autocast on CUDA, bf16 on CPUs with native "
    "bfloat16, else fp32.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Images per batch.",
)
@click.option(
    "--num-workers",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="DataLoader processes that decode images (0: decode in the main process).",
)
@click.option(
    "--chunk-images",
    type=click.IntRange(min=1),
    default=None,
    help="Images per store chunk, for a new store (default 16). Each write covers whole chunks.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Start a dask LocalCluster with this many worker processes.",
)
@click.option(
    "--scheduler",
    default=None,
    help="Address of an existing dask scheduler (tcp://HOST:PORT). Its workers need dsran "
    "installed and must see --images and --out at the same paths.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="Add only the first N images of the folder (sorted by path), for trial runs.",
)
def extract_command(
    images: Path,
    out: Path,
    captions: tuple[Path, ...],
    grid: bool,
    regions: bool,
    grid_weights: Path | None,
    random_weights: bool,
    device: str,
    precision: str,
    batch_size: int,
    num_workers: int,
    chunk_images: int | None,
    workers: int | None,
    scheduler: str | None,
    limit: int | None,
) -> None:
    """Extract CNN features of an image folder into a Zarr feature store.

    Running the same command again resumes an interrupted run and adds images that
    are new in the folder.
    """
    if workers is not None and scheduler is not None:
        raise click.ClickException(
            f"--workers {workers} and --scheduler {scheduler} exclude each other; pass one of them"
        )
    if regions:
        # TODO: add "regions" to `kinds` once the region detector is registered in
        # dsran.extract.base.EXTRACTOR_FACTORIES.
        raise click.ClickException(
            "--regions is not available yet: this dsran has no region detector. "
            "Run with --no-regions (the default)."
        )
    kinds = ["grid"] if grid else []
    if not kinds:
        raise click.ClickException("--no-grid and --no-regions leave nothing to extract")
    options = ExtractorOptions(
        device=device,
        precision=precision,
        grid_weights=str(grid_weights) if grid_weights is not None else None,
        random_weights=random_weights,
    )
    config = ExtractConfig(
        images=images,
        out=out,
        captions=captions,
        kinds=kinds,
        options=options,
        batch_size=batch_size,
        num_workers=num_workers,
        chunk_images=chunk_images,
        workers=workers,
        scheduler=scheduler,
        limit=limit,
    )
    try:
        store = run_extraction(config)
    except (StoreError, ExtractorError, CaptionError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(store.summary())


@click.command("info")
@click.argument("store", type=click.Path(file_okay=False, path_type=str))
def info_command(store: str) -> None:
    """Print a summary of a feature store: images, features, captions, splits, failures."""
    try:
        click.echo(FeatureStore.open(store).summary())
    except StoreError as error:
        raise click.ClickException(str(error)) from error
