"""The evaluation API: what ``mert extract``, ``mert probe`` and ``mert eval`` do.

    from mert_core.evaluation import api
    ups = api.build_upstreams(checkpoints=["runs/mert"], baselines=["random", "handcrafted"])
    report = api.evaluate(ups, ["demo-key", "demo-pitch"], out_dir="eval-out",
                          probe_options={"max_epochs": 20})
    print(report.table)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from mert_core.errors import BadInputError
from mert_core.evaluation.extract import ExtractOptions, FeatureSet, extract
from mert_core.evaluation.probe import ProbeOptions, ProbeResult, probe
from mert_core.evaluation.report import format_table, plot_comparison, plot_layers, result_rows, write_results
from mert_core.evaluation.upstreams import (HandcraftedUpstream, StudentUpstream, Upstream, checkpoint_upstream,
                                            hf_upstream, random_upstream)
from mert_core.paths import resolve_device
from mert_core.registry import Registry, default_registry
from mert_core.tasks import SPLITS, Task

log = logging.getLogger("mert.evaluation")
BASELINES = ("random", "handcrafted")


def _options(model, value):
    if value is None:
        return model()
    if isinstance(value, model):
        return value
    return model(**value)


def build_task(task: str | Task, options: dict[str, Any] | None = None, registry: Registry | None = None) -> Task:
    """A task by registered name (options validated by its ``Options``), or a Task as is.

    A folder option (``*_dir``) may name shards packed with ``mert data pack --all-files``
    (an index.json, a URL, a brace pattern): the dataset is fetched once into the cache
    (:func:`mert_core.shards.fetched_tree`) and the task reads that folder.
    """
    if isinstance(task, Task):
        return task
    from mert_core.shards import fetched_tree, is_shard_source

    options = {k: str(fetched_tree(v)) if k.endswith("_dir") and isinstance(v, str) and is_shard_source(v) else v
               for k, v in (options or {}).items()}
    return (registry or default_registry()).build("task", task, options)


def build_upstreams(checkpoints: Iterable[str | Path] = (), baselines: Iterable[str] = (), hf_models: Iterable[str | Path] = (),
                    preset: str | None = None, device: str = "cpu", seed: int = 0, extract_options: ExtractOptions | dict | None = None) -> list[Upstream]:
    """The upstreams to compare, in table order: checkpoints, HF models, baselines.

    Args:
        checkpoints: mert run folders, ``.pt`` checkpoints or ``student.safetensors``.
        baselines: ``"random"`` (a seeded random student the size of the first
            checkpoint or HF model, else of ``preset``) and/or ``"handcrafted"``.
        hf_models: Hugging Face ``HubertModel`` folders (e.g. MERT-v1-95M).
        preset: size of the random student when there is no model to copy.
        device: where students run.
        seed: seed of the random student.

    Raises:
        ValueError: unknown baseline, or a random baseline with nothing to size it.
    """
    xo = _options(ExtractOptions, extract_options)
    kw = {"window_seconds": xo.window_seconds, "batch_windows": xo.batch_windows}
    device = resolve_device(device)
    ups: list[Upstream] = [checkpoint_upstream(c, device=device, **kw) for c in checkpoints]
    ups += [hf_upstream(h, device=device, **kw) for h in hf_models]
    for b in baselines:
        if b not in BASELINES:
            raise BadInputError(f"--baseline {b!r}: expected one of {', '.join(BASELINES)}")
        if b == "random":
            students = [u for u in ups if isinstance(u, StudentUpstream)]
            if preset is not None:
                like = preset
            elif students:
                like = students[0].student
            else:
                raise BadInputError("--baseline random: no checkpoint or HF model to copy the size from; add --preset tiny|cpu|95m|330m")
            ups.append(random_upstream(like, seed=seed, device=device, **kw))
        else:
            ups.append(HandcraftedUpstream())
    if not ups:
        raise BadInputError("no upstream to evaluate: give --checkpoint, --hf-model or --baseline")
    names = [u.name for u in ups]
    for i, u in enumerate(ups):  # two checkpoints called "last" get distinct names
        if names.count(u.name) > 1:
            u.name = f"{u.name}#{names[:i + 1].count(u.name)}"
    return ups


def extract_task(upstream: Upstream, task: Task, splits: Sequence[str] = SPLITS, options: ExtractOptions | dict | None = None,
                 cache_dir: str | Path | None = None, progress: bool = True) -> dict[str, FeatureSet]:
    """Extract (or reuse) the features of ``splits``; returns ``{split: FeatureSet}``."""
    xo = _options(ExtractOptions, options)
    return {s: extract(upstream, task, s, xo, cache_dir=cache_dir, progress=progress) for s in splits}


def probe_task(upstream: Upstream, task: Task, probe_options: ProbeOptions | dict | None = None,
               extract_options: ExtractOptions | dict | None = None, cache_dir: str | Path | None = None, progress: bool = True) -> ProbeResult:
    """Extract (or reuse) features of all splits and run the MARBLE probe search."""
    feats = extract_task(upstream, task, SPLITS, extract_options, cache_dir, progress)
    po = _options(ProbeOptions, probe_options)
    return probe(task, feats["train"], feats["valid"], feats["test"], po, progress=progress, upstream_name=upstream.name, upstream_id=upstream.id)


@dataclass
class EvalReport:
    """What :func:`evaluate` produced."""

    results: list[ProbeResult]
    rows: list[dict[str, Any]]
    table: str
    out_dir: Path | None
    files: list[Path] = field(default_factory=list)


def evaluate(upstreams: Sequence[Upstream], tasks: Sequence[str | Task], out_dir: str | Path | None = None,
             probe_options: ProbeOptions | dict | None = None, extract_options: ExtractOptions | dict | None = None,
             task_options: dict[str, dict[str, Any]] | None = None, cache_dir: str | Path | None = None,
             progress: bool = True, registry: Registry | None = None) -> EvalReport:
    """Probe every upstream on every task and write the table and plots.

    Features are extracted once per (upstream, task, split) and reused from
    the cache by later calls.

    Args:
        upstreams: from :func:`build_upstreams`.
        tasks: task names or Task objects.
        out_dir: where ``results.json``, ``results.csv``, ``layers_<task>.png``
            and ``comparison.png`` go; None writes nothing.
        probe_options, extract_options: options (objects or dicts).
        task_options: ``{task name: options dict}`` for tasks given by name.
    """
    started = time.time()
    po = _options(ProbeOptions, probe_options)
    xo = _options(ExtractOptions, extract_options)
    task_objs = [build_task(t, (task_options or {}).get(t if isinstance(t, str) else t.name), registry) for t in tasks]
    results = []
    for task in task_objs:
        for up in upstreams:
            results.append(probe_task(up, task, po, xo, cache_dir, progress))
    rows = result_rows(results)
    table = format_table(rows)
    files: list[Path] = []
    if out_dir is not None:
        out = Path(out_dir)
        extra = {"upstreams": [u.describe() for u in upstreams], "tasks": [t.describe() for t in task_objs],
                 "probe_options": po.model_dump(), "extract_options": xo.model_dump(), "seconds": round(time.time() - started, 2)}
        files += write_results(out, results, extra)
        files += plot_layers(out, results)
        files.append(plot_comparison(out, results))
        (out / "results.txt").write_text(table + "\n")
        files.append(out / "results.txt")
    return EvalReport(results, rows, table, Path(out_dir) if out_dir is not None else None, files)
