"""The ``dsran`` command group. Each stage defines its commands in its own ``cli`` module."""

import logging

import click
from dsran.extract.cli import extract_command, info_command

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
def cli(verbose: int) -> None:
    """DSRAN image-text matching: extract features, train, evaluate."""
    setup_logging(verbose)


cli.add_command(extract_command)
cli.add_command(info_command)


def main() -> None:
    cli(prog_name="dsran")
