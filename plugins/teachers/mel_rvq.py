"""The Mel-RVQ teacher (MuQ): codes of a small residual VQ trained on mel frames.

MuQ (Zhu et al., "MuQ: Self-Supervised Music Representation Learning with
Mel Residual Vector Quantization", 2025) replaces MusicFM's random quantiser
by a residual vector quantiser trained on the same normalised, stacked mel
frames: each of 8 stages projects the residual linearly to 16 dims, picks the
codebook entry of highest cosine (l2-normalised codes, as in improved VQGAN),
and projects it back; the next stage quantises what is left. Training
minimises the reconstruction error plus the usual codebook and commitment
terms (straight-through gradients), restarting codes unused for a while from
random frames of the batch. The teacher's targets are the 8 stages' codes
(8 heads, like ``rvq-vae``). See docs/mel_rvq.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from mert_core.errors import FitError, NotFittedError, TeacherFileError
from mert_core.fitting import FitQuality, adopt_settings, artifact_header, centroid_digest, check_artifact_header, read_teacher_file, sample_batches
from mert_core.geometry import STUDENT_GEOMETRY, FrameGeometry
from mert_core.hookspecs import hookimpl
from mert_core.teacher import TargetSpec, Teacher
from mert_plugins.teachers._stacked_mel import (
    MEL_FIT_FIELDS,
    NormalisedMelStack,
    StackedMelOptions,
    fit_sample,
    measure_mel_stats,
    module_device,
    save_artifact,
)
from mert_plugins.teachers._streaming_kmeans import FeatureCache, kmeans_plusplus

log = logging.getLogger("mert.teachers.mel_rvq")

ARTIFACT_FORMAT = "mert-mel-rvq-teacher"
ARTIFACT_VERSION = 1
CHECKPOINT_VERSION = 1


class MelRVQOptions(StackedMelOptions):
    sample_hours: float | None = Field(
        2.0, gt=0, description="Upper bound on the hours of audio to fit on (2 h = 0.54 M frames, 1.1 GB of temporary frames; "
                               "a converged fit draws each ~20 times); None: no bound beyond sample_fraction.")
    num_codebooks: int = Field(8, ge=1, description="RVQ stages = target heads (MuQ and EnCodec: 8).")
    codebook_size: int = Field(1024, ge=2, description="Codes per stage (MuQ and EnCodec: 1024).")
    codebook_dim: int = Field(16, ge=1, description="Dimension each stage projects the residual to (MuQ: 16).")
    steps: int = Field(20000, ge=0, description="Training steps at most (Adam updates); a fit resumed from its checkpoint with more steps trains on.")
    eval_every: int = Field(250, ge=1, description="Steps between measurements of the reconstruction error on the held-out frames.")
    converge_tol: float | None = Field(
        0.01, ge=0, description="Stop once the held-out error has improved by less than this fraction over the last two "
                                "measurements (eval_every steps apart), as k-means stops on inertia; None: train all steps.")
    batch_frames: int = Field(4096, ge=1, description="Frames per training step, drawn at random from the fit sample.")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate (constant, so that a longer fit continues a shorter one exactly).")
    commitment_weight: float = Field(0.25, ge=0, description="Weight of the commitment loss |z_e - sg(q)|^2 (VQ-VAE's beta).")
    codebook_weight: float = Field(1.0, ge=0, description="Weight of the codebook loss |sg(z_e) - q|^2.")
    init: Literal["kmeans", "random"] = Field(
        "kmeans", description="Codebook init: k-means++ and a few Lloyd steps of each stage's projected frames, or standard normal."
    )
    init_frames: int = Field(20000, ge=2, description="Frames the k-means init reads (a random subset of the sample).")
    init_iters: int = Field(10, ge=0, description="Spherical Lloyd iterations after k-means++ seeding.")
    dead_code_steps: int = Field(100, ge=1, description="A code unused for this many steps is restarted from a random frame of the batch (MuQ: 100).")
    checkpoint_every: int = Field(1000, ge=1, description="Steps between checkpoints (<out>.ckpt, kept after the fit so that it can be extended).")
    log_every: int = Field(100, ge=1, description="Steps between loss records in the file's metadata.")
    eval_frames: int = Field(8192, ge=1, description="Frames of the fixed evaluation set on which the reconstruction error is reported.")
    resume: bool = Field(True, description="Continue from <out>.ckpt when it was made with the same settings and data sample.")


TRAIN_FIELDS = MEL_FIT_FIELDS | {
    "steps", "batch_frames", "lr", "commitment_weight", "codebook_weight", "init", "init_frames", "init_iters",
    "dead_code_steps", "checkpoint_every", "log_every", "eval_frames", "resume", "eval_every", "converge_tol",
}
"""Options that steer training; the rest (features, shapes) must match the file."""


# -- the model ---------------------------------------------------------------------------


@dataclass
class RVQOutput:
    recon: torch.Tensor  # N, D
    codes: torch.Tensor  # N, C
    commitment: torch.Tensor  # scalar: mean over stages
    codebook: torch.Tensor  # scalar: mean over stages
    latents: list[torch.Tensor] = field(default_factory=list)  # C x (N, d): each stage's projected residual


class ResidualVQ(nn.Module):
    """Residual VQ with a linear projection in and out of each stage and cosine code lookup.

    Args:
        input_dim: size ``D`` of the frames.
        num_codebooks: stages ``C``.
        codebook_size: codes per stage ``K``.
        codebook_dim: projected size ``d``.
    """

    def __init__(self, input_dim: int, num_codebooks: int, codebook_size: int, codebook_dim: int):
        super().__init__()
        self.proj_in = nn.ModuleList(nn.Linear(input_dim, codebook_dim) for _ in range(num_codebooks))
        self.proj_out = nn.ModuleList(nn.Linear(codebook_dim, input_dim) for _ in range(num_codebooks))
        self.codebooks = nn.Parameter(torch.randn(num_codebooks, codebook_size, codebook_dim))

    def lookup(self, stage: int, z: torch.Tensor) -> torch.Tensor:
        """``(N, d)`` projected residuals -> ``(N,)`` codes of highest cosine."""
        return (F.normalize(z, dim=-1) @ F.normalize(self.codebooks[stage], dim=-1).T).argmax(-1)

    def forward(self, x: torch.Tensor) -> RVQOutput:
        """Quantise ``(N, D)`` frames through every stage (straight-through gradients)."""
        residual, recon = x, torch.zeros_like(x)
        codes, latents, commitment, codebook = [], [], x.new_zeros(()), x.new_zeros(())
        for stage in range(self.codebooks.shape[0]):
            z = self.proj_in[stage](residual)  # N, d
            idx = self.lookup(stage, z)
            q = self.codebooks[stage][idx]  # N, d
            commitment = commitment + F.mse_loss(z, q.detach())
            codebook = codebook + F.mse_loss(q, z.detach())
            out = self.proj_out[stage](z + (q - z).detach())  # N, D
            recon, residual = recon + out, residual - out
            codes.append(idx)
            latents.append(z)
        C = self.codebooks.shape[0]
        return RVQOutput(recon, torch.stack(codes, -1), commitment / C, codebook / C, latents)


# -- the teacher --------------------------------------------------------------------------


class MelRVQTeacher(Teacher):
    """Codes of a trained residual VQ of normalised, stacked log-mel frames: 8 codebooks x 1024 at 75 Hz (MuQ)."""

    name = "mel-rvq"
    description = "Mel-RVQ: codes of a residual VQ (8 x 1024) trained on normalised stacked log-mel frames (MuQ's teacher)"
    fittable = True
    Options: ClassVar = MelRVQOptions

    def __init__(self, options: MelRVQOptions, geometry: FrameGeometry = STUDENT_GEOMETRY):
        super().__init__(options, geometry)
        self.fit_info: dict[str, Any] | None = None
        tensors = None
        if options.teacher_file is not None:
            meta, tensors = read_teacher_file(options.teacher_file, ARTIFACT_FORMAT, ARTIFACT_VERSION)
            check_artifact_header(meta, options.teacher_file, self.name, self.sample_rate, self.hop_samples)
            self.options = adopt_settings(options, meta["features"])
            self.fit_info = meta
        o = self.options
        self.features = NormalisedMelStack(self.sample_rate, self.hop_samples, o.n_mels, o.n_fft, o.stack_frames)
        self.rvq = ResidualVQ(self.features.dim, o.num_codebooks, o.codebook_size, o.codebook_dim).requires_grad_(False)
        self._digest: str | None = None
        if tensors is not None:
            self._load(tensors, str(options.teacher_file))

    def feature_settings(self) -> dict[str, Any]:
        """The options that must match the file (features and shapes), JSON-ready."""
        return {k: v for k, v in self.options.model_dump(mode="json").items() if k not in TRAIN_FIELDS}

    def target_spec(self) -> TargetSpec:
        o = self.options
        return TargetSpec(kind="discrete", frame_rate_hz=self.frame_rate_hz, num_codebooks=o.num_codebooks, num_classes=o.codebook_size)

    def needs_fit(self) -> bool:
        return self._digest is None

    def train(self, mode: bool = True):
        # frozen once fitted: fit() trains its own copy
        return super().train(False)

    @torch.no_grad()
    def targets(self, wave: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, S)`` clean audio -> ``(B, T, num_codebooks)`` int64 codes, ``T`` the student's frame count."""
        x = self._frames(wave)  # B, T, D
        if x.shape[1] == 0:  # shorter than one student frame
            return torch.zeros(x.shape[0], 0, self.options.num_codebooks, dtype=torch.long, device=x.device)
        with torch.autocast(wave.device.type, enabled=False):
            return self.rvq(x.reshape(-1, x.shape[-1])).codes.reshape(x.shape[0], x.shape[1], -1)

    @torch.no_grad()
    def reconstruct(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, S)`` -> the normalised stacked frames and their reconstruction, ``(B, T, D)`` each."""
        x = self._frames(wave)
        with torch.autocast(wave.device.type, enabled=False):
            return x, self.rvq(x.reshape(-1, x.shape[-1])).recon.reshape(x.shape)

    def _frames(self, wave: torch.Tensor) -> torch.Tensor:
        if self.needs_fit():
            raise NotFittedError(
                f"teacher {self.name!r} is not trained: pass options.teacher_file (made by "
                f"`mert teacher fit {self.name} --data AUDIO --out FILE`) or let `mert train` fit it"
            )
        return self.features(wave)

    def config_hash(self) -> str:
        """Hash of the name, rates, feature settings and the trained tensors."""
        if self.needs_fit():
            raise NotFittedError(f"teacher {self.name!r} is not fitted, so it has no configuration hash yet; fit it first")
        payload = f"{self.name}|{self.sample_rate}|{self.hop_samples}|{json.dumps(self.feature_settings(), sort_keys=True)}|{self._digest}"
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def _load(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        state = {k.removeprefix("rvq."): v for k, v in tensors.items() if k.startswith("rvq.")}
        want = {k: v.shape for k, v in self.rvq.state_dict().items()}
        for key, shape in {"bin_mean": self.features.bin_mean.shape, "bin_std": self.features.bin_std.shape}.items():
            if key not in tensors or tensors[key].shape != shape:
                raise TeacherFileError(f"teacher_file {source}: {key} is missing or not of shape {tuple(shape)}; the file is damaged, refit it")
        bad = [k for k, s in want.items() if k not in state or state[k].shape != s]
        if bad:
            raise TeacherFileError(
                f"teacher_file {source}: rvq.{bad[0]} is missing or not of shape {tuple(want[bad[0]])}; the file is damaged, refit it"
            )
        self.features.set_stats(tensors["bin_mean"], tensors["bin_std"])
        self.rvq.load_state_dict(state)
        self._digest = centroid_digest(tensors)

    # -- training ------------------------------------------------------------------------------

    def fit(self, files: list[Path], out_file: Path, *, seed: int = 0, device: str | torch.device | None = None,
            progress: bool = True) -> Path:
        """Train the residual VQ on a sample of ``files``, save it to ``out_file`` and use it.

        Per-bin statistics come first, then the normalised stacked frames of
        the sample go to a temporary on-disk cache, from which each step
        draws ``batch_frames`` at random. A checkpoint ``<out_file>.ckpt``
        is written every ``checkpoint_every`` steps and at the end; a fit
        started again with the same settings continues from it, exactly as
        if it had not stopped.

        Args:
            files: audio files, folders or manifests.
            out_file: the ``.safetensors`` artifact to write.
            seed: used unless ``options.seed`` is set.
            progress: show progress bars.
            device: where to train; None: the teacher's device, or CUDA when
                the teacher is on the CPU and a GPU is available.
        """
        o = self.options
        seed = o.seed if o.seed is not None else seed
        original = module_device(self)
        if device is None:
            device = original
            if device.type == "cpu" and torch.cuda.is_available():
                device = torch.device("cuda", torch.cuda.current_device())
        device = torch.device(device)
        out_file = Path(out_file)
        started = time.perf_counter()
        plan = fit_sample(o, files, self.sample_rate, seed, progress)
        self.features.to(device)
        try:
            mean, std, stats_frames, failures = measure_mel_stats(self.features.logmel, plan, self.sample_rate, o.batch_size, device, self.name, progress)
            self.features.set_stats(mean.to(device), std.to(device))
            with tempfile.TemporaryDirectory(prefix="mert-mel-rvq-") as tmp:
                cache = FeatureCache(Path(tmp) / "frames.f32", self.features.dim)
                try:
                    for _, batch in sample_batches(plan, self.sample_rate, o.batch_size, device, failures, f"{self.name}: frames", progress):
                        with torch.no_grad():
                            cache.append(self.features(batch).reshape(-1, self.features.dim))
                    cache.finish()
                    if cache.rows < 2:
                        raise FitError(f"{self.name}: only {cache.rows} frames in the fit sample; pass more audio with --data")
                    identity = {
                        "features": self.feature_settings(), "seed": seed, "sample": plan.describe(),
                        "stats": centroid_digest({"bin_mean": mean, "bin_std": std}),
                        "train": {k: getattr(o, k) for k in ("batch_frames", "lr", "commitment_weight", "codebook_weight", "init", "init_frames", "init_iters", "dead_code_steps")},
                    }
                    rvq, report = _train(cache, o, seed, identity, out_file.with_name(out_file.name + ".ckpt"), device, progress, self.name)
                finally:
                    cache.close()
        finally:
            self.features.to(original)
        plan.unusable.update(failures)
        tensors = {"bin_mean": mean, "bin_std": std, **{f"rvq.{k}": v for k, v in rvq.state_dict().items()}}
        meta = {
            **artifact_header(self, ARTIFACT_FORMAT, ARTIFACT_VERSION, self.feature_settings()),
            "seed": seed,
            "stats_frames": stats_frames,
            "train": {**{k: v for k, v in o.model_dump(mode="json").items() if k in TRAIN_FIELDS - {"teacher_file", "seed"}}, **report, "device": str(device)},
            "seconds": round(time.perf_counter() - started, 3),
            "sample": plan.describe(),
        }
        quality = FitQuality("held-out reconstruction error", report["recon_mse_init"], report["recon_mse"],
                             advice=f"lower lr (now {o.lr:g}); {out_file.name}.ckpt holds this fit's state and is resumed only with the same settings")
        save_artifact(out_file, ARTIFACT_FORMAT, tensors, meta, [quality])
        log.info(
            "%s: %d steps, reconstruction error %.4g -> %.4g (of frames with variance 1) -> %s",
            self.name, report["steps_done"], report["recon_mse_init"], report["recon_mse"], out_file,
        )
        self.options = self.options.model_copy(update={"teacher_file": out_file})
        self.fit_info = meta
        self._load({k: v.detach().cpu() for k, v in tensors.items()}, str(out_file))
        self.to(original)
        return out_file


def _rows(cache: FeatureCache, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Frames at indices ``rows`` (any order, repeats allowed) as a float32 tensor on ``device``."""
    order = np.sort(rows.numpy())  # the memory map reads sorted rows much faster; the order of a batch does not matter
    return torch.from_numpy(cache.take(order)).to(device)


@torch.no_grad()
def init_codebooks(rvq: ResidualVQ, x: torch.Tensor, method: str, iters: int, generator: torch.Generator) -> None:
    """Set each stage's codebook from ``(M, D)`` frames, stage after stage.

    ``kmeans``: k-means++ seeding and ``iters`` spherical Lloyd steps on the
    l2-normalised projected residuals; codes taken again when there are fewer
    frames than codes. ``random``: standard normal.
    """
    C, K, _ = rvq.codebooks.shape
    if method == "random":
        rvq.codebooks.copy_(torch.randn(rvq.codebooks.shape, generator=generator).to(x.device))
        return
    residual = x
    for stage in range(C):
        z = F.normalize(rvq.proj_in[stage](residual), dim=-1)  # M, d
        pool = z if z.shape[0] >= K else z[torch.randint(z.shape[0], (K,), generator=generator).to(z.device)]
        centres = kmeans_plusplus(pool, K, generator)  # K, d
        for _ in range(iters):
            idx = (z @ centres.T).argmax(-1)
            sums = torch.zeros_like(centres).index_add_(0, idx, z)
            used = torch.bincount(idx, minlength=K) > 0
            centres = torch.where(used[:, None], F.normalize(sums, dim=-1), centres)  # an empty cluster keeps its centre
        rvq.codebooks[stage].copy_(centres)
        out = rvq.proj_out[stage](rvq.codebooks[stage][rvq.lookup(stage, z)])
        residual = residual - out


def _train(cache: FeatureCache, o: MelRVQOptions, seed: int, identity: dict, ckpt: Path, device: torch.device, progress: bool, name: str):
    """The training loop; returns the trained model (on the CPU) and a report."""
    from mert_core.checkpoint import atomic_write

    N = cache.rows
    eval_rows = torch.randperm(N, generator=torch.Generator().manual_seed(seed + 1))[: o.eval_frames]
    x_eval = _rows(cache, eval_rows, device)
    state = torch.load(ckpt, map_location="cpu", weights_only=True) if o.resume and ckpt.is_file() else None
    if state is not None and (state.get("version") != CHECKPOINT_VERSION or state["identity"] != identity):
        log.warning("%s: checkpoint %s was made with other settings or data; starting afresh (it will be overwritten)", name, ckpt)
        state = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rvq = ResidualVQ(cache.dim, o.num_codebooks, o.codebook_size, o.codebook_dim)
    rvq.to(device)
    opt = torch.optim.Adam(rvq.parameters(), lr=o.lr)
    g = torch.Generator().manual_seed(seed)
    stale = torch.zeros(o.num_codebooks, o.codebook_size, dtype=torch.long)
    history: list[dict[str, float]] = []
    if state is None:
        init_rows = torch.randperm(N, generator=g)[: o.init_frames]
        init_codebooks(rvq, _rows(cache, init_rows, device), o.init, o.init_iters, g)
        step, restarts = 0, 0
        recon_init = _recon_mse(rvq, x_eval)
    else:
        rvq.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        g.set_state(state["generator"])
        stale, step, restarts, recon_init, history = state["stale"], state["step"], state["restarts"], state["recon_mse_init"], state["history"]
        log.info("%s: resuming from %s at step %d", name, ckpt, step)

    def save() -> None:
        snapshot = {
            "version": CHECKPOINT_VERSION, "identity": identity, "model": rvq.state_dict(), "optimizer": opt.state_dict(),
            "generator": g.get_state(), "stale": stale, "step": step, "restarts": restarts, "recon_mse_init": recon_init, "history": history,
        }
        atomic_write(ckpt, lambda tmp: torch.save(snapshot, tmp))

    bar = tqdm(total=o.steps, initial=min(step, o.steps), desc=f"{name}: training", unit="step", disable=not progress)
    evals = [h for h in history if "eval_mse" in h]
    converged = _converged(evals, o.converge_tol)
    timed_from = (step, time.perf_counter())
    while step < o.steps and not converged:
        x = _rows(cache, torch.randint(N, (o.batch_frames,), generator=g), device)
        out = rvq(x)
        recon = F.mse_loss(out.recon, x)
        loss = recon + o.commitment_weight * out.commitment + o.codebook_weight * out.codebook
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        restarts += _restart_dead_codes(rvq, out, stale, o.dead_code_steps, g)
        step += 1
        bar.update(1)
        if step - timed_from[0] == 10 and state is None:  # the estimate, once the first steps are timed
            per_step = (time.perf_counter() - timed_from[1]) / 10
            log.info("%s: %.3f s a step on %s: at most %d steps = %.0f s; stops earlier once the held-out error gains less "
                     "than %s per %d steps", name, per_step, device, o.steps, per_step * o.steps,
                     f"{o.converge_tol:.1%}" if o.converge_tol is not None else "nothing (converge_tol=None)", 2 * o.eval_every)
        record = {}
        if step % o.log_every == 0 or step == o.steps:
            record.update({"step": step, "loss": round(loss.item(), 6), "recon_mse": round(recon.item(), 6)})
            bar.set_postfix(recon=f"{recon.item():.4f}")
        if step % o.eval_every == 0:
            record.update({"step": step, "eval_mse": _recon_mse(rvq, x_eval)})
            evals.append(record)
            converged = _converged(evals, o.converge_tol)
            bar.set_postfix(recon=f"{recon.item():.4f}", held_out=f"{record['eval_mse']:.4f}")
        if record:
            history.append(record)
        if step % o.checkpoint_every == 0 or step == o.steps or converged:
            save()
    bar.close()
    report = {
        "steps_done": step, "recon_mse_init": recon_init, "recon_mse": _recon_mse(rvq, x_eval), "eval_frames": int(x_eval.shape[0]),
        "dead_code_restarts": restarts, "frames": N, "history": history, "stopped": "converged" if converged else "steps",
    }
    return rvq.cpu(), report


@torch.no_grad()
def _restart_dead_codes(rvq: ResidualVQ, out: RVQOutput, stale: torch.Tensor, patience: int, g: torch.Generator) -> int:
    """Count steps since each code was last used; a code unused for ``patience``
    steps takes a random projected residual of this batch, l2-normalised (as
    MuQ and DAC do). Returns the restarts.

    Normalised because the codes are: the k-means init makes them unit vectors, the
    lookup is by cosine, but the reconstruction uses a code at its length. The
    projected residuals grow during training (median length ~17 by step 100 on real
    music), so a code restarted from a raw one made every reconstruction it served
    ~17x too large; the next stage restarted codes from those residuals, larger
    still. On real music the held-out error went 0.39 -> 3e4 within 25 steps of the
    first restarts (step 100); tests/test_mel_quantizers.py reproduces it.
    """
    C, K, _ = rvq.codebooks.shape
    restarted = 0
    for stage in range(C):
        used = torch.bincount(out.codes[:, stage].cpu(), minlength=K) > 0
        stale[stage] = torch.where(used, 0, stale[stage] + 1)
        dead = (stale[stage] >= patience).nonzero().flatten()
        if len(dead):
            z = out.latents[stage]
            pick = torch.randint(z.shape[0], (len(dead),), generator=g)
            rvq.codebooks[stage, dead.to(z.device)] = F.normalize(z[pick.to(z.device)].detach(), dim=-1)
            stale[stage, dead] = 0
            restarted += len(dead)
    return restarted


def _converged(evals: list[dict], tol: float | None) -> bool:
    """The held-out error gained less than ``tol`` (a fraction) over the last two measurements."""
    if tol is None or len(evals) < 3:
        return False
    before, now = evals[-3]["eval_mse"], evals[-1]["eval_mse"]
    return now > before * (1 - tol)


@torch.no_grad()
def _recon_mse(rvq: ResidualVQ, x: torch.Tensor) -> float:
    return round(F.mse_loss(rvq(x).recon, x).item(), 6)


@hookimpl
def register_teachers(register):
    register(MelRVQTeacher)
