"""``mert data pack`` and ``mert data info``: audio corpora as WebDataset shards.

Thin layers over :func:`mert_core.shards.pack_shards` and :func:`mert_core.shards.open_corpus`.
"""

from __future__ import annotations

import click

from mert_cli.errors import ErrorHandlingGroup
from mert_cli.options import DataSource, setup_logging


@click.group("data", cls=ErrorHandlingGroup)
def data_group():
    """Pack audio into WebDataset tar shards that `mert train` streams.

    \b
    Examples:
      mert data pack --data /music --out /corpus --shard-size 1GB
      mert data pack --data /music --data extra.tsv --out s3://bucket/corpus --encoding flac
      mert data pack --data /data/GTZAN --out s3://bucket/gtzan --all-files
      mert data info https://host/corpus/index.json
      mert train --recipe cpu --data https://host/corpus/index.json
    """


@data_group.command("pack")
@click.option("--data", "data", multiple=True, required=True, type=DataSource(exists=True),
              help="Audio folder (recursive), audio file or .tsv/.csv manifest (repeatable).")
@click.option("--out", "out", required=True, help="Folder or fsspec URL (s3://bucket/corpus, ...) to write the shards and index.json into.")
@click.option("--shard-size", default="1GB", show_default=True, help="Target size of a shard (KB, MB, GB, KiB, ...).")
@click.option("--encoding", type=click.Choice(["original", "flac"]), default="original", show_default=True,
              help="original: each file's own bytes; flac: decoded and re-encoded losslessly.")
@click.option("--seed", default=0, show_default=True, type=int, help="Files go into shards in this seeded random order.")
@click.option("--all-files", is_flag=True, help="Also pack the other files under the folders (labels, metadata): a whole dataset, "
                                                "e.g. an evaluation task's, that `--task-set TASK.data_dir=SHARDS` fetches back as a folder.")
@click.option("--overwrite", is_flag=True, help="Replace a pack already at --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def pack_cmd(data, out, shard_size, encoding, seed, all_files, overwrite, quiet):
    """Write the audio as shard-000000.tar, ... and index.json.

    Each file is one WebDataset member: KEY.EXT (the audio) and KEY.json
    (duration, sample rate, source path). Unreadable files are listed in
    index.json's `skipped` and not packed.
    """
    from mert_core import shards

    setup_logging(quiet)
    s = shards.pack_shards(list(data), out, shard_size, encoding=encoding, seed=seed, all_files=all_files, overwrite=overwrite,
                           progress=not quiet)
    click.echo(f"packed {s.members} files ({s.hours:.2f} h, {s.bytes / 1e9:.2f} GB) into {s.shards} shards at {s.out} "
               f"in {s.seconds:.0f} s" + (f"; skipped {len(s.skipped)}, e.g. {next(iter(s.skipped.items()))}" if s.skipped else ""))


@data_group.command("info")
@click.argument("source", nargs=-1, required=True, type=DataSource(exists=True))
def info_cmd(source):
    """What SOURCE holds: shards, members and hours (an index.json, a folder holding one, a brace pattern)."""
    from mert_core import shards

    corpus = shards.open_corpus(source)
    click.echo(corpus.describe())
    for url in corpus.urls[:3]:
        click.echo(f"  {url}")
    if len(corpus.urls) > 3:
        click.echo(f"  ... {corpus.urls[-1]}")
