"""``mert train``."""

from __future__ import annotations

from pathlib import Path

import click

from mert_cli.options import DataSource
from mert_core.config import PRESET_NAMES


@click.command("train")
@click.option("--teacher", "teachers", multiple=True, metavar="NAME", help="Teacher plugin (repeatable): cqt, rvq-vae, kmeans-mfcc, ... Replaces the recipe's teachers.")
@click.option("--augment", "augment", multiple=True, metavar="NAME", help="Augmentation plugin (repeatable), e.g. inbatch-mixup.")
@click.option("--recipe", metavar="NAME", help="Named bundle of teachers, augmentations and hyperparameters (mert list-plugins --kind recipe).")
@click.option("--data", "data", multiple=True, type=DataSource(), help="Audio folder (recursive), .tsv/.csv manifest, or shards: an index.json, a folder holding one, a URL or brace pattern of .tar shards (repeatable). Default: the built-in demo data.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Run folder for checkpoints, metrics and plots. Default: runs/mert.")
@click.option("--preset", type=click.Choice(PRESET_NAMES), help="Student size.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="YAML/JSON file of config fields.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field: optim.lr=1e-4, data.batch_size=8, teacher.cqt.n_bins=84 (repeatable).")
@click.option("--max-steps", type=int, help="Optimizer updates to run (optim.max_steps).")
@click.option("--init-from", type=click.Path(path_type=Path), help="Continued pretraining: start the student from a Hugging Face HuBERT/MERT folder, a run folder, a .pt or a student.safetensors (shapes must fit --preset).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Delete the run already in --out (checkpoints, metrics, fitted teachers) and start a new one.")
@click.option("--dry-run", is_flag=True, help="Print the validated config and exit.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(teachers, augment, recipe, data, out_dir, preset, config_file, overrides, max_steps, init_from, resume, overwrite, dry_run, quiet):
    """Pretrain a MERT student with masked prediction of teacher targets.

    \b
    Examples:
      mert train --teacher cqt --preset tiny --max-steps 200
      mert train --teacher rvq-vae --teacher cqt --augment inbatch-mixup --data /music
      mert train --recipe mert-v1 --preset 95m --data /music --out runs/v1
      mert train --recipe mert-v1 --preset 95m --init-from MERT-v1-95M/ --data /music --out runs/cont
      mert train --recipe cpu --data https://host/corpus/index.json
      mert train --recipe cpu --data 's3://bucket/corpus/shard-{000000..000099}.tar'
      torchrun --nproc_per_node 4 -m mert_cli.main train --recipe mert-v1 --data /music
    """
    import mert_core.api as api

    config = api.make_train_config(
        recipe=recipe, preset=preset, config_file=config_file, teachers=teachers, augment=augment,
        data=data, out_dir=out_dir, max_steps=max_steps, init_from=init_from, overrides=overrides,
    )
    if dry_run:
        click.echo(config.model_dump_json(indent=2))
        return
    api.train(config, resume=resume, progress=not quiet, overwrite=overwrite)
