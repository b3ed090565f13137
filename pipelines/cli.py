"""The ``dsran`` command group. Each stage defines its commands in its own ``cli`` module."""

import logging
from pathlib import Path

import click
from dsran.evaluate.cli import eval_command
from dsran.extract.cli import extract_command, import_command, info_command, show_command
from dsran.pipelines.params import (
    PARAMS_FILE,
    check_option_names,
    load_default_map,
    pipeline_params_file,
)
from dsran.train.cli import convert_official_command, train_command

from dsran import __version__


def setup_logging(verbose: int) -> None:
    """Configure the root logger once for every command: timestamped, level by -v count."""
    level = logging.DEBUG if verbose > 0 else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
    )
    # Third-party loggers are noisy at INFO; keep them at WARNING unless -vv.
    if verbose < 2:
        for name in ("distributed", "fsspec", "urllib3", "PIL", "matplotlib"):
            logging.getLogger(name).setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dsran")
@click.option(
    "-v", "--verbose", count=True, help="Log more: -v for debug messages, -vv for libraries too."
)
@click.option(
    "--params",
    "params_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=f"YAML file whose sections (extract, train, eval) set command defaults. "
    f"Default: ./{PARAMS_FILE} inside a DVC stage (when DVC_STAGE is set), else none.",
)
@click.option("--no-params", is_flag=True, help=f"Ignore ./{PARAMS_FILE} even inside a DVC stage.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, params_path: Path | None, no_params: bool) -> None:
    """DSRAN image-text matching: extract features, train, evaluate."""
    setup_logging(verbose)
    if params_path is None and not no_params:
        params_path = pipeline_params_file()
    if params_path is None:
        return
    if not params_path.is_file():
        raise click.ClickException(f"parameters file not found: {params_path}")
    default_map = load_default_map(params_path, set(cli.commands))
    for name, defaults in default_map.items():
        check_option_names(cli.commands[name], defaults, params_path)
    if ctx.invoked_subcommand in default_map:
        logging.getLogger(__name__).info(
            "defaults for `dsran %s` from %s: %s",
            ctx.invoked_subcommand,
            params_path,
            default_map[ctx.invoked_subcommand],
        )
    ctx.default_map = default_map


cli.add_command(extract_command)
cli.add_command(info_command)
cli.add_command(import_command)
cli.add_command(show_command)
cli.add_command(train_command)
cli.add_command(eval_command)
cli.add_command(convert_official_command)


def main() -> None:
    cli(prog_name="dsran")
