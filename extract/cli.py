"""Click commands of stage 1: ``dsran extract``, ``dsran info``, ``dsran import`` and ``dsran show``."""

from __future__ import annotations

from pathlib import Path

import click
from dsran.extract.base import DEVICES, PRECISIONS, ExtractorError, ExtractorOptions
from dsran.extract.captions import CaptionError, match_captions
from dsran.extract.images import ImageLoadError, discover_images
from dsran.extract.importers import (
    IMPORT_FORMATS,
    FeatureImportError,
    import_regions,
    import_settings,
    iter_bottom_up_tsv,
    iter_milvlg_folder,
)
from dsran.extract.runner import ExtractConfig, run_extraction
from dsran.extract.show import render_store_image
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
    default=True,
    help="Extract Visual Genome Faster R-CNN region features (bottom-up attention).",
)
@click.option(
    "--grid-weights",
    type=click.Path(dir_okay=False, path_type=Path),
    help="torchvision ResNet152 state dict file. Default: torchvision's cache "
    "($TORCH_HOME/hub/checkpoints/resnet152-394f9c45.pth).",
)
@click.option(
    "--region-weights",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The region detector's detectron2 checkpoint: MILVLG's bua-caffe-frcn-r101-k10-100.pth "
    "(bottom-up-attention.pytorch model zoo).",
)
@click.option(
    "--min-boxes",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Regions kept per image at least (the best by confidence fill up to it).",
)
@click.option(
    "--max-boxes",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Regions kept per image at most: the store's K. DSRAN uses exactly 100 (100 and 100).",
)
@click.option(
    "--class-probs",
    is_flag=True,
    help="Also store the 1601 class probabilities of each region (regions/class_probs).",
)
@click.option(
    "--region-proposals",
    type=click.IntRange(min=1),
    default=300,
    show_default=True,
    help="RPN proposals per image that run through the detector's box head (published: "
    "300). Fewer is faster and caps the choice of regions; it must be at least --max-boxes.",
)
@click.option(
    "--region-min-size",
    type=click.IntRange(min=1),
    default=600,
    show_default=True,
    help="Shorter image side for the detector, in pixels (published: 600).",
)
@click.option(
    "--region-max-size",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Cap on the longer image side for the detector, in pixels (published: 1000).",
)
@click.option(
    "--random-weights",
    is_flag=True,
    help="Use seeded random CNN weights instead of trained ones (tests and demos); the "
    "store records it.",
)
@click.option(
    "--random-weights-if-missing",
    is_flag=True,
    help="Use trained weights where a file is found and seeded random weights, with a "
    "warning, where none is (the demo's mode); the store records which.",
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
    region_weights: Path | None,
    min_boxes: int,
    max_boxes: int,
    class_probs: bool,
    region_proposals: int,
    region_min_size: int,
    region_max_size: int,
    random_weights: bool,
    random_weights_if_missing: bool,
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
    kinds = [kind for kind, enabled in (("grid", grid), ("regions", regions)) if enabled]
    if not kinds:
        raise click.ClickException("--no-grid and --no-regions leave nothing to extract")
    options = ExtractorOptions(
        device=device,
        precision=precision,
        grid_weights=str(grid_weights) if grid_weights is not None else None,
        random_weights=random_weights,
        random_if_missing=random_weights_if_missing,
        region_weights=str(region_weights) if region_weights is not None else None,
        min_boxes=min_boxes,
        max_boxes=max_boxes,
        class_probs=class_probs,
        region_proposals=region_proposals,
        region_min_size=region_min_size,
        region_max_size=region_max_size,
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


@click.command("import")
@click.option(
    "--format",
    "source_format",
    required=True,
    type=click.Choice(IMPORT_FORMATS),
    help="milvlg-npz: a folder of per-image .npz files of MILVLG/bottom-up-attention.pytorch. "
    "bottom-up-tsv: TSV files of peteanderson80/bottom-up-attention (generate_tsv.py).",
)
@click.option(
    "--features",
    "sources",
    required=True,
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    help="The .npz folder, or a TSV file (repeat for several TSV files).",
)
@click.option(
    "--images",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Image folder the features were extracted from; its images become the store's rows, "
    "as with `dsran extract`. Records match images by path, file stem or COCO id.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Feature store (Zarr folder): created when missing, else resumed.",
)
@click.option(
    "--captions",
    "captions",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="COCO captions JSON or Karpathy split JSON, as for `dsran extract`.",
)
@click.option(
    "--max-boxes",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Regions per image in the store (K); images with fewer are padded.",
)
@click.option(
    "--chunk-images",
    type=click.IntRange(min=1),
    default=None,
    help="Images per store chunk, for a new store (default 16).",
)
def import_command(
    source_format: str,
    sources: tuple[Path, ...],
    images: Path,
    out: Path,
    captions: tuple[Path, ...],
    max_boxes: int,
    chunk_images: int | None,
) -> None:
    """Import region features that other extractors wrote into a feature store.

    Images of the folder without a record in the dump are recorded as failed. Running
    the same command again resumes an interrupted import.
    """
    if source_format == "milvlg-npz" and (len(sources) != 1 or not sources[0].is_dir()):
        raise click.ClickException(
            f"--format milvlg-npz reads one folder of .npz files, got {', '.join(map(str, sources))}"
        )
    if source_format == "bottom-up-tsv" and any(source.is_dir() for source in sources):
        raise click.ClickException("--format bottom-up-tsv reads TSV files, not folders")
    try:
        image_paths = discover_images(images)
        if not image_paths:
            raise StoreError(f"no image files found under {images}")
        if source_format == "milvlg-npz":
            records = iter_milvlg_folder(sources[0])
        else:
            records = (record for source in sources for record in iter_bottom_up_tsv(source))
        settings = import_settings(source_format, sources, max_boxes)
        report = import_regions(records, out, image_paths, settings, chunk_images=chunk_images)
        store = FeatureStore.open(out, mode="r+")
        if captions:
            matched = match_captions(captions, list(store.image_paths()))
            store.write_captions(matched.text, matched.image)
            store.write_splits(matched.splits)
    except (FeatureImportError, StoreError, CaptionError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(
        f"imported regions of {report.imported} images ({report.skipped_done} already done, "
        f"{report.missing} without a record, {len(report.unmatched)} records without an image)"
    )
    click.echo(store.summary())


@click.command("show")
@click.argument("store", type=click.Path(file_okay=False, path_type=Path))
@click.argument("image")
@click.option(
    "--images",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Image folder the store was extracted from.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Output image file (PNG or JPEG, by extension).",
)
@click.option(
    "--boxes",
    "max_regions",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Draw the N regions with the highest object scores.",
)
@click.option(
    "--attribute-threshold",
    type=click.FloatRange(0.0, 1.0),
    default=0.0,
    show_default=True,
    help="Put the attribute in a label only when its score reaches this value.",
)
def show_command(
    store: Path,
    image: str,
    images: Path,
    out: Path,
    max_regions: int,
    attribute_threshold: float,
) -> None:
    """Draw the stored regions of IMAGE (a path, file stem or row number) with their labels."""
    try:
        feature_store = FeatureStore.open(store)
        drawn = render_store_image(
            feature_store,
            image,
            images,
            max_regions=max_regions,
            attribute_threshold=attribute_threshold,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        drawn.save(out)
    except (StoreError, FileNotFoundError, ImageLoadError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"wrote {out}")
    if (feature_store.settings.get("regions") or {}).get("random_weights"):
        click.echo(
            "WARNING: the regions come from a detector with random weights, so the boxes and "
            "labels are not detections."
        )
