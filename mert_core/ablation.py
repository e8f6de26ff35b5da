"""The paper's teacher ablation in one call: pretrain arms x seeds on the same
data with the same budget, probe each beside random and handcrafted baselines,
and tabulate mean +- std over seeds.

    from mert_core.ablation import ablate, parse_arm
    report = ablate([parse_arm("cqt=cqt"), parse_arm("mfcc=kmeans-mfcc")], data=["/music"],
                    out_dir="ablation", seeds=3, max_steps=600, tasks=["demo-key", "demo-pitch"])
    print(report.table)

Everything is reused when run again: a finished pretraining (its
``summary.json`` records ``max_steps`` steps), an unfinished one (resumed from
its ``last.pt``), a fitted k-means teacher (one per teacher and options,
shared by every arm that uses it) and every feature set (the evaluation
cache). So a killed ablation resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from mert_core.geometry import FrameGeometry
from mert_core.paths import resolve_device
from mert_core.registry import Registry
from mert_core.runconfig import ConfigError, make_train_config

BASELINE_NAMES = ("random", "handcrafted")


@dataclass(frozen=True)
class Arm:
    """One arm of an ablation: a set of teachers (on the base recipe) or a recipe.

    Attributes:
        name: the arm's label in tables and run folders.
        teachers: teacher names, replacing the base recipe's teachers.
        recipe: a recipe used instead of the base recipe (its own teachers).
        overrides: ``--set`` style overrides of this arm only.
    """

    name: str
    teachers: tuple[str, ...] = ()
    recipe: str | None = None
    overrides: tuple[str, ...] = ()


def parse_arm(text: str) -> Arm:
    """``NAME=T1+T2`` (teachers on the base recipe) or ``NAME=recipe:R``, optionally
    followed by ``;KEY=VALUE`` overrides of this arm, e.g.
    ``mfcc100=kmeans-mfcc;teacher.kmeans-mfcc.n_clusters=100``.

    Raises:
        ConfigError: the text is not of that form.
    """
    name, sep, rest = text.partition("=")
    spec, *overrides = [part.strip() for part in rest.split(";")]
    name = name.strip()
    if not sep or not name or not spec or "/" in name or "@" in name or any("=" not in o for o in overrides):
        raise ConfigError(f"--arm {text!r}: expected NAME=TEACHER[+TEACHER...] or NAME=recipe:RECIPE, then optional ;KEY=VALUE "
                          f"overrides, e.g. 'lmc+cqt=kmeans-logmel-chroma+cqt' (no '/' or '@' in NAME)")
    if spec.startswith("recipe:"):
        return Arm(name, recipe=spec.removeprefix("recipe:").strip(), overrides=tuple(overrides))
    teachers = tuple(t.strip() for t in spec.split("+") if t.strip())
    return Arm(name, teachers=teachers, overrides=tuple(overrides))


def default_arms(encodec_available: bool) -> list[Arm]:
    """The paper's teacher ablation (MFCC k-means, log-mel + chroma k-means, CQT,
    both, RVQ-VAE + CQT when EnCodec weights are present)."""
    arms = [
        Arm("mfcc", ("kmeans-mfcc",)),
        Arm("logmel-chroma", ("kmeans-logmel-chroma",)),
        Arm("cqt", ("cqt",)),
        Arm("logmel-chroma+cqt", ("kmeans-logmel-chroma", "cqt")),
    ]
    if encodec_available:
        arms.append(Arm("rvq-vae+cqt", ("rvq-vae", "cqt")))
    return arms


def encodec_weights_available(registry: Registry | None = None) -> bool:
    """True when the ``rvq-vae`` teacher is installed and builds without options (it finds the
    EnCodec weights); asked of the teacher through the registry, like any plugin."""
    from mert_core.errors import MertError
    from mert_core.registry import default_registry

    registry = registry or default_registry()
    if "rvq-vae" not in registry.names("teacher"):
        return False
    try:
        registry.build("teacher", "rvq-vae", {})
    except MertError:  # the weights are missing or unreadable: the message says where to put them
        return False
    return True


@dataclass
class AblationReport:
    """What :func:`ablate` produced.

    Attributes:
        rows: one per arm/baseline and task: ``mean``, ``std``, ``scores`` (per seed).
        table: the plain-text table (arms x tasks, mean +- std).
        runs: arm name -> run folders (one per seed).
        out_dir: where everything was written.
    """

    rows: list[dict[str, Any]]
    table: str
    runs: dict[str, list[Path]]
    out_dir: Path
    files: list[Path] = field(default_factory=list)


def ablate(
    arms: Sequence[Arm],
    data: Sequence[str | Path],
    out_dir: str | Path,
    tasks: Sequence[str],
    seeds: int = 3,
    max_steps: int = 600,
    base_recipe: str | None = "cpu",
    preset: str | None = None,
    train_overrides: Sequence[str] = (),
    task_options: dict[str, dict[str, Any]] | None = None,
    probe_options: dict[str, Any] | None = None,
    extract_options: dict[str, Any] | None = None,
    baselines: Sequence[str] = BASELINE_NAMES,
    cache_dir: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
    log: Callable[[str], None] = print,
    registry: Registry | None = None,
) -> AblationReport:
    """Pretrain every arm with every seed, probe them all, tabulate.

    Args:
        arms: the arms (:func:`parse_arm`, :func:`default_arms`).
        data: training audio (folders, files, manifests).
        out_dir: holds ``runs/<arm>-s<seed>/``, ``teachers/``, ``eval/`` and the
            table (``ablation.txt``, ``.csv``, ``.json``) and plot (``ablation.png``).
        tasks: downstream task names (``mert list-plugins --kind task``).
        seeds: pretraining seeds 0..seeds-1 per arm (also the random baselines' seeds).
        max_steps: the same training budget for every arm.
        base_recipe: recipe the teacher arms start from (default ``cpu``).
        preset: student size of every arm (default: the base recipe's, also for ``recipe:`` arms).
        train_overrides: ``--set`` style overrides applied to every arm.
        task_options: ``{task: options}``, e.g. data folders of dataset tasks.
        probe_options, extract_options: as for ``mert eval``.
        baselines: any of ``random`` (one random student per seed) and ``handcrafted``.
        device: training and extraction device.
    """
    from mert_core import trainer
    from mert_core.evaluation import api as eval_api
    from mert_core.evaluation.upstreams import HandcraftedUpstream, checkpoint_upstream, random_upstream
    from mert_core.registry import default_registry

    registry = registry or default_registry()
    out = Path(out_dir)
    if not arms:
        raise ConfigError("ablation: no arms; give --arm NAME=TEACHERS at least once")
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ConfigError(f"ablation: arm names must be unique, got {names}")
    if seeds < 1:
        raise ConfigError(f"ablation: --seeds must be at least 1, got {seeds}")
    for b in baselines:
        if b not in BASELINE_NAMES:
            raise ConfigError(f"ablation: baseline {b!r}: expected one of {', '.join(BASELINE_NAMES)}")
    # one student size for every arm: a recipe arm would otherwise take its recipe's default (95m for the
    # paper recipes) beside teacher arms on the base recipe's (tiny for `cpu`), an unequal comparison
    preset = preset or registry.get("recipe", base_recipe).obj.default_preset
    configs = {(arm.name, seed): _arm_config(arm, seed, data, out, max_steps, base_recipe, preset, train_overrides, device, registry)
               for arm in arms for seed in range(seeds)}
    tasks_objs = [eval_api.build_task(t, (task_options or {}).get(t), registry) for t in tasks]  # bad task options fail now, not after training

    # teachers that need fitting: fitted once per (teacher, options), shared by every arm and seed
    share_fitted_teachers(configs.values(), out / "teachers", data, registry, device, progress, log)

    runs: dict[str, list[Path]] = {}
    for (arm_name, seed), config in configs.items():
        run_dir = Path(config.out_dir)
        runs.setdefault(arm_name, []).append(run_dir)
        if _finished(run_dir, max_steps):
            log(f"ablation: {arm_name} seed {seed}: reusing the finished run in {run_dir}")
            continue
        log(f"ablation: {arm_name} seed {seed}: pretraining {max_steps} steps -> {run_dir}")
        trainer.train(config, registry=registry, resume=True, progress=progress, log=log)

    upstreams = []
    for arm_name, dirs in runs.items():
        upstreams += [checkpoint_upstream(d, device=resolve_device(device), name=f"{arm_name}@s{s}") for s, d in enumerate(dirs)]
    like = upstreams[0].student
    if "random" in baselines:
        upstreams += [random_upstream(like, seed=s, device=resolve_device(device), name=f"random@s{s}") for s in range(seeds)]
    if "handcrafted" in baselines:
        upstreams.append(HandcraftedUpstream())
    results = []
    for task in tasks_objs:
        for up in upstreams:
            seed = int(up.name.rsplit("@s", 1)[1]) if "@s" in up.name else 0
            po = {**(probe_options or {}), "seed": seed}  # each seed's probe has its own seed too
            results.append(eval_api.probe_task(up, task, po, extract_options, cache_dir, progress))
    rows = summarise(results)
    table = format_ablation(rows, [t.name for t in tasks_objs])
    files = _write(out, rows, table, results)
    log(table)
    return AblationReport(rows, table, runs, out, files)


def _arm_config(arm: Arm, seed: int, data, out: Path, max_steps: int, base_recipe, preset, overrides, device, registry):
    try:
        # a shared ``teacher.NAME.*`` override applies to the arms that have teacher NAME
        names = {t.name for t in make_train_config(recipe=arm.recipe or base_recipe, preset=preset, teachers=arm.teachers, registry=registry).teachers}
        overrides = [o for o in overrides if not o.startswith("teacher.") or o.split(".")[1].split("=")[0] in names]
        return make_train_config(
            recipe=arm.recipe or base_recipe, preset=preset, teachers=arm.teachers, data=data,
            out_dir=out / "runs" / f"{arm.name}-s{seed}", max_steps=max_steps,
            overrides=[*overrides, *arm.overrides, f"seed={seed}", f"device={device}"], registry=registry,
        )
    except ConfigError as exc:
        raise ConfigError(f"arm {arm.name!r}: {exc}") from None


def share_fitted_teachers(configs, teacher_dir: Path, data, registry, device, progress, log) -> None:
    """Fit each k-means-like teacher once and point every config at the file."""
    from mert_core.fitting import fit_teacher, with_teacher_file

    for config in configs:
        for tc in config.teachers:
            teacher = registry.build("teacher", tc.name, tc.options, geometry=FrameGeometry(sample_rate=config.data.sample_rate))
            if not teacher.needs_fit() or tc.label_store is not None:
                continue
            key = hashlib.sha256(json.dumps([tc.name, tc.options, [str(p) for p in data]], sort_keys=True, default=str).encode()).hexdigest()[:12]
            path = teacher_dir / f"{tc.name}-{key}.safetensors"
            if not path.exists():
                log(f"ablation: fitting teacher {tc.name!r} once for every arm that uses it -> {path}")
                path.parent.mkdir(parents=True, exist_ok=True)
                fit_teacher(tc.name, data, path, options=tc.options, registry=registry, device=device, progress=progress)
            tc.options = with_teacher_file(tc.options, path)


def _finished(run_dir: Path, max_steps: int) -> bool:
    summary = run_dir / "summary.json"
    if not summary.exists():
        return False
    try:
        return int(json.loads(summary.read_text()).get("steps", -1)) >= max_steps
    except (ValueError, OSError):
        return False


def summarise(results) -> list[dict[str, Any]]:
    """Group probe results by arm (the upstream name before ``@s``) and task:
    mean and sample std of the test score over seeds."""
    groups: dict[tuple[str, str], list[float]] = {}
    metric: dict[str, str] = {}
    order: list[str] = []
    for r in results:
        arm = r.upstream.rsplit("@s", 1)[0]
        arm = "handcrafted" if r.upstream.startswith("handcrafted") else arm
        if arm not in order:
            order.append(arm)
        groups.setdefault((arm, r.task), []).append(r.test_score)
        metric[r.task] = r.metric
    rows = []
    for (arm, task), scores in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        mean = sum(scores) / len(scores)
        std = math.sqrt(sum((s - mean) ** 2 for s in scores) / (len(scores) - 1)) if len(scores) > 1 else 0.0
        rows.append({"arm": arm, "task": task, "metric": metric[task], "mean": mean, "std": std, "scores": scores})
    return rows


def format_ablation(rows: Sequence[dict[str, Any]], tasks: Sequence[str]) -> str:
    """Arms x tasks, ``mean +- std (n)`` per cell."""
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    cell = {(r["arm"], r["task"]): f"{r['mean']:.3f} +- {r['std']:.3f} ({len(r['scores'])})" for r in rows}
    metric = {r["task"]: r["metric"] for r in rows}
    header = ["arm"] + [f"{t} ({metric.get(t, '')})" for t in tasks]
    body = [[a] + [cell.get((a, t), "-") for t in tasks] for a in arms]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in body]
    return "\n".join(lines)


def _write(out: Path, rows, table: str, results) -> list[Path]:
    import csv

    out.mkdir(parents=True, exist_ok=True)
    files = [out / "ablation.txt", out / "ablation.json", out / "ablation.csv"]
    files[0].write_text(table + "\n")
    files[1].write_text(json.dumps({"rows": rows, "probes": [r.to_dict() for r in results]}, indent=2, default=str))
    with open(files[2], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["arm", "task", "metric", "mean", "std", "scores"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "scores": " ".join(f"{s:.4f}" for s in r["scores"])})
    files.append(plot_ablation(out / "ablation.png", rows))
    return files


def plot_ablation(out_png: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """One panel per task: a bar per arm with its seed spread as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks) + 1, 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        sub = [r for r in rows if r["task"] == task]
        xs = range(len(sub))
        colors = ["#999999" if r["arm"] in BASELINE_NAMES else "#3b75af" for r in sub]
        ax.bar(xs, [r["mean"] for r in sub], yerr=[r["std"] for r in sub], color=colors, capsize=3)
        ax.set_xticks(list(xs), [r["arm"] for r in sub], rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{task} ({sub[0]['metric']})", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
