"""``mert ablate``: the paper's teacher ablation in one command, a thin layer
over :func:`mert_core.api.ablate`."""

from __future__ import annotations

from pathlib import Path

import click

from mert_cli.options import setup_eval_logging, split_eval_options, task_options
from mert_core.config import PRESET_NAMES


@click.command("ablate")
@click.option("--data", "data", multiple=True, required=True, type=click.Path(path_type=Path), help="Training audio: folder, file or manifest (repeatable).")
@click.option("--arm", "arms", multiple=True, metavar="NAME=TEACHERS", help="An arm: NAME=TEACHER[+TEACHER...] on the base recipe, or NAME=recipe:RECIPE (repeatable). Default: the paper's teacher ablation.")
@click.option("--task", "tasks", multiple=True, required=True, metavar="NAME", help="Downstream task to probe (repeatable).")
@click.option("--task-set", "task_sets", multiple=True, metavar="[TASK.]KEY=VALUE", help="Task option, e.g. nsynth-pitch.data_dir=/data/nsynth (repeatable).")
@click.option("--seeds", type=int, default=3, show_default=True, help="Pretraining seeds per arm (and random baselines).")
@click.option("--max-steps", type=int, default=600, show_default=True, help="Training budget of every arm (optimizer updates).")
@click.option("--recipe", "base_recipe", default="cpu", show_default=True, help="Recipe the teacher arms start from.")
@click.option("--preset", type=click.Choice(PRESET_NAMES), help="Student size of every arm, recipe arms included (default: the base recipe's).")
@click.option("--train-set", "train_overrides", multiple=True, metavar="KEY=VALUE", help="Config override for every arm, as `mert train --set` (repeatable).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Probe/extraction option, as `mert eval --set` (repeatable).")
@click.option("--baseline", "baselines", multiple=True, type=click.Choice(["random", "handcrafted"]), help="Baselines (default: both).")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Feature cache root (default $MERT_CACHE or ~/.cache/mert).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("ablation"), show_default=True, help="Folder for runs/, teachers/, eval tables and ablation.png.")
def ablate_cmd(data, arms, tasks, task_sets, seeds, max_steps, base_recipe, preset, train_overrides, overrides, baselines, cache_dir, device, quiet, out_dir):
    """Pretrain every arm x seed on the same data and budget, probe each beside
    random and handcrafted baselines, and tabulate mean +- std over seeds.

    Run it again to reuse every finished run, fitted teacher and feature set
    (so it resumes after a kill).

    \b
    Examples:
      mert ablate --data /music --task demo-key --task demo-pitch --out ablation
      mert ablate --data /music --arm cqt=cqt --arm lmc+cqt=kmeans-logmel-chroma+cqt \\
                  --seeds 3 --max-steps 600 --task nsynth-pitch --task-set nsynth-pitch.data_dir=/data/nsynth
    """
    from mert_core import ablation, api

    setup_eval_logging(quiet)
    probe_options, extract_options = split_eval_options(overrides)
    arm_list = [api.parse_arm(a) for a in arms] or api.default_arms(ablation.encodec_weights_available())
    report = api.ablate(
        arm_list, data=list(data), out_dir=out_dir, tasks=list(tasks), seeds=seeds, max_steps=max_steps,
        base_recipe=base_recipe, preset=preset, train_overrides=list(train_overrides),
        task_options=task_options(task_sets, list(tasks)), probe_options=probe_options, extract_options=extract_options,
        baselines=list(baselines) or list(ablation.BASELINE_NAMES), cache_dir=cache_dir, device=device,
        progress=not quiet, log=click.echo,
    )
    click.echo(f"wrote {', '.join(p.name for p in report.files)} to {report.out_dir}")
