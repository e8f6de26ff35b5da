"""``mert extract``, ``mert probe`` and ``mert eval``: thin layers over
:mod:`mert_core.api` (``extract_task``, ``probe_task``, ``evaluate``).

Bad input (unknown task or option, missing dataset folder, unreadable
checkpoint) is a one-line usage error with exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from mert_cli.errors import InputError, usage_errors
from mert_cli.options import setup_eval_logging, split_eval_options, task_options
from mert_core.config import PRESET_NAMES
from mert_core.errors import MertError
from mert_core.tasks import SPLITS


def _prepare(checkpoints, hf_models, baselines, preset, tasks, task_sets, overrides, device, seed):
    """Validate everything up front (options, task data, checkpoints) before any long work."""
    from mert_core import api
    from mert_core.paths import resolve_device

    probe_opts, extract_opts = split_eval_options(overrides)
    probe_opts.setdefault("seed", seed)
    probe_opts.setdefault("device", resolve_device(device))
    from mert_core.evaluation.extract import ExtractOptions
    from mert_core.evaluation.probe import ProbeOptions

    po, xo = ProbeOptions(**probe_opts), ExtractOptions(**extract_opts)
    task_opts = task_options(task_sets, list(tasks))
    task_objs = [api.build_task(t, task_opts[t]) for t in tasks]
    for t in task_objs:  # read the split lists now: a wrong folder fails in a second, not after extraction
        for s in SPLITS:
            t.examples(s)
    try:
        ups = api.build_upstreams(checkpoints, baselines, hf_models, preset=preset, device=device, seed=seed, extract_options=xo)
    except MertError as exc:  # a missing or unreadable checkpoint, a random baseline without a size: bad input
        raise InputError(str(exc)) from exc
    return ups, task_objs, po, xo


def _upstream_options(fn):
    opts = [
        click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(path_type=Path), metavar="PATH",
                     help="mert run folder, .pt checkpoint or student.safetensors (repeatable)."),
        click.option("--hf-model", "hf_models", multiple=True, type=click.Path(path_type=Path), metavar="FOLDER",
                     help="Hugging Face HubertModel folder, e.g. a local MERT-v1-95M (repeatable)."),
        click.option("--baseline", "baselines", multiple=True, type=click.Choice(["random", "handcrafted"]),
                     help="random: seeded random student of the first model's size (or --preset); handcrafted: MFCC/chroma/CQT (repeatable)."),
        click.option("--preset", type=click.Choice(PRESET_NAMES), help="Size of the random baseline when no model is given."),
        click.option("--task", "tasks", multiple=True, required=True, metavar="NAME", help="Task name (repeatable); see `mert list-plugins --kind task`."),
        click.option("--task-set", "task_sets", multiple=True, metavar="[TASK.]KEY=VALUE", help="Task option, e.g. gtzan-genre.data_dir=/data/GTZAN (repeatable)."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Probe/extraction option, e.g. max_epochs=20, lrs=[1e-3,1e-2], window_seconds=30 (repeatable)."),
        click.option("--cache-dir", type=click.Path(path_type=Path), help="Feature cache root (default $MERT_CACHE or ~/.cache/mert)."),
        click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto."),
        click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random baseline and of the probes."),
        click.option("--quiet", is_flag=True, help="No progress bars or log lines."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@click.command("extract")
@_upstream_options
@click.option("--split", "splits", multiple=True, type=click.Choice(list(SPLITS)), help="Splits to extract (default: all).")
@usage_errors
def extract_cmd(checkpoints, hf_models, baselines, preset, tasks, task_sets, overrides, cache_dir, device, seed, quiet, splits):
    """Extract features of every layer into the feature cache.

    Clip-level tasks store time-averaged features (long audio averaged over
    30 s windows), frame-level tasks every frame. A later probe or eval with
    the same upstream, task and settings reuses them.

    \b
    Example:
      mert extract --checkpoint runs/mert --task demo-key --task demo-beat
    """
    from mert_core import api

    setup_eval_logging(quiet)
    ups, task_objs, _, xo = _prepare(checkpoints, hf_models, baselines, preset, tasks, task_sets, overrides, device, seed)
    for up in ups:
        for task in task_objs:
            feats = api.extract_task(up, task, splits or SPLITS, xo, cache_dir, progress=not quiet)
            for split, fs in feats.items():
                skipped = len(fs.meta["skipped"])
                click.echo(f"{up.name} {task.name}/{split}: {len(fs)} items, features {tuple(fs.features.shape)} "
                           f"{'(reused) ' if fs.reused else ''}{f'{skipped} skipped ' if skipped else ''}at {fs.directory}")


@click.command("probe")
@_upstream_options
@click.option("--out", "out_file", type=click.Path(path_type=Path), help="Also write the full result (every probe) to this JSON file.")
@usage_errors
def probe_cmd(checkpoints, hf_models, baselines, preset, tasks, task_sets, overrides, cache_dir, device, seed, quiet, out_file):
    """Run the MARBLE probe: MLP(512) per layer and lr, selected on validation.

    \b
    Example:
      mert probe --checkpoint runs/mert --task demo-key --set max_epochs=20
    """
    from mert_core import api
    from mert_core.evaluation.report import format_layer_table

    setup_eval_logging(quiet)
    ups, task_objs, po, xo = _prepare(checkpoints, hf_models, baselines, preset, tasks, task_sets, overrides, device, seed)
    results = []
    for task in task_objs:
        for up in ups:
            r = api.probe_task(up, task, po, xo, cache_dir, progress=not quiet)
            results.append(r)
            click.echo("\n" + format_layer_table(r))
    if out_file is not None:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps([r.to_dict() for r in results], indent=1, default=str))


@click.command("eval")
@_upstream_options
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("mert-eval"), show_default=True,
              help="Folder for results.json, results.csv, layers_<task>.png and comparison.png.")
@usage_errors
def eval_cmd(checkpoints, hf_models, baselines, preset, tasks, task_sets, overrides, cache_dir, device, seed, quiet, out_dir):
    """Probe several upstreams on several tasks; table, JSON, CSV and plots.

    \b
    Example:
      mert eval --checkpoint runs/mert --baseline random --baseline handcrafted \\
                --task demo-key --task demo-pitch --task demo-timbre --task demo-beat
    """
    from mert_core import api

    setup_eval_logging(quiet)
    ups, task_objs, po, xo = _prepare(checkpoints, hf_models, baselines, preset, tasks, task_sets, overrides, device, seed)
    report = api.evaluate(ups, task_objs, out_dir, po, xo, cache_dir=cache_dir, progress=not quiet)
    click.echo(report.table)
    click.echo(f"\nwrote {', '.join(p.name for p in report.files)} to {out_dir}")
