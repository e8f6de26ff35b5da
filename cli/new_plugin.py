"""``mert new-plugin``: a new plugin package from a template."""

from __future__ import annotations

from pathlib import Path

import click

from mert_core.scaffold import KINDS


@click.command("new-plugin")
@click.argument("kind", type=click.Choice(KINDS))
@click.argument("name")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder of the new package (must not exist or be empty). Default: ./mert-NAME-KIND.")
def new_plugin_cmd(kind: str, name: str, out_dir: Path | None) -> None:
    """Write a ready-to-install KIND plugin package called NAME.

    It holds a pyproject.toml with the `mert` entry point, a module that
    implements the contract (every option described) and tests that load it
    through the entry point and run it: `pip install -e DIR && pytest DIR`.
    """
    from mert_core.scaffold import new_plugin, plugin_names

    folder = new_plugin(kind, name, out_dir)
    names = plugin_names(kind, name)
    click.echo(f"wrote {names.distribution} ({kind} {name!r}) to {folder}:")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        click.echo(f"  {path.relative_to(folder)}")
    click.echo(f"next:\n  pip install -e {folder}\n  python -m pytest {folder}")
