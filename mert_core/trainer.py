"""The training loop: data, teachers, augment, forward, loss, backward, step,
log, checkpoint, top to bottom.

Everything random is a pure function of (seed, step, rank) or restored from the
checkpoint, so a run killed at any point and resumed with ``--resume`` ends
with the same weights as one never stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from mert_core import distributed
from mert_core.checkpoint import (
    LAST, STUDENT_FILE, RunFolderTaken, TrainingState, clear_run_files, lock_run_folder, point_last, remove_stale_temp_files,
    restore_rng, restore_training, resume_from, roll_back_to_checkpoint_before, run_files, save_checkpoint, save_student,
)
from mert_core.config import TrainConfig
from mert_core.data import CropBatches, make_loader
from mert_core.errors import ConfigError, PluginError, TargetLengthError, TrainingError  # noqa: F401 - re-exported: raised here, imported from here
from mert_core.fitting import with_teacher_file
from mert_core.files import atomic_write, naming_a_full_disk
from mert_core.geometry import FrameGeometry
from mert_core.heads import TargetHeads
from mert_core.loss import MultiTargetLoss
from mert_core.components import valid_mask
from mert_core.masking import compute_span_mask
from mert_core.model import PRESET_FINAL_DIMS, build_student
from mert_core.registry import Registry, default_registry
from mert_core.runconfig import ConfigError, with_data_paths
from mert_core.signals import CollapseWatch, feature_signals, target_signals
from mert_core.teacher import IGNORE_LABEL, TargetSpec, Teacher


# -- small pure helpers ---------------------------------------------------------

def lr_at(step: int, peak_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup to ``peak_lr``, then linear (polynomial power 1) decay to 0
    at ``max_steps`` (MERT's schedule, from HuBERT's fairseq recipe)."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    remaining = max(0, max_steps - step)
    return peak_lr * remaining / max(1, max_steps - warmup_steps)


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """A seed for one micro-batch's masks and augmentations."""
    return (seed * 1_000_003 + step * 1009 + micro * 101 + rank * 7919) % (2**63 - 1)


def align_targets(name: str, targets: torch.Tensor, num_frames: int, spec: TargetSpec, paths: list[str],
                  trailing: int = 0) -> tuple[torch.Tensor, int]:
    """Trim or pad one teacher's targets to the student's ``num_frames``.

    Lengths within one frame are reconciled (the extra frame is dropped, a
    missing last frame becomes "no target"), and so are the ``trailing`` frames
    past the end of a student with a long receptive field
    (``FrameGeometry.trailing_frames``); anything else is an error naming the
    teacher, the files and both lengths.

    Returns:
        ``(B, num_frames, ...)`` targets and the number of frames that hold a target.
    """
    have = targets.shape[1]
    if not -1 <= have - num_frames <= 1 + trailing:
        shown = ", ".join(paths[:3]) + (" ..." if len(paths) > 3 else "")
        raise TargetLengthError(
            f"teacher {name!r} gave {have} frames where the student has {num_frames} "
            f"(files: {shown}); a teacher must deliver targets at {spec.frame_rate_hz:g} Hz, "
            f"within one frame of the student's"
        )
    if have >= num_frames:
        return targets[:, :num_frames], num_frames
    pad_shape = (targets.shape[0], num_frames - have, *targets.shape[2:])
    fill = IGNORE_LABEL if spec.kind == "discrete" else 0.0
    pad = torch.full(pad_shape, fill, dtype=targets.dtype, device=targets.device)
    return torch.cat([targets, pad], dim=1), have


class Pretrainer(nn.Module):
    """Student plus heads as one module, so DistributedDataParallel sees one forward."""

    def __init__(self, student: nn.Module, heads: TargetHeads):
        super().__init__()
        self.student, self.heads = student, heads

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor, unmasked: torch.Tensor | None = None):
        """Predictions at the masked frames, at the ``unmasked`` frames (``(B, T)``
        bool, or None: not scored), the feature penalty, and the feature
        signals (``std/conv``, ``std/layer<i>``, detached)."""
        # the hidden states are kept for the backward pass anyway: listing them costs nothing
        out = self.student(wave, lengths, mask=mask, output_hidden_states=True)
        scored = out.last_hidden[mask]  # N, D: losses on masked frames
        signals = feature_signals(out.features, out.hidden_states, out.padding_mask)
        at_unmasked = self.heads(out.last_hidden[unmasked]) if unmasked is not None else None
        return self.heads(scored), at_unmasked, out.features_penalty, signals


@dataclass
class TrainResult:
    student: nn.Module
    heads: TargetHeads
    out_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)


SCALE_STEPS = 10
"""How many good steps at the start of a run measure its loss and conv-feature scales (:class:`ScaleBounds`)."""


@dataclass
class ScaleBounds:
    """Whether a step's outputs are sane: its loss and conv-feature std (``std/conv``) within
    ``growth`` times the largest of the run's first :data:`SCALE_STEPS` good steps.

    Weights blown up by an lr far too high can give finite outputs (conv std 1e11, loss
    1e26, a non-finite gradient); judged by finiteness alone they were kept as the last
    good state, and every resume from them failed again. Healthy runs stay far inside the
    default 1000x: at most 1.2x their start in loss and 3x in conv std (measured over
    200-300 steps of the tiny student on real music, lr 5e-4 and 2e-3, with and without
    the feature penalty). The start is kept in the checkpoint's counters, so a resume is
    judged by the same bounds.

    Args:
        growth: ``config.max_scale_growth``.
        start: ``{"steps": n, "loss": ..., "std/conv": ...}``, updated in place
            (``counters["start_scales"]``); empty until the first good step.
    """

    growth: float
    start: dict[str, float]

    def within(self, loss: float, std_conv: float) -> bool:
        """False for a loss or conv std beyond the bounds (or NaN); True before anything was measured."""
        if not self.start:
            return True
        return loss <= self.growth * self.start["loss"] and std_conv <= self.growth * self.start["std/conv"]

    def measure(self, loss: float, std_conv: float) -> None:
        """Take a good step's scales into the start, during the first :data:`SCALE_STEPS` good steps."""
        if self.start.get("steps", 0) < SCALE_STEPS:
            self.start.update(steps=self.start.get("steps", 0) + 1, loss=max(self.start.get("loss", 0.0), loss),
                              **{"std/conv": max(self.start.get("std/conv", 0.0), std_conv)})

    def describe(self) -> str:
        return (f"{self.growth:g}x the loss {self.start['loss']:.3g} or conv-feature std {self.start['std/conv']:.3g} "
                f"of the run's first steps") if self.start else "no bounds yet"


# -- building the parts from the config (the loop reads only its run-wide settings) ----------

def build_teachers(config: TrainConfig, registry: Registry, files: list[Path], geometry: FrameGeometry, dist_info, log,
                   device=None) -> dict[str, Teacher]:
    """Instantiate every teacher for the student's ``geometry``; fit the ones that need it (rank 0) first."""
    teachers = {}
    for tc in config.teachers:
        teacher = registry.build("teacher", tc.name, tc.options, geometry=geometry)
        if teacher.needs_fit() and tc.label_store is None:
            out_file = config.out_dir / f"teacher-{tc.name}.safetensors"
            if dist_info.is_main and not out_file.exists():
                plan = teacher.fit_plan(files, seed=config.seed, device=device)
                log(
                    f"teacher {tc.name!r} has no fitted file: fitting it on the training data {plan} -> {out_file}. "
                    f"To fit once and reuse it in every run: `mert teacher fit {tc.name} --data AUDIO --out FILE`, "
                    f"then `--set teacher.{tc.name}.teacher_file=FILE`"
                )
                teacher.fit(files, out_file, seed=config.seed, device=device)
            distributed.barrier(dist_info)
            # recorded in the config, so the checkpoint is self-contained and a resume reloads it
            tc.options = with_teacher_file(tc.options, out_file)
            teacher = registry.build("teacher", tc.name, tc.options, geometry=geometry)
        elif teacher.needs_fit():
            raise ConfigError(f"teacher {tc.name!r}: a label store is given but no teacher_file; pass the fitted teacher file it was made with")
        teachers[tc.name] = teacher
    return teachers


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("config field 'precision': fp16 needs a CUDA device; use fp32 or bf16 on CPU")
    return torch.float16 if precision == "fp16" else torch.bfloat16


# -- building the run -----------------------------------------------------------

@dataclass
class Run:
    """Everything the loop needs, built from the config by :func:`build_run`.

    ``step``, ``counters`` and ``history`` are where the run starts (0 and empty,
    or what a resumed checkpoint held); the loop advances its own copies.
    """

    config: TrainConfig
    registry: Registry
    dist_info: distributed.DistInfo
    device: torch.device
    say: Callable[[str], None]
    out_dir: Path
    manifest: Any  # data.Manifest, or shards.ShardCorpus for a streamed run
    usable: list  # the manifest's files long enough to crop (none for shards)
    teachers: dict[str, Teacher]
    specs: dict[str, TargetSpec]
    label_stores: dict[str, Any]  # teacher name -> labels.LabelStore
    augments: list[nn.Module]
    student: nn.Module
    model: Pretrainer
    train_model: nn.Module  # ``model``, maybe wrapped in DDP and compiled
    loss_fn: MultiTargetLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    warmup_steps: int
    batches: Iterator[dict[str, Any]]
    step: int = 0
    counters: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed: bool = False

    @property
    def is_main(self) -> bool:
        return self.dist_info.is_main


def build_run(config: TrainConfig, registry: Registry | None, resume: bool, progress: bool,
              log: Callable[[str], None] | None, run_scope: contextlib.ExitStack, overwrite: bool = False) -> Run:
    """Data, teachers, label stores, model, heads, optimiser and loader from
    ``config``, restored from ``last.pt`` (weights, optimiser, counters, RNG) on
    resume. ``run_scope`` holds the run folder's lock until the run ends; a new
    run into a folder holding another is refused unless ``overwrite`` (see :func:`_start_in`)."""
    from tqdm import tqdm

    if resume and overwrite:
        raise RunFolderTaken("--resume continues the run in --out, --overwrite deletes it: give one of them")
    registry = registry or default_registry()
    config = with_data_paths(config.model_copy(deep=True))
    dist_info, device = distributed.setup(config.device)
    say = (log or tqdm.write) if dist_info.is_main else (lambda msg: None)
    out_dir = Path(config.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"config field 'out_dir' (--out): {out_dir} is a file; give a folder for the run")
    # one writer per run folder: an existing folder is claimed before its last.pt is read,
    # a new one only once the data is known to be usable (bad input leaves no empty folder)
    claimed = dist_info.is_main and out_dir.is_dir() and _claim_run_folder(out_dir, run_scope, say)
    if claimed:
        _start_in(out_dir, resume, overwrite, say)
    state, history = None, []
    if resume and (out_dir / LAST).exists():
        state, config, history, message = resume_from(out_dir, config)
        say(message)

    # the student first: teachers frame their targets by the student that was built
    torch.manual_seed(config.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
    student = build_student(config.model, sample_rate=config.data.sample_rate)
    _check_crop(config, student)
    manifest, usable = _scan_data(config, dist_info, progress, say)
    from mert_core.shards import ShardCorpus

    dataset = None if isinstance(manifest, ShardCorpus) else _crop_batches(config, manifest, dist_info)
    if dataset is not None:
        # the first batch, read here: files that pass the scan but none of which decode (NaN audio)
        # fail now in one line, not in a loader worker after the run folder was made
        dataset[(state["step"] if state is not None else 0) * config.optim.grad_accum]
    if dist_info.is_main and not claimed:  # only now: bad input leaves no empty run folder behind
        _claim_run_folder(out_dir, run_scope, say)
    # forked RNG: fitting a teacher must not shift the stream that initialises the heads
    with torch.random.fork_rng(devices=[]):
        teachers, specs, label_stores = _build_targets(config, registry, usable, student, dist_info, device, say)
    augments = [registry.build("augment", a.name, a.options, sample_rate=config.data.sample_rate).to(device) for a in config.augment]

    # heads, loss, optimizer
    final_dim = config.loss.final_dim or PRESET_FINAL_DIMS[config.model.preset]
    heads = TargetHeads(specs, student.embed_dim, final_dim, config.loss.logit_temperature)
    if state is None and config.model.init_from is not None:
        from mert_core.init_from import init_student

        config.model.init_from_hash, reused = init_student(
            config.model.init_from, student, heads, {n: t.config_hash() for n, t in teachers.items()}, config.model.init_from_hash
        )
        say(f"student initialised from {config.model.init_from} (sha256 {config.model.init_from_hash}); "
            f"heads {'taken over for ' + ', '.join(reused) if reused else 'fresh'}")
    model = Pretrainer(student, heads).to(device)
    weights = {tc.name: tc.weight if tc.weight is not None else specs[tc.name].default_weight for tc in config.teachers}
    loss_fn = MultiTargetLoss(specs, weights, config.loss.feature_penalty)
    opt = config.optim
    # fairseq's Adam applies weight decay decoupled from the gradient, i.e. AdamW
    # fused on CUDA: one kernel launch for all parameters instead of several per tensor (the same update)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay,
                                  fused=device.type == "cuda")
    amp_dtype = resolve_precision(config.precision, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    step = 0
    counters = {"audio_seconds": 0.0, "bad_steps": 0, "elapsed_seconds": 0.0, "data_wait_seconds": 0.0, "skipped_files": {}}
    if state is not None:
        step, saved_counters = restore_training(state, model, optimizer, scaler, teachers)
        counters.update(saved_counters)
    train_model: nn.Module = model
    if dist_info.enabled:
        # layerdrop and one-random-codebook runs leave parameters unused on some steps
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    if config.compile:
        train_model = torch.compile(train_model)  # compiled on the first step; graph breaks at host syncs are fine

    if dataset is None:  # shards: the stream continued from its saved state (one per rank)
        batches = _shard_batches(config, manifest, dist_info, streams=state.get("data_stream") if state else None)
    else:
        batches = iter(make_loader(dataset, start_index=step * opt.grad_accum, num_workers=config.data.num_workers))
    # Seeded only now: starting a DataLoader iterator draws from the global RNG,
    # which would shift a resumed run's dropout stream by one draw.
    torch.manual_seed(config.seed + 1 + dist_info.rank)  # dropout/layerdrop stream, distinct per rank
    if state is not None:
        restore_rng(state, dist_info.rank, device)
    return Run(
        config=config, registry=registry, dist_info=dist_info, device=device, say=say, out_dir=out_dir,
        manifest=manifest, usable=usable, teachers=teachers, specs=specs, label_stores=label_stores, augments=augments,
        student=student, model=model, train_model=train_model, loss_fn=loss_fn, optimizer=optimizer, scaler=scaler,
        amp_dtype=amp_dtype, warmup_steps=opt.warmup_steps if opt.warmup_steps is not None else int(0.08 * (opt.decay_steps or opt.max_steps)),
        batches=batches, step=step, counters=counters, history=history, resumed=state is not None,
    )


def _check_crop(config: TrainConfig, student) -> None:
    """Refuse a crop too short to give the student one frame (every loss and signal would be empty)."""
    crop = round(config.data.crop_seconds * config.data.sample_rate)
    if student.num_frames(crop) < 1:
        field = student.geometry.receptive_field
        raise ConfigError(
            f"config field 'data.crop_seconds': {config.data.crop_seconds:g} s is {crop} samples, shorter than the "
            f"{config.model.preset} student's receptive field ({field} samples, {field / config.data.sample_rate:.3g} s): "
            f"it gives no frame; use crops of seconds (MERT: 5 s)"
        )


def _scan_data(config: TrainConfig, dist_info, progress: bool, say) -> tuple[Any, list]:
    """The manifest of ``config.data.paths`` (one scan, cached; bad files are
    listed, never fatal) and its files long enough to use; for shards, the
    :class:`~mert_core.shards.ShardCorpus` and no files."""
    from mert_core.data import DataError, scan_audio
    from mert_core.shards import is_shard_source, open_corpus

    if any(is_shard_source(p) for p in config.data.paths):  # streamed: nothing to scan, the shards are read as they come
        corpus = open_corpus(config.data.paths)
        say(f"data: {corpus.describe()}, streamed")
        return corpus, []
    data_paths = [Path(p) for p in config.data.paths]
    if dist_info.is_main:
        manifest = scan_audio(data_paths, progress=progress)
    distributed.barrier(dist_info)
    if not dist_info.is_main:
        manifest = scan_audio(data_paths, progress=False)  # reads rank 0's cache
    usable, _ = manifest.split_by_duration(config.data.min_seconds)
    if not usable:
        raise DataError(
            f"data: no usable audio in {', '.join(map(str, data_paths))} "
            f"({len(manifest.files)} readable files, none of at least {config.data.min_seconds:g} s; "
            f"{len(manifest.skipped)} unreadable); give folders or manifests of wav/flac/ogg/mp3 files"
        )
    say(f"data: {len(usable)} files, {sum(f.duration_seconds for f in usable) / 3600:.2f} h "
        f"({len(manifest.files) - len(usable)} shorter than {config.data.min_seconds:g} s, {len(manifest.skipped)} unreadable)")
    return manifest, usable


def _build_targets(config: TrainConfig, registry: Registry, usable: list, student, dist_info, device, say):
    """The teachers for ``student`` (fitted if needed, attached to it, on the
    training device, never trained), their target specs, and the label stores
    of the teachers that read one."""
    sr = config.data.sample_rate
    # shards: a fit reads a bounded sample of them (mert_core.shards.local_sample)
    files = [f.path for f in usable] if usable else list(config.data.paths)
    teachers = build_teachers(config, registry, files, student.geometry, dist_info, say, device)
    for t in teachers.values():
        t.attach(student)
    specs = {name: t.target_spec() for name, t in teachers.items()}
    for name, spec in specs.items():
        if abs(spec.frame_rate_hz - student.geometry.frame_rate_hz) > 1e-6:
            raise PluginError(f"teacher {name!r} delivers targets at {spec.frame_rate_hz:g} Hz; the student runs at {student.geometry.frame_rate_hz:g} Hz")
    for t in teachers.values():
        t.to(device).eval()
    label_stores = {}
    for tc in config.teachers:
        if tc.label_store is not None:
            from mert_core.labels import LabelStore

            store = LabelStore.open(tc.label_store)
            # every training file must be in the store and unchanged: refused now, not at hour 3
            store.check(teachers[tc.name], window_samples=int(round(config.data.crop_seconds * sr)), files=files)
            label_stores[tc.name] = store
    return teachers, specs, label_stores


def _shard_batches(config: TrainConfig, manifest, dist_info, streams: list | None):
    """The crop batches of this rank from shards, the stream continued from its saved state
    (``streams``: one per rank). Crops are aligned to the label-store grid when a teacher reads a store."""
    from mert_core.shards import ReadPolicy
    from mert_core.streaming import ShardBatches, ShardStream

    data, stream = config.data, config.data.stream
    dataset = ShardStream(
        manifest, data.batch_size, sample_rate=data.sample_rate, crop_seconds=data.crop_seconds, min_seconds=data.min_seconds,
        seed=config.seed, rank=dist_info.rank, world_size=dist_info.world_size, lanes=stream.lanes, buffer_crops=stream.buffer_crops,
        aligned=any(tc.label_store is not None for tc in config.teachers),
        policy=ReadPolicy(stream.retries, stream.retry_seconds, stream.timeout_seconds),
        state=streams[dist_info.rank] if streams else None,
    )
    return ShardBatches(dataset, num_workers=data.num_workers)


def _crop_batches(config: TrainConfig, manifest, dist_info) -> CropBatches:
    """The crop batches of this rank: a pure function of (seed, index, rank). Crops are
    aligned to the label-store grid when a teacher reads a store."""
    return CropBatches(
        manifest,
        config.data.batch_size,
        sample_rate=config.data.sample_rate,
        crop_seconds=config.data.crop_seconds,
        min_seconds=config.data.min_seconds,
        seed=config.seed,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        align_crops=any(tc.label_store is not None for tc in config.teachers),
    )


# -- the loop -------------------------------------------------------------------

def train(
    config: TrainConfig,
    registry: Registry | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Pretrain a student. See :class:`mert_core.config.TrainConfig`.

    Args:
        config: the run configuration (saved in every checkpoint).
        registry: plugins to use; default: every installed plugin.
        resume: continue from ``config.out_dir/last.pt``; without one, start
            a new run there (what an earlier attempt left is removed).
        progress: show a progress bar (rank 0).
        log: where messages go (rank 0); default ``tqdm.write``.
        overwrite: delete the run already in ``config.out_dir`` (checkpoints,
            metrics, fitted teachers) and start a new one.

    Raises:
        RunFolderBusy: another run writes into ``config.out_dir``.
        RunFolderTaken: ``config.out_dir`` holds a run, and neither ``resume`` nor ``overwrite`` is given.
        TrainingError: too many non-finite steps in a row.
    """
    with contextlib.ExitStack() as run_scope:  # the run folder's lock, released however the run ends
        run = build_run(config, registry, resume, progress, log, run_scope, overwrite)
        return run_loop(run, progress)


def run_loop(run: Run, progress: bool = True) -> TrainResult:
    """Train ``run`` from ``run.step`` to ``optim.max_steps``: data, teachers,
    augment, mask, forward, loss, backward, step, log, checkpoint."""
    config, opt, say = run.config, run.config.optim, run.say
    step, counters = run.step, run.counters
    out = _RunOutput(run, progress)
    window = _Window()
    run_start = time.perf_counter() - counters["elapsed_seconds"]
    consecutive_bad, skipped_here = 0, 0
    weights_ok = True  # the current weights gave finite, sane outputs on every step since the last update
    bounds = ScaleBounds(config.max_scale_growth, counters.setdefault("start_scales", {}))
    last_saved = step if run.resumed else -1
    for teacher in run.teachers.values():  # once before the first batch (the EMA teacher copies the student)
        teacher.on_step(run.student, step)
    try:
        while step < opt.max_steps:
            lr = lr_at(step, opt.lr, run.warmup_steps, opt.decay_steps or opt.max_steps)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            step_loss_ok, measured = True, []
            for micro in range(opt.grad_accum):
                waited = time.perf_counter()
                batch = next(run.batches)
                window.data_wait_seconds += time.perf_counter() - waited
                for path, reason in batch.get("skipped", []):
                    if path not in counters["skipped_files"]:
                        counters["skipped_files"][path] = reason
                        say(f"skipped {path}: {reason}")
                loss, scales, outputs_finite = _micro_step(run, batch, step, micro, window)
                loss_value, std_conv = scales.tolist()  # host sync, once per micro-batch
                measured.append((loss_value, std_conv))
                step_loss_ok = step_loss_ok and math.isfinite(loss_value) and bounds.within(loss_value, std_conv)
                if not step_loss_ok and weights_ok:  # bad steps only: are the weights or the targets to blame?
                    # a loss or conv features beyond bounds come from the weights; a non-finite
                    # loss from finite outputs within bounds, from the targets or the loss
                    weights_ok = not math.isfinite(loss_value) and bounds.within(0.0, std_conv) and outputs_finite()
            if run.dist_info.enabled:  # each rank judged its own batch: skip the step on every rank or on none
                bad_ranks = torch.tensor(float(not step_loss_ok), device=run.device)
                step_loss_ok = distributed.all_reduce_sum(bad_ranks, run.dist_info).item() == 0

            # step: clip, skip non-finite, update
            run.scaler.unscale_(run.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), opt.grad_clip)
            finite = bool(torch.isfinite(grad_norm)) and step_loss_ok  # grads are all-reduced: every rank agrees
            if finite:  # never a non-finite update, with or without a loss scaler
                run.scaler.step(run.optimizer)
            run.scaler.update()  # fp16: lowers the loss scale after an overflow (no-op otherwise)
            run.optimizer.zero_grad(set_to_none=True)
            if finite:
                consecutive_bad, weights_ok = 0, True
                bounds.measure(*map(max, zip(*measured)))
            else:
                consecutive_bad += 1
                skipped_here += 1
                counters["bad_steps"] += 1
                say(f"step {step}: {_bad_step_reason(measured, grad_norm, bounds)}, update skipped ({consecutive_bad} in a row)")
                # a run never ends on weights that gave bad outputs, nor as done when it skipped every step
                ends = step + 1 >= opt.max_steps and (not weights_ok or skipped_here == step + 1 - run.step)
                if consecutive_bad >= config.max_bad_steps or ends:
                    _stop_after_bad_steps(run, step, consecutive_bad, weights_ok, last_saved, counters, window, run_start, bounds,
                                          every_step=skipped_here == step + 1 - run.step)
            step += 1
            window.steps += 1
            out.bar.update(1)
            if finite:  # teachers that follow the student (EMA) see the new weights
                for teacher in run.teachers.values():
                    teacher.on_step(run.student, step)

            if step % config.log_every == 0 or step == opt.max_steps:
                out.log(step, lr, grad_norm, window, counters)
                window = _Window()

            # checkpoint (every rank takes part: the RNG states of all ranks are saved)
            # (not after a non-finite step: the weights did not change, and an older checkpoint is worth keeping)
            if (step % config.checkpoint_every == 0 and finite) or step == opt.max_steps:
                rng, streams = _gather_rng(run.device, run.dist_info), _gather_streams(run)
                audio = counters["audio_seconds"] + _unlogged_audio(window.audio_seconds, run.dist_info)
                if run.is_main:
                    _save(run, step, {**counters, "audio_seconds": audio}, run_start, rng, streams)
                last_saved = step
                distributed.barrier(run.dist_info)
    finally:
        out.close()
    summary = _finish(run, step, counters, run_start) if run.is_main else {}
    distributed.barrier(run.dist_info)
    distributed.teardown(run.dist_info)
    return TrainResult(student=run.student, heads=run.model.heads, out_dir=run.out_dir, summary=summary)


@dataclass
class _Window:
    """What the micro-batches since the last metrics line added up to."""

    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0
    audio_seconds: float = 0.0
    data_wait_seconds: float = 0.0  # the step waited for the loader: data is the bottleneck
    start: float = field(default_factory=time.perf_counter)


def _micro_step(run: Run, batch: dict[str, Any], step: int, micro: int, window: _Window):
    """One micro-batch: targets, augment, mask, forward, loss, backward.

    Adds its loss terms and audio to ``window``. Returns the loss, the pair
    (loss, ``std/conv``) as one tensor (read once, a device sync) and a
    function telling whether the model's outputs were all finite (called on
    bad steps only: it syncs with the device).
    """
    config, device, specs, loss_fn = run.config, run.device, run.specs, run.loss_fn
    grad_accum = config.optim.grad_accum
    wave = batch["wave"].to(device, non_blocking=True)  # B, S
    lengths = batch["lengths"].to(device)
    generator = torch.Generator(device=device).manual_seed(step_seed(config.seed, step, micro, run.dist_info.rank))
    num_frames = run.student.num_frames(wave.shape[1])
    frame_lengths = run.student.num_frames(lengths)

    # teachers: targets from the clean audio, before any augmentation
    targets, valid_frames = _targets(run, batch, wave, num_frames, generator)

    # augment: only the student's input changes
    for augment in run.augments:
        wave = augment(wave, lengths, generator)

    # mask, forward, loss
    frame_lengths = frame_lengths.clamp(max=valid_frames)
    mask = compute_span_mask((wave.shape[0], num_frames), frame_lengths, config.mask.prob, config.mask.length, generator)
    sync = micro == grad_accum - 1 or not run.dist_info.enabled
    ctx = run.train_model.no_sync() if not sync else contextlib.nullcontext()
    # HuBERT's pred_nomask_weight: optionally also score the valid unmasked frames
    unmasked = (~mask & valid_mask(frame_lengths, num_frames)) if config.loss.unmasked_weight > 0 else None
    amp_dtype = run.amp_dtype
    with ctx:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            predictions, at_unmasked, features_penalty, signals = run.train_model(wave, lengths, mask, unmasked)
        scored_targets = {name: t[mask] for name, t in targets.items()}
        loss, terms = loss_fn(predictions, scored_targets, features_penalty)
        if at_unmasked is not None:
            loss_u, terms_u = loss_fn(at_unmasked, {name: t[unmasked] for name, t in targets.items()})
            loss = loss + config.loss.unmasked_weight * loss_u
            terms.update({f"unmasked_{k}": v for k, v in terms_u.items()})
        run.scaler.scale(loss / grad_accum).backward()
    terms.update(signals)
    terms.update(target_signals(predictions, scored_targets, specs))
    for k, v in terms.items():
        window.terms[k] = window.terms.get(k, 0.0) + v.float() / grad_accum
    window.terms["loss"] = window.terms.get("loss", 0.0) + loss.detach().float() / grad_accum
    window.audio_seconds += float(batch["lengths"].sum()) / config.data.sample_rate  # the CPU copy: no device sync
    scales = torch.stack([loss.detach().float(), signals["std/conv"].float()])
    return loss, scales, lambda: _all_finite([*predictions.values(), features_penalty])


def student_targets(teacher: Teacher, wave: torch.Tensor, num_frames: int, geometry: FrameGeometry,
                    store=None, paths: list[str] | None = None, offsets: list[int] | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """One teacher's targets for ``wave`` (``B, S``), frame ``t`` for the student's frame ``t``
    (trimmed or padded to ``num_frames`` by :func:`align_targets`).

    A teacher makes its targets on ``teacher.grid`` (the paper's 400-sample frames, or the
    student's own for a teacher that follows it); the leading ones before the student's
    first frame (``geometry.shift_from(teacher.grid).lead_frames``) are dropped.
    With ``store`` (a ``LabelStore``), the stored labels of ``paths`` at ``offsets``.
    """
    lead = geometry.shift_from(teacher.grid).lead_frames
    if store is not None:
        stored = store.targets(paths, offsets, num_frames, lead).to(wave.device)
        return teacher.targets_from_store(stored, generator=generator)
    return teacher.targets(wave, generator=generator)[:, lead:]


def _targets(run: Run, batch: dict[str, Any], wave: torch.Tensor, num_frames: int, generator: torch.Generator):
    """Every teacher's targets for ``wave`` (``B, S``), aligned to ``num_frames``,
    and the number of frames that hold a target for all of them."""
    targets, valid_frames, geometry = {}, num_frames, run.student.geometry
    with torch.no_grad():
        for name, teacher in run.teachers.items():
            t = student_targets(teacher, wave, num_frames, geometry, run.label_stores.get(name), batch["paths"], batch["offsets"], generator)
            trailing = geometry.shift_from(teacher.grid).trailing_frames
            targets[name], have = align_targets(name, t, num_frames, run.specs[name], batch["paths"], trailing)
            valid_frames = min(valid_frames, have)
    return targets, valid_frames


def _bad_step_reason(measured: list[tuple[float, float]], grad_norm: torch.Tensor, bounds: ScaleBounds) -> str:
    """Why a step was skipped, from its micro-batches' (loss, conv std)."""
    reasons = []
    if not all(math.isfinite(v) for pair in measured for v in pair):
        reasons.append("non-finite loss")
    elif not all(bounds.within(*pair) for pair in measured):
        loss, std_conv = map(max, zip(*measured))
        reasons.append(f"loss {loss:.3g} / conv-feature std {std_conv:.3g} beyond {bounds.describe()}")
    if not bool(torch.isfinite(grad_norm)):
        reasons.append("non-finite gradient")
    return ", ".join(reasons) or "bad step on another rank"


def _stop_after_bad_steps(run: Run, step: int, consecutive_bad: int, weights_ok: bool, last_saved: int,
                          counters: dict, window: _Window, run_start: float, bounds: ScaleBounds, every_step: bool) -> None:
    """Stop the run after bad steps (``max_bad_steps`` in a row, or a last step on bad weights,
    or ``every_step`` of this run), keeping the last weights that gave finite, sane outputs
    (a collective: every rank calls it)."""
    dist_info, out_dir = run.dist_info, run.out_dir
    rng, streams = _gather_rng(run.device, dist_info), _gather_streams(run)
    audio = counters["audio_seconds"] + _unlogged_audio(window.audio_seconds, dist_info)
    weights_ok = distributed.all_reduce_sum(torch.tensor(float(not weights_ok)), dist_info).item() == 0  # on every rank
    if not dist_info.is_main:
        raise TrainingError(f"rank {dist_info.rank}: stopped with rank 0 after bad steps")
    if weights_ok:  # the targets or the loss were at fault, not the weights: keep them
        if last_saved != step:
            _save(run, step, {**counters, "audio_seconds": audio}, run_start, rng, streams)
        advice = (f"The weights gave finite outputs within bounds, so the loss or the targets are at fault: check the data "
                  f"and the teachers (or use fp32 or bf16 instead of fp16). {out_dir / LAST} holds them (step {step}); "
                  f"resume with --resume once the cause is fixed")
    else:
        good = roll_back_to_checkpoint_before(out_dir, step - consecutive_bad + 1)
        advice = (f"The weights diverged; {out_dir / LAST} holds the last that gave finite outputs within bounds "
                  f"(step {good}): lower optim.lr (e.g. --set optim.lr={run.config.optim.lr / 10:.3g}) or use fp32 or bf16, "
                  f"then resume with --resume" if good is not None else
                  f"No checkpoint holds weights that gave finite outputs within bounds; start again with --overwrite "
                  f"and a lower optim.lr, fp32 or bf16")
    what = (f"all {consecutive_bad} steps of this run were bad" if every_step and consecutive_bad < run.config.max_bad_steps
            else f"{consecutive_bad} bad steps in a row")
    raise TrainingError(f"{what} at step {step} (non-finite, or beyond {bounds.describe()}): the run stopped. {advice}")


class _RunOutput:
    """Where the run reports (rank 0): ``config.json``, ``metrics.jsonl``,
    TensorBoard, the progress bar and the collapse watch.

    A full disk is one line naming the file: ``config.json`` is written
    atomically (never left empty), and TensorBoard's writer thread, which
    meets the error first, stays quiet (see :func:`_quiet_tensorboard_threads`).
    """

    def __init__(self, run: Run, progress: bool):
        from tqdm import tqdm

        self.run, self.writer, self.metrics_file, self.previous_hook = run, None, None, None
        config, is_main = run.config, run.is_main
        self.tensorboard_dir, self.metrics_path = run.out_dir / "tensorboard", run.out_dir / "metrics.jsonl"
        self.bar = tqdm(total=config.optim.max_steps, initial=run.step, disable=not (progress and is_main), unit="step", dynamic_ncols=True)
        if is_main:
            from torch.utils.tensorboard import SummaryWriter

            try:
                atomic_write(run.out_dir / "config.json", lambda tmp: tmp.write_text(config.model_dump_json(indent=2)))
                self.previous_hook, threading.excepthook = threading.excepthook, _quiet_tensorboard_threads(threading.excepthook)
                with naming_a_full_disk(self.tensorboard_dir):
                    self.writer = SummaryWriter(str(self.tensorboard_dir))
                self.metrics_file = open(self.metrics_path, "a")
            except BaseException:
                self.close()
                raise
        run.say(f"training a {config.model.preset} student ({sum(p.numel() for p in run.student.parameters()) / 1e6:.2f} M parameters) "
                f"with teachers {', '.join(run.teachers)} on {run.device} ({run.dist_info.world_size} process(es)), "
                f"{'fp32' if run.amp_dtype is None else str(run.amp_dtype).removeprefix('torch.')}")
        self.watch = CollapseWatch(run.warmup_steps, run.say, advice={n: t.advice() for n, t in run.teachers.items()},
                                   feature_penalty=config.loss.feature_penalty)

    def log(self, step: int, lr: float, grad_norm: torch.Tensor, window: _Window, counters: dict) -> None:
        """One metrics line: the window's averages, throughput, audio seen (a collective)."""
        elapsed = time.perf_counter() - window.start
        audio = distributed.all_reduce_sum(torch.tensor(window.audio_seconds, dtype=torch.float64), self.run.dist_info).item()
        counters["audio_seconds"] += audio
        counters["data_wait_seconds"] += window.data_wait_seconds
        record = {"step": step, "lr": lr, "grad_norm": float(grad_norm)}
        record.update({k: float(v) / window.steps for k, v in window.terms.items()})
        record["audio_seconds_per_second"] = audio / max(elapsed, 1e-9)
        record["audio_hours_seen"] = counters["audio_seconds"] / 3600
        record["data_wait_fraction"] = window.data_wait_seconds / max(elapsed, 1e-9)
        if self.run.is_main:
            with naming_a_full_disk(self.metrics_path):
                self.metrics_file.write(json.dumps(record) + "\n")
                self.metrics_file.flush()
            with naming_a_full_disk(self.tensorboard_dir):
                for k, v in record.items():
                    if k != "step":
                        self.writer.add_scalar(k, v, step)
            self.bar.set_postfix_str(_progress_text(record))
            self.watch.check(record)

    def close(self) -> None:
        """Close everything, however the run ends (a failing last flush must not hide why it ended)."""
        self.bar.close()
        try:
            if self.metrics_file is not None:
                self.metrics_file.close()
            if self.writer is not None:
                self.writer.close()
        except OSError as exc:
            self.run.say(f"could not flush the last metrics ({exc.strerror}); metrics.jsonl and tensorboard/ may lack the last lines")
        finally:
            if self.previous_hook is not None:
                threading.excepthook = self.previous_hook


def _quiet_tensorboard_threads(previous):
    """A ``threading.excepthook`` that drops the traceback of TensorBoard's writer thread when it
    fails to write (a full disk): the main thread meets the same error at its next call to the
    writer and reports it in one line, naming the folder. Every other thread's error goes to
    ``previous``."""

    def hook(args):
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard")):
            previous(args)

    return hook


def _finish(run: Run, step: int, counters: dict, run_start: float) -> dict[str, Any]:
    """Write ``summary.json`` and the loss curve, say what the run did (rank 0)."""
    out_dir, manifest = run.out_dir, run.manifest
    counters["elapsed_seconds"] = time.perf_counter() - run_start
    summary = {
        "steps": step,
        "audio_hours_seen": counters["audio_seconds"] / 3600,
        **_data_summary(manifest, run.usable, counters["skipped_files"], run.config.data.min_seconds),
        "bad_steps": counters["bad_steps"],
        "elapsed_seconds": counters["elapsed_seconds"],
        # of the logged steps' time, the share spent waiting for the loader (rank 0)
        "data_wait_fraction": counters["data_wait_seconds"] / max(counters["elapsed_seconds"], 1e-9),
        "checkpoint": str(out_dir / LAST),
        "student": str(out_dir / STUDENT_FILE),
        "history": run.history,
    }
    atomic_write(out_dir / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    from mert_core.plots import plot_loss_curves

    with naming_a_full_disk(out_dir / "loss.png"):
        plot_loss_curves(out_dir / "metrics.jsonl", out_dir / "loss.png")
    run.say(
        f"done: {step} steps, {summary['audio_hours_seen']:.3f} audio hours seen, "
        f"{summary['files_skipped']} files skipped, {summary['bad_steps']} steps skipped, "
        f"{summary['elapsed_seconds']:.0f} s; weights in {out_dir / STUDENT_FILE}, loss curve in {out_dir / 'loss.png'}"
    )
    return summary


def _data_summary(manifest, usable: list, skipped_while_reading: dict[str, str], min_seconds: float) -> dict[str, Any]:
    """The data lines of ``summary.json``: what was used and skipped (path or ``shard#member`` -> why)."""
    from mert_core.shards import ShardCorpus

    if isinstance(manifest, ShardCorpus):  # members are met as the shards stream by: only the skipped ones are known
        return {"shards": len(manifest.urls), "files_skipped": len(skipped_while_reading), "skipped_files": dict(skipped_while_reading)}
    too_short = {f.path: f.duration_seconds for f in manifest.split_by_duration(min_seconds)[1]}
    return {
        # long enough and never found unusable when read (a file is skipped for good once a read fails)
        "files_used": sum(f.path not in skipped_while_reading for f in usable),
        "files_skipped": len(manifest.skipped) + len(skipped_while_reading),
        "skipped_files": {**manifest.skipped, **skipped_while_reading},  # path -> why
        "files_too_short": len(too_short),
        "too_short_files": too_short,  # path -> seconds (< data.min_seconds)
    }


def _start_in(out_dir: Path, resume: bool, overwrite: bool, say) -> None:
    """Make sure a run that starts afresh in ``out_dir`` (claimed) mixes with no earlier run:
    refuse a folder holding one, or clear it with ``overwrite`` (or on ``resume`` with no
    checkpoint to resume from: what is left of that run cannot be continued)."""
    if resume and (out_dir / LAST).exists():
        return
    found = run_files(out_dir)
    if not found:
        return
    names = ", ".join(p.name for p in found)
    if not (resume or overwrite):
        raise RunFolderTaken(
            f"{out_dir} holds a run ({names}); continue it with --resume, or start a new one with another --out "
            f"or with --overwrite (deletes that run's checkpoints, metrics and fitted teachers first)"
        )
    clear_run_files(out_dir)
    say(f"--resume: no {LAST} in {out_dir}; starting a new run (removed {names} of the run that made no checkpoint)"
        if resume else f"--overwrite: removed {names} from {out_dir}; starting a new run")


def _claim_run_folder(out_dir: Path, run_scope: contextlib.ExitStack, say) -> bool:
    """Make ``out_dir``, hold its lock for the run's life, remove temp files of killed writes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    run_scope.enter_context(lock_run_folder(out_dir))
    for folder in (out_dir, out_dir / "checkpoints"):
        for p in remove_stale_temp_files(folder):
            say(f"removed {p}, left by a write that was killed")
    return True


def _progress_text(record: dict[str, float]) -> str:
    """The progress bar's numbers: the loss, each teacher's loss and its most
    telling learning signal (explained variance or accuracy), throughput."""
    parts = [f"loss {record['loss']:.3f}"]
    for key, value in record.items():
        if key.startswith("loss/"):
            name = key.split("/", 1)[1]
            signal = next((f" ({k.split('/')[0]} {record[k]:.2f})" for k in (f"r2/{name}", f"acc/{name}") if k in record), "")
            parts.append(f"{name} {value:.3f}{signal}")
    return " ".join(parts) + f" | {record['audio_seconds_per_second']:.1f} audio-s/s"


# -- checkpoint helpers ---------------------------------------------------------

def _gather_rng(device: torch.device, dist_info) -> dict[str, list[torch.Tensor]]:
    """Every rank's RNG state, in rank order (a collective: all ranks call it)."""
    local = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        local["cuda"] = torch.cuda.get_rng_state(device)
    if not dist_info.enabled:
        return {k: [v] for k, v in local.items()}
    import torch.distributed as dist

    everyone = [None] * dist_info.world_size
    dist.all_gather_object(everyone, local)
    return {k: [r[k] for r in everyone] for k in local}


def _gather_streams(run: Run) -> list[dict[str, Any]] | None:
    """Every rank's shard-stream state, in rank order (a collective: all ranks call it); None for folders."""
    from mert_core.streaming import ShardBatches

    if not isinstance(run.batches, ShardBatches):
        return None
    local = run.batches.state_dict()
    if not run.dist_info.enabled:
        return [local]
    import torch.distributed as dist

    everyone = [None] * run.dist_info.world_size
    dist.all_gather_object(everyone, local)
    return everyone


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t.detach()).all()) for t in tensors)


def _unlogged_audio(window_audio: float, dist_info) -> float:
    """Seconds of audio all ranks read since the last metrics line (a collective),
    so that a checkpoint off the logging cadence counts them."""
    return distributed.all_reduce_sum(torch.tensor(window_audio, dtype=torch.float64), dist_info).item()


def _save(run: Run, step: int, counters: dict, run_start: float, rng: dict, streams: list | None = None) -> None:
    """Write ``step_N.pt``, point ``last.pt`` at it, export the student (rank 0).
    ``streams``: every rank's shard-stream state (None for folders)."""
    config, model, out_dir = run.config, run.model, run.out_dir
    counters = {**counters, "elapsed_seconds": time.perf_counter() - run_start}
    state = TrainingState(
        step=step,
        config=config.model_dump(mode="json"),
        model_args=model.student.args,
        student=model.student.state_dict(),
        heads=model.heads.state_dict(),
        optimizer=run.optimizer.state_dict(),
        scaler=run.scaler.state_dict() if run.scaler.is_enabled() else {},
        rng=rng,
        counters=counters,
        plugin_versions=run.registry.versions(),
        teacher_hashes={name: t.config_hash() for name, t in run.teachers.items()},
        teacher_states={name: t.training_state() for name, t in run.teachers.items() if t.follows_student},
        world_size=len(rng["torch"]),
        history=run.history,
        data_stream=streams,
    ).as_dict()
    ckpt_dir = out_dir / "checkpoints"
    numbered = ckpt_dir / f"step_{step:08d}.pt"
    save_checkpoint(state, numbered)
    point_last(out_dir, numbered, state)
    for old in sorted(ckpt_dir.glob("step_*.pt"))[: -config.keep_checkpoints]:
        old.unlink()
    save_student(model.student, out_dir / STUDENT_FILE, config.model_dump(mode="json"))



