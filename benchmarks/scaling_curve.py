"""The CPU scaling curve: probe scores against training budget, per student and teachers, each
against its random twin (docs/scaling.md).

A *curve* is a recipe on a preset trained to a list of budgets in CPU-minutes, e.g.
``paper-small=cpu@small:10,30,120`` (``;seeds=1`` after it: fewer seeds than ``--seeds`` for this
curve, ``;KEY=VALUE``: a config override). Budgets are checkpoints of one run per seed: the run
follows one learning-rate schedule that ends (lr 0) at the curve's largest budget
(``optim.decay_steps``), and stops at each budget to save the student, so the 10-minute point
of a 120-minute curve is its student after 10 CPU-minutes of that schedule. Seed 0 runs to
every budget; the other seeds to the first ``--seeds-to`` budgets (default: the first).

A CPU-minute is measured, not assumed: before training, each curve's step is timed with one
thread (the difference of a 10-step and a longer run of ``mert train``, so start-up cancels),
and a budget becomes ``budget * 60 / cpu_seconds_per_step`` steps. One-thread CPU time is the
work of a step; it does not change when other jobs share the machine, wall time does. Training
then runs with the machine's threads (on 2 cores about 0.6 wall-minutes per CPU-minute).

Every student and the random student of the same preset and seed (its twin: the same
initial weights) are probed with the MARBLE protocol, beside the handcrafted baseline.
Writes ``scaling.json``, ``scaling.txt`` (mean +- std over seeds per curve, budget and task)
and ``scaling.png`` (score against CPU-minutes and against audio-hours seen, one panel per task).
Run it again to reuse every calibration, run, student and feature set.

    python benchmarks/scaling_curve.py --data /music --out scaling \\
        --curve paper-tiny=cpu@tiny:10,30 --curve paper-small=cpu@small:10,30,120 \\
        --curve cpu-tiny=cpu@cpu:10,30 --seeds 3 \\
        --task nsynth-pitch --task-set nsynth-pitch.data_dir=/data/nsynth --set "lrs=[0.001,0.005]"
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CALIBRATION_STEPS = (10, 40)
"""Steps of the two timing runs: their difference is the step's cost, start-up cancels."""


@dataclass
class Curve:
    name: str
    recipe: str
    preset: str
    budgets: list[float]
    overrides: list[str] = field(default_factory=list)
    seeds: int | None = None  # None: --seeds


def parse_curve(text: str) -> Curve:
    """``NAME=RECIPE@PRESET:B1,B2,...[;KEY=VALUE...]`` (budgets in CPU-minutes)."""
    try:
        head, *overrides = text.split(";")
        name, rest = head.split("=", 1)
        recipe, rest = rest.split("@", 1)
        preset, budgets = rest.split(":", 1)
        values = sorted(float(b) for b in budgets.split(","))
    except ValueError:
        raise SystemExit(f"--curve {text!r}: expected NAME=RECIPE@PRESET:B1,B2,... e.g. paper-small=cpu@small:10,30,120") from None
    if not values or values[0] <= 0:
        raise SystemExit(f"--curve {text!r}: budgets must be positive CPU-minutes")
    seeds = [o for o in overrides if o.strip().startswith("seeds=")]
    overrides = [o for o in overrides if o and o not in seeds]
    return Curve(name.strip(), recipe.strip(), preset.strip(), values, overrides,
                 int(seeds[-1].split("=", 1)[1]) if seeds else None)


def _cpu_seconds_of_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def calibrate(config, work: Path) -> float:
    """One-thread CPU seconds per training step of ``config`` (two timed ``mert train`` runs)."""
    cpu = []
    for steps in CALIBRATION_STEPS:
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            cfg = config.model_copy(deep=True)
            cfg.out_dir = Path(tmp) / "run"
            cfg.optim.max_steps = steps
            cfg_file = Path(tmp) / "config.json"
            cfg_file.write_text(cfg.model_dump_json())
            before = _cpu_seconds_of_children()
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            subprocess.run([sys.executable, "-m", "mert_cli.main", "train", "--config", str(cfg_file), "--quiet"],
                           check=True, env=env, stdout=subprocess.DEVNULL)
            cpu.append(_cpu_seconds_of_children() - before)
    return max(1e-3, (cpu[1] - cpu[0]) / (CALIBRATION_STEPS[1] - CALIBRATION_STEPS[0]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", required=True, help="Training audio (repeatable).")
    ap.add_argument("--out", type=Path, default=Path("scaling"))
    ap.add_argument("--curve", action="append", required=True, help="NAME=RECIPE@PRESET:B1,B2,...[;KEY=VALUE...] (repeatable).")
    ap.add_argument("--seeds", type=int, default=3, help="Seeds per curve (and random twins per preset).")
    ap.add_argument("--seeds-to", type=int, default=1, help="Budgets (from the smallest) that every seed reaches; seed 0 reaches all.")
    ap.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE", help="Config override for every run.")
    ap.add_argument("--task", action="append", required=True)
    ap.add_argument("--task-set", action="append", default=[], metavar="[TASK.]KEY=VALUE")
    ap.add_argument("--set", dest="probe_set", action="append", default=[], metavar="KEY=VALUE", help="Probe/extraction option.")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-probe", action="store_true", help="Train (and calibrate) only.")
    ap.add_argument("--jobs", type=int, default=1, help="Training runs at once (each with one thread when more than 1).")
    ap.add_argument("--probe-jobs", type=int, default=1, help="Probing processes at once (each with one thread when more than 1).")
    ap.add_argument("--probe-part", default=None, help=argparse.SUPPRESS)  # "K/N": a probing process's share of the pairs
    args = ap.parse_args(argv)

    from mert_core.ablation import share_fitted_teachers
    from mert_core.evaluation import api as eval_api
    from mert_core.evaluation.probe import ProbeResult
    from mert_core.evaluation.upstreams import HandcraftedUpstream, checkpoint_upstream, random_upstream
    from mert_core.registry import default_registry
    from mert_core.runconfig import make_train_config
    from mert_cli.options import split_eval_options, task_options as parse_task_options

    registry = default_registry()
    out: Path = args.out
    for sub in ("students", "runs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    curves = [parse_curve(c) for c in args.curve]
    configs = {c.name: make_train_config(recipe=c.recipe, preset=c.preset, data=args.data, out_dir=out / "runs" / c.name,
                                         overrides=[*args.train_set, *c.overrides, f"device={args.device}"], registry=registry)
               for c in curves}
    share_fitted_teachers(configs.values(), out / "teachers", args.data, registry, args.device, True, print)

    state_file = out / "scaling_state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"calibration": {}, "students": {}}

    def save_state():
        state_file.write_text(json.dumps(state, indent=1))

    def cost_key(c: Curve) -> str:  # what a step costs depends on the student and the teachers
        return f"{c.recipe}@{c.preset}:" + "+".join(t.name for t in configs[c.name].teachers)

    for c in curves:
        key = cost_key(c)
        if key not in state["calibration"]:
            print(f"scaling: timing one step of {key} with one thread ...", flush=True)
            state["calibration"][key] = calibrate(configs[c.name], out)
            save_state()
        print(f"scaling: {key}: {state['calibration'][key]:.3f} CPU-s per step (one thread)", flush=True)

    chains = []  # each (curve, seed) trains its budgets in order; chains are independent
    for c in curves:
        per_step = state["calibration"][cost_key(c)]
        steps_of = {b: max(1, round(b * 60 / per_step)) for b in c.budgets}
        for seed in range(c.seeds or args.seeds):
            budgets = c.budgets if seed == 0 else c.budgets[: args.seeds_to]
            chains.append((c, seed, per_step, steps_of, budgets))
    chains.sort(key=lambda ch: -sum(ch[3][b] * ch[2] for b in ch[4][-1:]))  # the longest first, the short ones fill in
    lock = threading.Lock()

    def train_chain(c: Curve, seed: int, per_step: float, steps_of: dict, budgets: list[float]) -> None:
        horizon = steps_of[c.budgets[-1]]
        for b in budgets:
            sid = f"{c.name}@{b:g}@s{seed}"
            target = out / "students" / f"{c.name}-b{b:g}-s{seed}.safetensors"
            if sid in state["students"] and target.exists():
                continue
            cfg = configs[c.name].model_copy(deep=True)
            cfg.seed = seed
            cfg.out_dir = out / "runs" / f"{c.name}-s{seed}"
            cfg.optim.max_steps = steps_of[b]
            cfg.optim.decay_steps = horizon
            print(f"scaling: {sid}: training to step {steps_of[b]} of {horizon} -> {cfg.out_dir} (log: {cfg.out_dir}.log)", flush=True)
            # a process per segment: it resumes from the last one's checkpoint, and its CPU time is its own
            cfg_file = out / "runs" / f"{c.name}-s{seed}-b{b:g}.json"
            cfg_file.write_text(cfg.model_dump_json(indent=1))
            wall = time.time()
            env = {**os.environ, **({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if args.jobs > 1 else {})}
            with open(f"{cfg.out_dir}.log", "a") as log_file:
                proc = subprocess.Popen([sys.executable, "-m", "mert_cli.main", "train", "--config", str(cfg_file), "--resume"],
                                        stdout=log_file, stderr=subprocess.STDOUT, env=env)
                _, status, usage = os.wait4(proc.pid, 0)  # this child's CPU time (and its loader workers'), apart from the others'
                proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                raise SystemExit(f"scaling: {sid}: mert train failed (exit {proc.returncode}); see {cfg.out_dir}.log")
            summary = json.loads((cfg.out_dir / "summary.json").read_text())
            shutil.copyfile(cfg.out_dir / "student.safetensors", target)
            with lock:
                state["students"][sid] = {
                    "curve": c.name, "recipe": c.recipe, "preset": c.preset, "seed": seed, "budget_cpu_minutes": b,
                    "steps": steps_of[b], "horizon_steps": horizon, "cpu_seconds_per_step": per_step,
                    "audio_hours_seen": summary.get("audio_hours_seen"), "file": str(target),
                    "segment_wall_seconds": round(time.time() - wall, 1), "segment_cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
                    "threads": 1 if args.jobs > 1 else None,
                }
                save_state()

    # on 2 cores two one-thread runs make more steps than one two-thread run of a small student
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(train_chain, *chain) for chain in chains]:
            future.result()
    if args.no_probe:
        return

    task_options = parse_task_options(args.task_set, args.task)
    po, xo = split_eval_options(args.probe_set)
    ups = [(checkpoint_upstream(s["file"], device=args.device, name=sid), s["seed"]) for sid, s in state["students"].items()
           if s["curve"] in configs]
    presets = list(dict.fromkeys(c.preset for c in curves))
    ups += [(random_upstream(p, seed=s, device=args.device, name=f"random-{p}@s{s}"), s) for p in presets for s in range(args.seeds)]
    ups.append((HandcraftedUpstream(), 0))
    # one file per (upstream, task): a killed run keeps what it probed; --probe-jobs processes share the pairs
    probe_dir = out / "probes"
    probe_dir.mkdir(exist_ok=True)
    tasks = [eval_api.build_task(t, task_options.get(t), registry) for t in args.task]
    pairs = [(task, up, seed, probe_dir / f"{up.name}__{task.name}.json") for task in tasks for up, seed in ups]
    if args.probe_part or args.probe_jobs == 1:
        k, n = map(int, (args.probe_part or "0/1").split("/"))
        for task, up, seed, file in pairs[k::n]:
            if not file.exists():
                result = eval_api.probe_task(up, task, {**po, "seed": seed}, xo, None, progress=False)
                file.write_text(json.dumps(result.to_dict(), default=str))
                print(f"scaling: {up.name} {task.name}: {result.test_score:.4f}", flush=True)
        if args.probe_part:
            return
    else:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--probe-part", f"{k}/{args.probe_jobs}"],
                                  env=env) for k in range(args.probe_jobs)]
        if any(proc.wait() for proc in procs):
            raise SystemExit("scaling: a probing process failed (see its output above); run again to continue")
    results = [ProbeResult(**json.loads(file.read_text())) for *_, file in pairs]
    rows = summarise(results, state["students"])
    text = format_rows(rows)
    (out / "scaling.txt").write_text(text + "\n")
    (out / "scaling.json").write_text(json.dumps({"rows": rows, "students": state["students"], "calibration": state["calibration"],
                                                  "probes": [r.to_dict() for r in results]}, indent=1, default=str))
    plot(out / "scaling.png", rows)
    print(text)
    print(f"wrote scaling.txt, scaling.json, scaling.png to {out}")


def summarise(results, students: dict) -> list[dict]:
    """Mean and sample std of the test score over seeds, per (upstream group, task)."""
    groups: dict[tuple[str, str], list] = {}
    for r in results:
        group = r.upstream.rsplit("@s", 1)[0] if "@s" in r.upstream else r.upstream
        groups.setdefault((group, r.task), []).append(r)
    rows = []
    for (group, task), rs in groups.items():
        scores = [r.test_score for r in rs]
        mean = sum(scores) / len(scores)
        std = math.sqrt(sum((s - mean) ** 2 for s in scores) / (len(scores) - 1)) if len(scores) > 1 else 0.0
        info = students.get(rs[0].upstream, {})
        kind = "student" if info else ("random" if group.startswith("random-") else "handcrafted")
        hours = [students[r.upstream]["audio_hours_seen"] for r in rs if r.upstream in students]
        rows.append({"group": group, "kind": kind, "task": task, "metric": rs[0].metric, "mean": mean, "std": std, "n": len(scores),
                     "scores": scores, "curve": info.get("curve"), "preset": info.get("preset") or (group[len("random-"):] if kind == "random" else None),
                     "budget_cpu_minutes": info.get("budget_cpu_minutes"), "steps": info.get("steps"),
                     "audio_hours_seen": sum(hours) / len(hours) if hours else None,
                     "layers": [r.best.get("layer") for r in rs]})
    return rows


def format_rows(rows: list[dict]) -> str:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    metric = {r["task"]: r["metric"] for r in rows}
    groups = list(dict.fromkeys(r["group"] for r in rows))
    cell = {(r["group"], r["task"]): f"{r['mean']:.3f} +- {r['std']:.3f} ({r['n']})" for r in rows}
    info = {r["group"]: r for r in rows}
    header = ["upstream", "steps", "audio-h"] + [f"{t} ({metric[t]})" for t in tasks]
    body = [[g, str(info[g]["steps"] or "-"), f"{info[g]['audio_hours_seen']:.1f}" if info[g]["audio_hours_seen"] else "-"]
            + [cell.get((g, t), "-") for t in tasks] for g in groups]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in body])


def plot(out_png: Path, rows: list[dict]) -> Path:
    """Score against CPU-minutes (top) and audio-hours seen (bottom), one column per task; each
    preset's random twins as a dashed line in its curves' colour, handcrafted dotted black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    curves = list(dict.fromkeys(r["curve"] for r in rows if r["kind"] == "student"))
    presets = list(dict.fromkeys(r["preset"] for r in rows if r["kind"] == "student"))
    colour = {p: plt.cm.tab10(i) for i, p in enumerate(presets)}
    markers = "osD^v<>"
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 7), squeeze=False)
    for col, task in enumerate(tasks):
        for row, (xkey, xlabel) in enumerate((("budget_cpu_minutes", "training CPU-minutes (one-thread CPU time)"),
                                               ("audio_hours_seen", "audio hours seen"))):
            ax = axes[row][col]
            for i, curve in enumerate(curves):
                pts = sorted((r for r in rows if r["curve"] == curve and r["task"] == task), key=lambda r: r[xkey])
                if not pts:
                    continue
                ax.errorbar([r[xkey] for r in pts], [r["mean"] for r in pts], yerr=[r["std"] for r in pts], capsize=3,
                            marker=markers[i % len(markers)], color=colour[pts[0]["preset"]], label=curve,
                            linestyle="-" if i < 10 else "--")
            for r in rows:
                if r["task"] != task:
                    continue
                if r["kind"] == "random" and r["preset"] in colour:
                    ax.axhline(r["mean"], color=colour[r["preset"]], linestyle="--", linewidth=1, label=f"random {r['preset']} (n={r['n']})")
                elif r["kind"] == "handcrafted":
                    ax.axhline(r["mean"], color="black", linestyle=":", linewidth=1, label="handcrafted")
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_title(f"{task} ({pts[0]['metric'] if pts else ''})", fontsize=9)
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


if __name__ == "__main__":
    main()
