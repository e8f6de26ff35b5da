"""What every command shares: ``KEY=VALUE`` options (one parser, the same as
``mert train --set``: values are YAML scalars, ``off`` stays a string), routing
``--set`` to probe or extraction options, ``--task-set``, and log lines."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Iterable

import click

from mert_core.runconfig import parse_assignment


class DataSource(click.ParamType):
    """A ``--data`` value: an existing local path, or shards given as a URL (``https://``,
    ``s3://``, ...) or a brace pattern, kept as written (a ``Path`` would fold ``//``)."""

    name = "PATH_OR_URL"

    def __init__(self, exists: bool = False):
        self.exists = exists

    def convert(self, value, param, ctx):
        from mert_core.shards import is_remote_or_pattern

        value = str(value)
        if self.exists and not is_remote_or_pattern(value) and not Path(value).exists():
            self.fail(f"{value!r} does not exist; give an audio folder, file, .tsv/.csv manifest, or shards "
                      f"(an index.json, a brace pattern, a URL)", param, ctx)
        return value


def parse_pairs(items: Iterable[str], flag: str, example: str) -> list[tuple[str, Any]]:
    """``("n_clusters=2000",)`` -> ``[("n_clusters", 2000)]``; a bad item is a
    usage error naming ``flag`` and showing ``example``."""
    return [parse_assignment(item, flag, example) for item in items]


def parse_sets(assignments: Iterable[str]) -> dict:
    """Plugin options: ``("n_clusters=2000", "n_mfcc=20")`` -> ``{"n_clusters": 2000, "n_mfcc": 20}``."""
    return dict(parse_pairs(assignments, "--set", "--set n_clusters=2000"))


def split_eval_options(overrides: Iterable[str]) -> tuple[dict, dict]:
    """Route ``--set key=value`` to the probe's or the extractor's options."""
    from mert_core.evaluation.extract import ExtractOptions
    from mert_core.evaluation.probe import ProbeOptions

    probe, extract = {}, {}
    for key, value in parse_pairs(overrides, "--set", "--set max_epochs=20"):
        if key in ProbeOptions.model_fields:
            probe[key] = value
        elif key in ExtractOptions.model_fields:
            extract[key] = value
        else:
            known = ", ".join([*ProbeOptions.model_fields, *ExtractOptions.model_fields])
            raise click.UsageError(f"--set {key}=...: unknown option; probe and extraction options are: {known}")
    return probe, extract


def task_options(task_sets: Iterable[str], tasks: list[str]) -> dict[str, dict]:
    """``--task-set TASK.KEY=VALUE`` (or ``KEY=VALUE`` when one task is given)."""
    out: dict[str, dict] = {t: {} for t in tasks}
    for key, value in parse_pairs(task_sets, "--task-set", "--task-set gtzan-genre.data_dir=/data/GTZAN"):
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


def setup_eval_logging(quiet: bool) -> None:
    """Show the evaluation's log lines (``mert.evaluation``) on stderr unless ``quiet``."""
    logger = logging.getLogger("mert.evaluation")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    # propagation stays on: a process that also configures the root logger (or
    # pytest's caplog) still sees these records


def setup_logging(quiet: bool) -> None:
    """Show info messages (the sample and fit summaries) unless ``quiet`` or
    the caller configured logging already."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
