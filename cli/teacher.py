"""``mert teacher fit`` and ``mert teacher label``: the offline teacher path.

Thin layers over :func:`mert_core.api.fit_teacher` and
:func:`mert_core.api.label_data`.
"""

from __future__ import annotations

from pathlib import Path

import click

from mert_cli.errors import ErrorHandlingGroup
from mert_cli.options import DataSource, parse_sets, setup_logging


_data = click.option(
    "--data", "data", multiple=True, required=True, type=DataSource(exists=True),
    help="Audio folder (recursive), audio file or .tsv/.csv manifest, or shards (an index.json, a URL or brace pattern; repeatable).",
)
_set = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Teacher option, e.g. n_clusters=2000 (repeatable).")
_device = click.option("--device", default="auto", show_default=True, help="auto (CUDA if available), cpu, cuda, cuda:N.")
_quiet = click.option("--quiet", is_flag=True, help="No progress bars or info messages.")


@click.group("teacher", cls=ErrorHandlingGroup)
def teacher_group():
    """Fit teachers and write offline label stores.

    \b
    Examples:
      mert teacher fit kmeans-mfcc --data /music --out mfcc500.safetensors
      mert teacher fit kmeans-mfcc --data /music --out mfcc2000.safetensors --set n_clusters=2000 --set sample_hours=50
      mert teacher label kmeans-mfcc --teacher-file mfcc500.safetensors --data /music --out labels/mfcc500
    """


@teacher_group.command("fit")
@click.argument("name")
@_data
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Fitted teacher file to write (.safetensors).")
@_set
@click.option("--seed", default=0, show_default=True, help="Seed of the sample and the initialisation.")
@_device
@_quiet
def fit_cmd(name, data, out_file, sets, seed, device, quiet):
    """Fit teacher NAME (k-means, best-rq, mel-rvq, cqt statistics) on a sample of the audio.

    Features are streamed from a seeded random sample (--set sample_fraction=0.1
    or --set sample_hours=20); memory stays bounded. The file holds the
    centroids, feature settings, inertia, the sample and library versions, and
    serves every split.
    """
    from mert_core import api

    setup_logging(quiet)
    options = parse_sets(sets)
    path = api.fit_teacher(name, list(data), out_file, options, seed=seed, device=device, progress=not quiet)
    click.echo(f"fitted {name} -> {path}")


@teacher_group.command("label")
@click.argument("name")
@click.option("--teacher-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Fitted teacher (from `mert teacher fit`); needed by k-means teachers.")
@_data
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Label store folder to create.")
@_set
@click.option("--window-seconds", default=5.0, show_default=True, help="Window = training crop (MERT: 5 s; 5.12 s for the large model).")
@click.option("--sample-rate", default=24000, show_default=True, help="The student's sample rate.")
@click.option("--batch-size", default=16, show_default=True, help="Windows per teacher call.")
@click.option("--num-workers", default=0, show_default=True, help="Processes decoding audio.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store at --out.")
@_device
@_quiet
def label_cmd(name, teacher_file, data, out_dir, sets, window_seconds, sample_rate, batch_size, num_workers, overwrite, device, quiet):
    """Label the audio with teacher NAME into one memory-mapped store.

    Labels are made per window of --window-seconds on a grid from the start of
    each file, exactly as the trainer's aligned crops; pass the folder as
    `label_store` of the teacher in the training config.

    Under `torchrun --nproc_per_node N -m mert_cli.main teacher label ...` the
    files are split across the N processes (one GPU each) and rank 0 writes the
    one store, equal to what a single process writes.
    """
    from mert_core import api, distributed
    from mert_core.labels import MissingTeacherFile

    setup_logging(quiet)
    options = parse_sets(sets)
    window = round(window_seconds * sample_rate)
    try:
        s = api.label_data(
            name, list(data), out_dir, options, teacher_file=teacher_file, window_samples=window, sample_rate=sample_rate,
            batch_size=batch_size, device=device, overwrite=overwrite, num_workers=num_workers, progress=not quiet,
        )
    except MissingTeacherFile as exc:
        raise click.UsageError(str(exc)) from None
    if not distributed.info_from_env().is_main:
        return  # rank 0 reports for every rank
    click.echo(
        f"labelled {s.num_files} files ({s.num_windows} windows, {s.num_frames} frames x {s.num_codebooks} codebooks, "
        f"{s.dtype}, {s.labels_bytes / 1e6:.2f} MB) -> {s.out_dir}"
        + (f"; skipped {len(s.skipped)} files, e.g. {next(iter(s.skipped.values()))}" if s.skipped else "")
    )


if __name__ == "__main__":
    teacher_group()
