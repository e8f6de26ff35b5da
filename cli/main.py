"""The ``mert`` command: one small module per command group, each a thin
layer over the Python API."""

from __future__ import annotations

import sys

import click

from mert_cli.errors import ErrorHandlingGroup


def version_message() -> str:
    """``mert-toolkit 0.1.0 (torch 2.4.1, torchaudio 2.4.1, Python 3.11.7)``: what a bug report needs."""
    import platform

    from mert_core import DISTRIBUTION, library_versions

    versions = library_versions("torch", "torchaudio")
    ours = versions.pop(DISTRIBUTION)
    others = ", ".join(f"{name} {version}" for name, version in versions.items())
    return f"{DISTRIBUTION} {ours} ({others}, Python {platform.python_version()})"


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(version_message())
        ctx.exit()


@click.group(cls=ErrorHandlingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the versions of mert-toolkit, torch and torchaudio, and exit.")
def cli():
    """mert: self-supervised pretraining of music audio models, MERT-style.

    Pretrain a student with swappable teachers (`mert train`), pack large
    corpora into shards (`mert data`), prepare teacher labels (`mert
    teacher`), and judge what it learned on music tasks (`mert eval`).
    `mert list-plugins` shows what is installed.
    """


def _add_commands() -> None:
    from mert_cli.ablate import ablate_cmd
    from mert_cli.data import data_group
    from mert_cli.export import export_cmd
    from mert_cli.new_plugin import new_plugin_cmd
    from mert_cli.plugins_cmd import list_plugins
    from mert_cli.train import train

    from mert_cli.evaluate import eval_cmd, extract_cmd, probe_cmd
    from mert_cli.teacher import teacher_group

    for cmd in (train, data_group, teacher_group, extract_cmd, probe_cmd, eval_cmd, ablate_cmd, export_cmd, list_plugins, new_plugin_cmd):
        cli.add_command(cmd)


_add_commands()


def main() -> None:
    cli(prog_name="mert")


if __name__ == "__main__":
    sys.exit(main())
