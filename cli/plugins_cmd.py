"""``mert list-plugins``."""

from __future__ import annotations

import json

import click

from mert_core.registry import KINDS


@click.command("list-plugins")
@click.option("--kind", type=click.Choice(KINDS), help="Only this kind of plugin.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_plugins(kind, as_json):
    """List installed teachers, augmentations, tasks and recipes, and broken plugins."""
    from mert_core.registry import load_registry

    registry = load_registry()
    kinds = [kind] if kind else list(KINDS)
    rows = [
        {"kind": k, "name": e.name, "description": e.description, "distribution": e.distribution, "version": e.version, "status": "ok"}
        for k in kinds
        for e in sorted(registry.entries[k].values(), key=lambda e: e.name)
    ]
    broken = [
        {"kind": "?", "name": b.name, "description": b.error, "distribution": b.distribution, "version": b.version, "status": "broken"}
        for b in registry.broken
    ]
    if as_json:
        click.echo(json.dumps(rows + broken, indent=2))
        return
    if not rows and not broken:
        click.echo("no plugins installed")
        return
    width = max(len(r["name"]) for r in rows + broken)
    for k in kinds:
        mine = [r for r in rows if r["kind"] == k]
        if not mine:
            continue
        click.secho(f"{k}s:", bold=True)
        for r in mine:
            click.echo(f"  {r['name']:<{width}}  {r['description']}  [{r['distribution']} {r['version']}]")
    if broken:
        click.secho("broken (failed to load):", bold=True, fg="red")
        for r in broken:
            click.echo(f"  {r['name']:<{width}}  {r['description']}  [{r['distribution']} {r['version']}]")
