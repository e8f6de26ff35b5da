"""``mert extract``, ``mert probe`` and ``mert eval``: thin layers over
:mod:`mert_core.evaluation.api`.

Bad input (unknown task or option, missing dataset folder, unreadable
checkpoint) is a one-line usage error with exit code 2.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from mert_core.tasks import SPLITS


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _pairs(items, flag: str) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        if "=" not in item:
            raise click.UsageError(f"{flag} {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        out.append((key.strip(), _parse_value(value)))
    return out


def _split_options(overrides) -> tuple[dict, dict]:
    """Route ``--set key=value`` to the probe's or the extractor's options."""
    from mert_core.evaluation.extract import ExtractOptions
    from mert_core.evaluation.probe import ProbeOptions

    probe, extract = {}, {}
    for key, value in _pairs(overrides, "--set"):
        if key in ProbeOptions.model_fields:
            probe[key] = value
        elif key in ExtractOptions.model_fields:
            extract[key] = value
        else:
            known = ", ".join([*ProbeOptions.model_fields, *ExtractOptions.model_fields])
            raise click.UsageError(f"--set {key}=...: unknown option; probe and extraction options are: {known}")
    return probe, extract


def _task_options(task_sets, tasks) -> dict[str, dict]:
    """``--task-set TASK.KEY=VALUE`` (or ``KEY=VALUE`` when one task is given)."""
    out: dict[str, dict] = {t: {} for t in tasks}
    for key, value in _pairs(task_sets, "--task-set"):
        name, _, field = key.rpartition(".")
        if not name:
            if len(tasks) != 1:
                raise click.UsageError(f"--task-set {key}=...: with several tasks write TASK.{key}=VALUE")
            name = tasks[0]
        if name not in out:
            raise click.UsageError(f"--task-set {key}=...: task {name!r} is not among --task {', '.join(tasks)}")
        out[name][field] = value
    return out


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record
    (click's test runner, and some notebooks, swap it between calls)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("mert.evaluation")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    # propagation stays on: a process that also configures the root logger (or
    # pytest's caplog) still sees these records


def _usage_errors(fn):
    """Turn input errors into one-line errors with exit code 2 (see :mod:`mert_cli.errors`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from mert_cli.errors import InputError, one_line

        try:
            return fn(*args, **kwargs)
        except InputError:
            raise
        except click.UsageError as exc:
            raise InputError(exc.format_message()) from None
        except (click.ClickException, click.exceptions.Abort, click.exceptions.Exit):
            raise
        except Exception as exc:  # noqa: BLE001 - known errors become one line
            if os.environ.get("MERT_DEBUG"):
                raise (exc.__cause__ or exc) if isinstance(exc, _InputError) else exc
            if isinstance(exc, _InputError):
                raise InputError(str(exc)) from None
            error = one_line(exc)
            if error is None:
                raise
            raise error from None

    return wrapper


class _InputError(ValueError):
    pass


def _prepare(checkpoints, hf_models, baselines, preset, tasks, task_sets, overrides, device, seed):
    """Validate everything up front (options, task data, checkpoints) before any long work."""
    from mert_core.evaluation import api
    from mert_core.paths import resolve_device

    probe_opts, extract_opts = _split_options(overrides)
    probe_opts.setdefault("seed", seed)
    probe_opts.setdefault("device", resolve_device(device))
    from mert_core.evaluation.extract import ExtractOptions
    from mert_core.evaluation.probe import ProbeOptions

    po, xo = ProbeOptions(**probe_opts), ExtractOptions(**extract_opts)
    task_opts = _task_options(task_sets, list(tasks))
    task_objs = [api.build_task(t, task_opts[t]) for t in tasks]
    for t in task_objs:  # read the split lists now: a wrong folder fails in a second, not after extraction
        for s in SPLITS:
            t.examples(s)
    try:
        ups = api.build_upstreams(checkpoints, baselines, hf_models, preset=preset, device=device, seed=seed, extract_options=xo)
    except ValueError as exc:
        raise _InputError(str(exc)) from exc
    return ups, task_objs, po, xo


def _upstream_options(fn):
    opts = [
        click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(path_type=Path), metavar="PATH",
                     help="mert run folder, .pt checkpoint or student.safetensors (repeatable)."),
        click.option("--hf-model", "hf_models", multiple=True, type=click.Path(path_type=Path), metavar="FOLDER",
                     help="Hugging Face HubertModel folder, e.g. a local MERT-v1-95M (repeatable)."),
        click.option("--baseline", "baselines", multiple=True, type=click.Choice(["random", "handcrafted"]),
                     help="random: seeded random student of the first model's size (or --preset); handcrafted: MFCC/chroma/CQT (repeatable)."),
        click.option("--preset", type=click.Choice(["tiny", "95m", "330m"]), help="Size of the random baseline when no model is given."),
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
@_usage_errors
def extract_cmd(checkpoints, hf_models, baselines, preset, tasks, task_sets, overrides, cache_dir, device, seed, quiet, splits):
    """Extract features of every layer into the feature cache.

    Clip-level tasks store time-averaged features (long audio averaged over
    30 s windows), frame-level tasks every frame. A later probe or eval with
    the same upstream, task and settings reuses them.

    \b
    Example:
      mert extract --checkpoint runs/mert --task demo-key --task demo-beat
    """
    from mert_core.evaluation import api

    _setup_logging(quiet)
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
@_usage_errors
def probe_cmd(checkpoints, hf_models, baselines, preset, tasks, task_sets, overrides, cache_dir, device, seed, quiet, out_file):
    """Run the MARBLE probe: MLP(512) per layer and lr, selected on validation.

    \b
    Example:
      mert probe --checkpoint runs/mert --task demo-key --set max_epochs=20
    """
    from mert_core.evaluation import api

    _setup_logging(quiet)
    ups, task_objs, po, xo = _prepare(checkpoints, hf_models, baselines, preset, tasks, task_sets, overrides, device, seed)
    results = []
    for task in task_objs:
        for up in ups:
            r = api.probe_task(up, task, po, xo, cache_dir, progress=not quiet)
            results.append(r)
            click.echo(f"\n{up.name} on {task.name} ({r.metric}):")
            click.echo(f"  {'layer':<14}{'lr':>9}  {'valid':>8}  {'test':>8}")
            for m in r.per_layer:
                mark = "  <- selected" if m is r.best else ""
                click.echo(f"  {m['layer']:<14}{m['lr']:>9.0e}  {m['valid'][r.metric]:>8.4f}  {m['test'][r.metric]:>8.4f}{mark}")
    if out_file is not None:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps([r.to_dict() for r in results], indent=1, default=str))


@click.command("eval")
@_upstream_options
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("mert-eval"), show_default=True,
              help="Folder for results.json, results.csv, layers_<task>.png and comparison.png.")
@_usage_errors
def eval_cmd(checkpoints, hf_models, baselines, preset, tasks, task_sets, overrides, cache_dir, device, seed, quiet, out_dir):
    """Probe several upstreams on several tasks; table, JSON, CSV and plots.

    \b
    Example:
      mert eval --checkpoint runs/mert --baseline random --baseline handcrafted \\
                --task demo-key --task demo-pitch --task demo-timbre --task demo-beat
    """
    from mert_core.evaluation import api

    _setup_logging(quiet)
    ups, task_objs, po, xo = _prepare(checkpoints, hf_models, baselines, preset, tasks, task_sets, overrides, device, seed)
    report = api.evaluate(ups, task_objs, out_dir, po, xo, cache_dir=cache_dir, progress=not quiet)
    click.echo(report.table)
    click.echo(f"\nwrote {', '.join(p.name for p in report.files)} to {out_dir}")
