"""The `lcmrt` command. Thin: parse options, show progress, call the same functions the Python API exposes.

Build-stage commands import `lcmrt.export` lazily so that the runtime commands work without torch.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import LcmrtError


class _Group(click.Group):
    """Print lcmrt's own errors as one paragraph; `--debug` shows the traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LcmrtError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="lcmrt")
@click.pass_context
def cli(ctx, debug):
    """Compile Stable Diffusion + LCM-LoRA into engine folders and generate images from them."""
    ctx.obj = {"debug": debug}


@cli.command("random-model")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--arch", default="sd15", show_default=True, help="Model family.")
@click.option("--size", type=click.Choice(["tiny", "full"]), default="tiny", show_default=True,
              help="tiny: seconds to build, for tests; full: the real architecture, for benchmarks.")
@click.option("--seed", default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def random_model(out, arch, size, seed, overwrite):
    """Write a random-weight model of a real architecture plus LCM and style LoRAs to OUT."""
    from .export.random_model import write_random_model

    paths = write_random_model(out, arch=arch, size=size, seed=seed, overwrite=overwrite)
    for role, path in paths.items():
        click.echo(f"{role:>10}: {path}")


def main():
    cli(prog_name="lcmrt")
