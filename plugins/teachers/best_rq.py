"""The BEST-RQ teacher (MusicFM): a frozen random-projection quantiser of log-mel frames.

MusicFM (Won et al., "A Foundation Model for Music Informatics", ICASSP 2024)
takes BEST-RQ's targets (Chiu et al., ICML 2022): log-mel frames, normalised
with per-bin statistics of the training data, stacked, projected by a frozen
random (Xavier) matrix, l2-normalised, and labelled with the nearest entry of a
frozen random l2-normalised codebook (8192 x 16). Nothing is learnt; the
"fit" measures the per-bin statistics and draws the random matrices from a
seed, and the file keeps both, so labels are reproducible from it alone.
See docs/best_rq.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from mert_core.errors import NotFittedError, TeacherFileError
from mert_core.fitting import adopt_settings, artifact_header, centroid_digest, check_artifact_header, read_teacher_file
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

log = logging.getLogger("mert.teachers.best_rq")

ARTIFACT_FORMAT = "mert-best-rq-teacher"
ARTIFACT_VERSION = 1


class BestRQOptions(StackedMelOptions):
    num_codebooks: int = Field(1, ge=1, description="Independent random quantisers (own projection and codebook each), one target head each (MusicFM: 1).")
    codebook_size: int = Field(8192, ge=2, description="Entries per codebook (BEST-RQ: 8192; MusicFM: 4096).")
    codebook_dim: int = Field(16, ge=1, description="Dimension of the projection and the codebook entries (BEST-RQ and MusicFM: 16).")


def random_quantizers(num_codebooks: int, input_dim: int, codebook_dim: int, codebook_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen random parts, drawn on the CPU from ``seed``.

    Returns:
        ``projection`` ``(C, input_dim, codebook_dim)``, Xavier-normal
        (std ``sqrt(2 / (input_dim + codebook_dim))``), and ``codebook``
        ``(C, codebook_size, codebook_dim)``, standard normal rows scaled to
        unit length.
    """
    g = torch.Generator().manual_seed(seed)
    std = math.sqrt(2.0 / (input_dim + codebook_dim))
    projection = torch.randn(num_codebooks, input_dim, codebook_dim, generator=g) * std
    codebook = F.normalize(torch.randn(num_codebooks, codebook_size, codebook_dim, generator=g), dim=-1)
    return projection, codebook


class BestRQTeacher(Teacher):
    """BEST-RQ labels of normalised, stacked log-mel frames: ``num_codebooks`` x ``codebook_size`` classes at 75 Hz."""

    name = "best-rq"
    description = "BEST-RQ: random projection + random codebook (8192 x 16) of normalised stacked log-mel frames (MusicFM's teacher)"
    fittable = True
    Options: ClassVar = BestRQOptions

    def __init__(self, options: BestRQOptions, geometry: FrameGeometry = STUDENT_GEOMETRY):
        super().__init__(options, geometry)
        self.fit_info: dict[str, Any] | None = None
        tensors = None
        if options.teacher_file is not None:
            meta, tensors = read_teacher_file(options.teacher_file, ARTIFACT_FORMAT, ARTIFACT_VERSION)
            check_artifact_header(meta, options.teacher_file, self.name, self.sample_rate, self.hop_samples)
            if options.seed is not None and options.seed != meta["seed"]:
                raise TeacherFileError(f"option seed={options.seed}, but teacher_file {options.teacher_file} was drawn with seed={meta['seed']}; drop the option or refit with it")
            self.options = adopt_settings(options, meta["features"])
            self.fit_info = meta
        o = self.options
        self.features = NormalisedMelStack(self.sample_rate, self.hop_samples, o.n_mels, o.n_fft, o.stack_frames)
        self.register_buffer("projection", torch.zeros(o.num_codebooks, self.features.dim, o.codebook_dim))
        self.register_buffer("codebook", torch.zeros(o.num_codebooks, o.codebook_size, o.codebook_dim))
        self._digest: str | None = None
        if tensors is not None:
            self._load(tensors, str(options.teacher_file))

    def feature_settings(self) -> dict[str, Any]:
        """The options that determine the labels besides the seed, JSON-ready."""
        return {k: v for k, v in self.options.model_dump(mode="json").items() if k not in MEL_FIT_FIELDS}

    def target_spec(self) -> TargetSpec:
        o = self.options
        return TargetSpec(kind="discrete", frame_rate_hz=self.frame_rate_hz, num_codebooks=o.num_codebooks, num_classes=o.codebook_size)

    def needs_fit(self) -> bool:
        return self._digest is None

    @torch.no_grad()
    def targets(self, wave: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, S)`` clean audio -> ``(B, T, num_codebooks)`` int64 labels, ``T`` the student's frame count."""
        if self.needs_fit():
            raise NotFittedError(
                f"teacher {self.name!r} has no per-bin statistics: pass options.teacher_file (made by "
                f"`mert teacher fit {self.name} --data AUDIO --out FILE`) or let `mert train` fit it"
            )
        x = self.features(wave)  # B, T, D
        with torch.autocast(wave.device.type, enabled=False):
            z = F.normalize(torch.einsum("btd,cde->btce", x, self.projection), dim=-1)  # B, T, C, d
            # unit vectors: the nearest entry is the one of highest cosine
            return torch.einsum("btce,cke->btck", z, self.codebook).argmax(-1)  # B, T, C

    def config_hash(self) -> str:
        """Hash of the name, rates, feature settings and the file's tensors (statistics, projection, codebook)."""
        if self.needs_fit():
            raise NotFittedError(f"teacher {self.name!r} is not fitted, so it has no configuration hash yet; fit it first")
        payload = f"{self.name}|{self.sample_rate}|{self.hop_samples}|{json.dumps(self.feature_settings(), sort_keys=True)}|{self._digest}"
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def fit(self, files: list[Path], out_file: Path, *, seed: int = 0, device: str | torch.device | None = None,
            progress: bool = True) -> Path:
        """Measure the per-bin log-mel statistics on a sample of ``files``, draw
        the random projection and codebook from the seed, save all to
        ``out_file`` and use them.

        Args:
            files: audio files, folders or manifests.
            out_file: the ``.safetensors`` artifact to write.
            seed: used unless ``options.seed`` is set.
            progress: show a progress bar.
            device: where to compute the features (default: the teacher's device).
        """
        o = self.options
        seed = o.seed if o.seed is not None else seed
        device = torch.device(device) if device is not None else module_device(self)
        started = time.perf_counter()
        plan = fit_sample(o, files, self.sample_rate, seed, progress)
        logmel = self.features.logmel.to(device)
        mean, std, frames, failures = measure_mel_stats(logmel, plan, self.sample_rate, o.batch_size, device, self.name, progress)
        self.features.logmel.to(module_device(self))
        projection, codebook = random_quantizers(o.num_codebooks, self.features.dim, o.codebook_dim, o.codebook_size, seed)
        plan.unusable.update(failures)
        meta = {
            **artifact_header(self, ARTIFACT_FORMAT, ARTIFACT_VERSION, self.feature_settings()),
            "seed": seed,
            "shapes": {"projection": list(projection.shape), "codebook": list(codebook.shape)},
            "stats_frames": frames,
            "fit": {k: v for k, v in o.model_dump(mode="json").items() if k in MEL_FIT_FIELDS - {"teacher_file", "seed"}},
            "seconds": round(time.perf_counter() - started, 3),
            "sample": plan.describe(),
        }
        tensors = {"bin_mean": mean, "bin_std": std, "projection": projection, "codebook": codebook}
        save_artifact(Path(out_file), ARTIFACT_FORMAT, tensors, meta)
        log.info("%s: per-bin statistics of %d frames (%.3g h), seed %d -> %s", self.name, frames, plan.sample_hours, seed, out_file)
        self.options = self.options.model_copy(update={"teacher_file": Path(out_file)})
        self.fit_info = meta
        self._load(tensors, str(out_file))
        return Path(out_file)

    def _load(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        want = {
            "bin_mean": self.features.bin_mean.shape, "bin_std": self.features.bin_std.shape,
            "projection": self.projection.shape, "codebook": self.codebook.shape,
        }
        for key, shape in want.items():
            got = tensors.get(key)
            if got is None or got.shape != shape:
                raise TeacherFileError(
                    f"teacher_file {source}: {key} has shape {None if got is None else tuple(got.shape)}, these options need {tuple(shape)}; the file is damaged, refit it"
                )
        self.features.set_stats(tensors["bin_mean"], tensors["bin_std"])
        self.projection.copy_(tensors["projection"])
        self.codebook.copy_(tensors["codebook"])
        self._digest = centroid_digest({k: tensors[k] for k in want})


@hookimpl
def register_teachers(register):
    register(BestRQTeacher)
