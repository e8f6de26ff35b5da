"""``mert export``: write a trained student in another framework's format."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("export")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["hf"]), default="hf", show_default=True,
              help="hf: a Hugging Face HubertModel folder (config.json, model.safetensors, preprocessor_config.json, README.md).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write.")
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path),
              help="results.json from `mert eval --checkpoint SOURCE`: its rows for this checkpoint go into the model card.")
@click.option("--name", help="Title of the model card (default: the run folder's name).")
def export_cmd(source, fmt, out_dir, results, name):
    """Export SOURCE (run folder, .pt, student.safetensors or HF folder) for sharing.

    The folder loads with plain transformers, no remote code:
    `AutoModel.from_pretrained(DIR)`.

    \b
    Example:
      mert export runs/mert --format hf --out mert-tiny-hf
    """
    from mert_core import api
    from mert_core.checkpoint import CheckpointError
    from mert_core.convert import HFConversionError
    from mert_core.export import ExportError

    try:
        paths = api.export_hf(source, out_dir, results=results, name=name)
    except (ExportError, CheckpointError, HFConversionError) as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"wrote {', '.join(p.name for p in paths)} to {out_dir}")
