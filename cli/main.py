"""The ``mert`` command: one small module per command group, each a thin
layer over the Python API."""

from __future__ import annotations

import sys

import click

from mert_cli.errors import ErrorHandlingGroup


@click.group(cls=ErrorHandlingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mert")
def cli():
    """mert: self-supervised pretraining of music audio models, MERT-style.

    Pretrain a student with swappable teachers (`mert train`), prepare
    teacher labels (`mert teacher`), and judge what it learned on music
    tasks (`mert eval`). `mert list-plugins` shows what is installed.
    """


def _add_commands() -> None:
    from mert_cli.ablate import ablate_cmd
    from mert_cli.export import export_cmd
    from mert_cli.plugins_cmd import list_plugins
    from mert_cli.train import train

    cli.add_command(train)
    cli.add_command(ablate_cmd)
    cli.add_command(export_cmd)
    cli.add_command(list_plugins)
    try:
        from mert_cli.teacher import teacher_group

        cli.add_command(teacher_group)
    except ImportError:  # pragma: no cover - during development only
        pass
    try:
        from mert_cli.evaluate import eval_cmd, extract_cmd, probe_cmd

        for cmd in (extract_cmd, probe_cmd, eval_cmd):
            cli.add_command(cmd)
    except ImportError:  # pragma: no cover
        pass


_add_commands()


def main() -> None:
    cli(prog_name="mert")


if __name__ == "__main__":
    sys.exit(main())
