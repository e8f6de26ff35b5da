"""The k-means family of acoustic teachers (MusicHuBERT, MERT-v0, HuBERT iteration 2).

* ``kmeans-mfcc``: MFCC + delta + delta-delta (13 -> 39 dims, or 20 -> 60),
  one codebook of K = 500 classes (the MERT paper tried 100, 500 and 2000).
* ``kmeans-logmel-chroma``: one clustering of log-mel frames (K = 300) and one
  of chroma frames (K = 200), combined into 300 x 200 = 60000 product classes
  as one target (the paper's way), or kept as two codebooks.
* ``kmeans-hidden``: k-means of one hidden layer of a trained ``mert``
  student (HuBERT's second iteration), K = 500 or 2000.

A k-means teacher is fitted once (:meth:`KMeansTeacher.fit`, ``mert teacher
fit``) into a self-describing safetensors file: centroids plus JSON metadata
(feature settings, sample and frame rate, inertia, the data sample it saw,
library versions). That one file serves every split. Targets are the index of
the nearest centroid of each frame, computed in torch on the training device.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from mert_core import fitting
from mert_core.errors import FitError, NotFittedError, TeacherFileError  # noqa: F401 - re-exported: the fit errors, raised here
from mert_core.fitting import (  # noqa: F401 - SamplePlan, Chunk, sample_batches: re-exported for older imports
    Chunk, FitQuality, FittedTeacherOptions, SamplePlan, adopt_settings, artifact_header, centroid_digest, check_artifact_header,
    measure_frame_stats, plan_sample, read_ahead, sample_batches, write_teacher_file,
)
from mert_core.geometry import STUDENT_GEOMETRY, FrameGeometry
from mert_core.hookspecs import hookimpl
from mert_core.teacher import TargetSpec, Teacher
from mert_plugins.teachers._features import (
    ChromaFeatures,
    FrameFeatures,
    HiddenStateFeatures,
    LogMelFeatures,
    MFCCFeatures,
)
from mert_plugins.teachers._streaming_kmeans import (
    TYPICAL_PASSES, Codebook, FeatureCache, KMeansResult, estimate_seconds, fit_kmeans, fit_minibatch_kmeans,
)

log = logging.getLogger("mert.teachers.kmeans")

ARTIFACT_FORMAT = "mert-kmeans-teacher"
ARTIFACT_VERSION = 1


# -- options ------------------------------------------------------------------------


DEFAULT_SAMPLE_HOURS = 4.0
"""Default bound on the fit sample: 1.08 M frames at 75 Hz, over 2000 per
cluster at K = 500 (fairseq's HuBERT recipe fits on 10 % of the corpus)."""


class KMeansFitOptions(FittedTeacherOptions):
    """Options shared by the k-means teachers: where the fit is (``teacher_file``), and how to make one."""

    sample_fraction: float = Field(1.0, gt=0, le=1, description="Fraction of the audio to fit on, drawn at random in chunks (seeded).")
    sample_hours: float | None = Field(
        DEFAULT_SAMPLE_HOURS, gt=0,
        description="Upper bound on the hours of audio to fit on (keeps the fit's cost flat as the corpus grows); None: no bound beyond sample_fraction.",
    )
    chunk_seconds: float = Field(5.0, gt=0, description="The fit sample is drawn as chunks of this length (5 s = the training crop).")
    batch_size: int = Field(16, ge=1, description="Chunks per feature batch while fitting.")
    init_frames: int | None = Field(
        None, ge=1, description="Frames held in memory for k-means++ and the first Lloyd iterations (a random subsample); None: 100 per cluster, at most 256 MB."
    )
    n_init: int = Field(1, ge=1, description="k-means++ restarts on the in-memory subsample; the lowest inertia wins.")
    max_iter: int = Field(100, ge=1, description="Lloyd iterations per restart on the in-memory subsample.")
    max_passes: int = Field(50, ge=1, description="Exact Lloyd passes streamed over all sampled frames afterwards, at most.")
    tol: float = Field(1e-4, ge=0, description="Stop when the squared centroid shift is <= tol x mean feature variance (scikit-learn's rule).")
    inertia_tol: float = Field(
        2e-4, ge=0, description="Also stop when a Lloyd pass lowers the inertia by <= this fraction (0: tol only; see docs/kmeans.md for what it costs)."
    )
    seed: int | None = Field(None, description="Seed of the sample and the initialisation; None: the seed passed to fit() (the run's seed).")
    backend: Literal["native", "sklearn"] = Field(
        "native", description="Who clusters the fit sample: 'native' (mert's bounded-memory torch k-means, on the fit device) or "
        "'sklearn' (scikit-learn's MiniBatchKMeans on the CPU, the sample held in memory; n_init, max_iter and tol apply). "
        "Either way targets are the nearest centroid.",
    )
    cache_dir: Path | None = Field(
        None, description="Folder for the temporary on-disk feature cache while fitting (4 bytes x dims x 75 per second of sample); None: the system temp folder."
    )


FIT_FIELDS = frozenset(KMeansFitOptions.model_fields)
"""Options that only steer fitting; the rest (feature settings, K) determine the targets."""


class MFCCOptions(KMeansFitOptions):
    n_clusters: int = Field(500, ge=2, description="K (the MERT paper tried 100, 500 and 2000; 2000 was best for music).")
    n_mfcc: int = Field(13, ge=1, description="Cepstral coefficients: 13 -> 39 dims with deltas (MusicHuBERT), 20 -> 60.")
    n_mels: int = Field(64, ge=1, description="Mel bands under the MFCC.")
    n_fft: int = Field(1024, ge=400, description="STFT window (hann), centred on each student frame.")
    deltas: bool = Field(True, description="Append delta and delta-delta coefficients.")


class LogMelChromaOptions(KMeansFitOptions):
    n_clusters_logmel: int = Field(300, ge=2, description="K of the log-mel clustering (MERT-v0: 300).")
    n_clusters_chroma: int = Field(200, ge=2, description="K of the chroma clustering (MERT-v0: 200).")
    combine: Literal["product", "separate"] = Field(
        "product", description="product: one target of logmel x chroma classes (MERT-v0: 60000); separate: two codebooks."
    )
    n_mels: int = Field(128, ge=1, description="Mel bands of the log-mel features.")
    n_fft: int = Field(1024, ge=400, description="STFT window of the log-mel features.")
    n_chroma: int = Field(12, ge=2, description="Pitch classes of the chroma features.")
    chroma_n_fft: int = Field(2048, ge=400, description="STFT window of the chroma features (finer frequency resolution for low notes).")


class HiddenOptions(KMeansFitOptions):
    checkpoint: Path | None = Field(
        None, description="Trained student: run folder, .pt checkpoint or student.safetensors. Needed to fit; taken from teacher_file otherwise."
    )
    layer: int | None = Field(
        None, ge=0, description="Hidden state to cluster: 0 = transformer input, i = output of layer i; None: the middle layer (6 of 12, as HuBERT's second iteration)."
    )
    n_clusters: int = Field(500, ge=2, description="K (HuBERT: 500; 2000 for music in the MERT paper).")


# -- the fit sample -----------------------------------------------------------------


def read_teacher_file(
    path: str | Path, artifact_format: str = ARTIFACT_FORMAT, format_version: int = ARTIFACT_VERSION
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a fitted k-means teacher: ``(metadata, tensors)`` with ``{"centroids.<stream>": (K, D)}``
    (:func:`mert_core.fitting.read_teacher_file` with this teacher's format)."""
    return fitting.read_teacher_file(path, artifact_format, format_version)


# -- the teachers -----------------------------------------------------------------------


class KMeansTeacher(Teacher):
    """Base of the k-means teachers: one or more feature *streams*, each with
    its extractor and its codebook; the labels of the streams make the targets.

    Subclasses define ``streams`` (name -> K), ``_extractors()`` and, with
    more than one stream, ``_combine``.
    """

    Options: ClassVar[type[KMeansFitOptions]] = KMeansFitOptions
    fittable = True

    def __init__(self, options: KMeansFitOptions, geometry: FrameGeometry = STUDENT_GEOMETRY):
        super().__init__(options, geometry)
        self.fit_info: dict[str, Any] | None = None
        tensors = None
        if options.teacher_file is not None:
            meta, tensors = read_teacher_file(options.teacher_file)
            self._check_artifact(meta, tensors)
            self.options = self._adopt_settings(meta)
            self.fit_info = meta
        self.extractors = nn.ModuleDict(self._extractors())
        self.codebooks = nn.ModuleDict()
        self._digest: str | None = None
        if tensors is not None:
            self._load_centroids(tensors)

    # -- what subclasses say --------------------------------------------------------------

    def streams(self) -> dict[str, int]:
        """Feature stream name -> number of clusters."""
        raise NotImplementedError

    def _extractors(self) -> dict[str, FrameFeatures]:
        raise NotImplementedError

    def _combine(self, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-stream ``(B, T)`` labels -> ``(B, T, C)`` targets."""
        (only,) = labels.values()
        return only.unsqueeze(-1)

    def feature_settings(self) -> dict[str, Any]:
        """The options that determine the targets (everything but fitting knobs), JSON-ready."""
        data = self.options.model_dump(mode="json")
        return {k: v for k, v in data.items() if k not in FIT_FIELDS}

    # -- the contract -----------------------------------------------------------------------

    def target_spec(self) -> TargetSpec:
        return TargetSpec(kind="discrete", frame_rate_hz=self.frame_rate_hz, num_codebooks=1, num_classes=math.prod(self.streams().values()))

    def needs_fit(self) -> bool:
        return len(self.codebooks) == 0

    @torch.no_grad()
    def targets(self, wave: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, S)`` clean audio -> ``(B, T, C)`` int64 labels, ``T = floor((S - 400) / hop) + 1``."""
        if self.needs_fit():
            raise NotFittedError(
                f"teacher {self.name!r} has no centroids: pass options.teacher_file (made by "
                f"`mert teacher fit {self.name} --data AUDIO --out FILE`) or let `mert train` fit it"
            )
        labels = {name: self.codebooks[name](self.extractors[name](wave)) for name in self.streams()}
        return self._combine(labels)

    def config_hash(self) -> str:
        """Hash of the teacher name, rates, feature settings and the fitted centroids.

        The path of the teacher file and the fitting knobs are left out: a
        moved copy of the same fit makes the same labels.
        """
        if self.needs_fit():
            raise NotFittedError(f"teacher {self.name!r} is not fitted, so it has no configuration hash yet; fit it first")
        settings = json.dumps(self._identity(), sort_keys=True)
        payload = f"{self.name}|{self.sample_rate}|{self.hop_samples}|{settings}|{self._digest}"
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def _identity(self) -> dict[str, Any]:
        return self.feature_settings()

    # -- fitting ------------------------------------------------------------------------------

    def fit(self, files: list[Path], out_file: Path, *, seed: int = 0, device: str | torch.device | None = None,
            progress: bool = True) -> Path:
        """Fit every stream's codebook on a sample of ``files``, save the
        artifact to ``out_file`` (atomically) and load it into this teacher.

        Memory stays bounded: features go to a temporary on-disk cache; RAM
        holds one batch of audio, ``init_frames`` frames and the centroids.

        Args:
            files: audio files, folders or manifests.
            out_file: the ``.safetensors`` artifact to write.
            seed: used unless ``options.seed`` is set.
            progress: show progress bars.
            device: where to compute; None: the teacher's device, or CUDA
                when the teacher is on the CPU and a GPU is available (the
                teacher is moved back afterwards).
        """
        original = self._device()
        self.to(self._fit_device(device))
        try:
            return self._fit(files, Path(out_file), seed, progress)
        finally:
            self.to(original)

    def _fit_device(self, device: str | torch.device | None) -> torch.device:
        if device is not None:
            return torch.device(device)
        device = self._device()
        if device.type == "cpu" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return device

    def fit_plan(self, files: list[Path], *, seed: int = 0, device: str | torch.device | None = None) -> str:
        """What :meth:`fit` will read and about how long it will take.

        The time is a model calibrated here: a few of the sample's own chunks
        read and featurised, and one timed nearest-centroid block per stream (see
        :func:`~mert_plugins.teachers._streaming_kmeans.estimate_seconds`).
        """
        opts = self.options
        seed = opts.seed if opts.seed is not None else seed
        device = self._fit_device(device)
        plan = plan_sample(files, self.sample_rate, opts.chunk_seconds, opts.sample_fraction, opts.sample_hours, seed, progress=False)
        original = self._device()
        self.to(device)
        try:
            feature_seconds = self._time_features(plan, device) * plan.sample_hours * 3600
        finally:
            self.to(original)
        frames = int(plan.sample_hours * 3600 * self.frame_rate_hz)
        passes = min(opts.max_passes, TYPICAL_PASSES) if opts.inertia_tol > 0 else opts.max_passes
        kmeans_seconds = sum(
            estimate_seconds(max(frames, k), self.extractors[name].dim, k, n_init=opts.n_init, init_frames=opts.init_frames,
                             max_iter=opts.max_iter, max_passes=passes, device=device)
            for name, k in self.streams().items()
        )
        total = feature_seconds + kmeans_seconds
        return (
            f"on {plan.sample_hours:.3g} h of {plan.total_hours:.3g} h (sample_hours={opts.sample_hours}, sample_fraction={opts.sample_fraction}), "
            f"about {_duration(total)} on {device} (features {_duration(feature_seconds)}, k-means {_duration(kmeans_seconds)}; an estimate)"
        )

    def _time_features(self, plan: SamplePlan, device: torch.device, num_chunks: int = 16) -> float:
        """Seconds to read and featurise one second of the sample: timed on
        ``num_chunks`` of its own chunks.
        Decoding and resampling are most of it (on 14 h of Ogg Vorbis/Opus
        game music, about 3x the MFCC itself); noise alone would miss that."""
        # runs of consecutive chunks from files spread over the plan, read as the fit reads them
        # (one file opened per run, then sequential reads): single chunks overestimated by half
        run = 4
        step = max(run, len(plan.chunks) // max(1, num_chunks // run))
        picked = [c for start in range(0, len(plan.chunks), step) for c in plan.chunks[start : start + run]][:num_chunks]
        chunk = round(self.options.chunk_seconds * self.sample_rate)
        with torch.no_grad():
            for ext in self.extractors.values():  # warm-up
                ext(torch.zeros(1, chunk // 4, device=device))
            t0, seconds = time.perf_counter(), 0.0
            for _, wave in read_ahead(picked, self.sample_rate, ahead=len(picked)):  # read as the fit reads
                if isinstance(wave, Exception):
                    continue  # the fit will skip and name it
                for ext in self.extractors.values():
                    ext(torch.from_numpy(wave)[None].to(device))
                seconds += len(wave) / self.sample_rate
        return (time.perf_counter() - t0) / seconds if seconds else 0.0

    def _fit(self, files: list[Path], out_file: Path, seed: int, progress: bool) -> Path:
        opts = self.options
        seed = opts.seed if opts.seed is not None else seed
        device = self._device()
        started = time.perf_counter()
        plan = plan_sample(files, self.sample_rate, opts.chunk_seconds, opts.sample_fraction, opts.sample_hours, seed, progress)
        log.info(
            "%s: fitting on %.3g h of %.3g h (%d chunks of %g s from %d of %d files; sample_fraction=%g, sample_hours=%s, seed=%d)",
            self.name, plan.sample_hours, plan.total_hours, len(plan.chunks), opts.chunk_seconds,
            len({c.path for c in plan.chunks}), plan.total_files, opts.sample_fraction, opts.sample_hours, seed,
        )
        read_failures: dict[str, str] = {}
        cache_dir = Path(opts.cache_dir) if opts.cache_dir is not None else None
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="mert-kmeans-", dir=cache_dir) as tmp:
            caches = {name: FeatureCache(Path(tmp) / f"{name}.f32", ext.dim) for name, ext in self.extractors.items()}
            try:
                # 1. features of the sample, batched, into the caches
                used_chunks = []
                for kept, batch in sample_batches(plan, self.sample_rate, opts.batch_size, device, read_failures, self.name, progress):
                    with torch.no_grad():
                        for name, ext in self.extractors.items():
                            caches[name].append(ext(batch).reshape(-1, ext.dim))
                    used_chunks += kept
                for cache in caches.values():
                    cache.finish()
                feature_seconds = time.perf_counter() - started
                log.info(
                    "%s: %d frames cached (%.1f MB on disk), %d files failed to decode",
                    self.name, next(iter(caches.values())).rows, sum(c.nbytes for c in caches.values()) / 1e6, len(read_failures),
                )
                # 2. one k-means per stream
                results: dict[str, KMeansResult] = {}
                for name, k in self.streams().items():
                    if opts.backend == "sklearn":
                        results[name] = fit_minibatch_kmeans(
                            caches[name], k, seed=seed + sum(map(ord, name)), n_init=opts.n_init, max_iter=opts.max_iter,
                            tol=opts.tol, name=f"{self.name}/{name}",
                        )
                    else:
                        results[name] = fit_kmeans(
                            caches[name], k, seed=seed + sum(map(ord, name)), n_init=opts.n_init, init_frames=opts.init_frames,
                            max_iter=opts.max_iter, max_passes=opts.max_passes, tol=opts.tol, inertia_tol=opts.inertia_tol,
                            device=device, progress=progress,
                            name=f"{self.name}/{name}",
                        )
                    r = results[name]
                    log.info(
                        "%s/%s: K=%d, inertia %.6g per frame over %d frames (%d streamed passes, %s)",
                        self.name, name, k, r.mean_inertia, r.num_frames, r.passes, "converged" if r.converged else "stopped at max_passes",
                    )
            finally:
                for cache in caches.values():
                    cache.close()

        plan.chunks = sorted(used_chunks, key=lambda c: (c.path, c.offset_samples))
        plan.unusable.update(read_failures)
        tensors = {f"centroids.{name}": r.centroids.contiguous() for name, r in results.items()}
        meta = {
            **artifact_header(self, ARTIFACT_FORMAT, ARTIFACT_VERSION, self.feature_settings()),
            "identity": self._identity(),
            "streams": {
                name: {
                    "num_clusters": r.centroids.shape[0],
                    "dim": r.centroids.shape[1],
                    "inertia": r.inertia,
                    "inertia_per_frame": r.mean_inertia,
                    "num_frames": r.num_frames,
                    "init_frames": r.init_frames,
                    "init_inertia_per_frame": r.init_inertia,
                    "streamed_passes": r.passes,
                    "converged": r.converged,
                    "inertia_per_frame_by_pass": r.history,
                    "relocated_empty_clusters": r.relocated,
                    "subsample_iterations": r.subsample_iterations,
                    "full_distance_passes": round(r.recomputed, 3),
                    "seconds": r.seconds,
                }
                for name, r in results.items()
            },
            "fit": {
                **{k: v for k, v in opts.model_dump(mode="json").items() if k in FIT_FIELDS and k != "teacher_file"},
                "seed": seed,
                "device": str(device),
                "seconds": round(time.perf_counter() - started, 3),
                "feature_seconds": round(feature_seconds, 3),
            },
            "sample": plan.describe(),
        }
        out_file = Path(out_file)
        quality = [
            FitQuality(f"inertia per frame (stream {name})", r.history[0] if r.history else None, r.mean_inertia,
                       advice="a non-finite inertia means non-finite features: check the audio and the feature options")
            for name, r in results.items()
        ]  # history[0]: the initial centroids on the whole sample
        write_teacher_file(out_file, tensors, ARTIFACT_FORMAT, meta, quality, self.name)
        log.info("%s: saved %s (%.1f s)", self.name, out_file, time.perf_counter() - started)
        self.options = self.options.model_copy(update={"teacher_file": out_file})
        self.fit_info = meta
        self._load_centroids(tensors)
        return out_file

    # -- loading ---------------------------------------------------------------------------

    def _device(self) -> torch.device:
        for t in itertools.chain(self.buffers(), self.parameters()):
            return t.device
        return torch.device("cpu")

    def _load_centroids(self, tensors: dict[str, torch.Tensor]) -> None:
        device = self._device()
        self.codebooks = nn.ModuleDict({name: Codebook(tensors[f"centroids.{name}"]).to(device) for name in self.streams()})
        self._digest = centroid_digest({f"centroids.{name}": tensors[f"centroids.{name}"] for name in self.streams()})

    def _check_artifact(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        path = self.options.teacher_file
        check_artifact_header(meta, path, self.name, self.sample_rate, self.hop_samples)
        for name, info in meta.get("streams", {}).items():
            t = tensors.get(f"centroids.{name}")
            if t is None or tuple(t.shape) != (info["num_clusters"], info["dim"]):
                got = None if t is None else tuple(t.shape)
                raise TeacherFileError(
                    f"teacher_file {path}: centroids.{name} has shape {got}, metadata says {(info['num_clusters'], info['dim'])}; the file is damaged, refit it"
                )

    def _adopt_settings(self, meta: dict[str, Any]) -> KMeansFitOptions:
        """The options with the artifact's feature settings (see :func:`adopt_settings`)."""
        return adopt_settings(self.options, meta.get("features", {}), self._overridable_settings())

    def _overridable_settings(self) -> set[str]:
        """Settings an explicit option may change with respect to the teacher file."""
        return set()


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class MFCCKMeansTeacher(KMeansTeacher):
    """k-means of MFCC + delta + delta-delta frames (MusicHuBERT): one codebook of K classes."""

    name = "kmeans-mfcc"
    description = "k-means of MFCC+deltas (13 -> 39 dims), K=500 (the MERT paper tried 100/500/2000): MusicHuBERT's acoustic teacher"
    Options = MFCCOptions

    def streams(self) -> dict[str, int]:
        return {"mfcc": self.options.n_clusters}

    def _extractors(self) -> dict[str, FrameFeatures]:
        o = self.options
        return {"mfcc": MFCCFeatures(self.sample_rate, self.hop_samples, n_mfcc=o.n_mfcc, n_mels=o.n_mels, n_fft=o.n_fft, deltas=o.deltas)}


class LogMelChromaKMeansTeacher(KMeansTeacher):
    """Two k-means, on log-mel (K=300) and on chroma (K=200) frames (MERT-v0).

    ``combine="product"`` gives one codebook of ``300 x 200 = 60000`` classes,
    ``label = logmel * K_chroma + chroma``. ``combine="separate"`` gives two
    codebooks (log-mel first) that share ``num_classes = max(K_logmel,
    K_chroma)``; chroma labels then use only the first ``K_chroma`` classes.
    """

    name = "kmeans-logmel-chroma"
    description = "k-means of log-mel (K=300) x chroma (K=200) = 60000 product classes: MERT-v0's acoustic teacher"
    Options = LogMelChromaOptions

    def streams(self) -> dict[str, int]:
        return {"logmel": self.options.n_clusters_logmel, "chroma": self.options.n_clusters_chroma}

    def _extractors(self) -> dict[str, FrameFeatures]:
        o = self.options
        return {
            "logmel": LogMelFeatures(self.sample_rate, self.hop_samples, n_mels=o.n_mels, n_fft=o.n_fft),
            "chroma": ChromaFeatures(self.sample_rate, self.hop_samples, n_chroma=o.n_chroma, n_fft=o.chroma_n_fft),
        }

    def target_spec(self) -> TargetSpec:
        k = self.streams()
        if self.options.combine == "product":
            return TargetSpec(kind="discrete", frame_rate_hz=self.frame_rate_hz, num_codebooks=1, num_classes=k["logmel"] * k["chroma"])
        return TargetSpec(kind="discrete", frame_rate_hz=self.frame_rate_hz, num_codebooks=2, num_classes=max(k.values()))

    def _overridable_settings(self) -> set[str]:
        return {"combine"}  # how the two codebooks make targets does not change the fit

    def _combine(self, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.options.combine == "product":
            return (labels["logmel"] * self.options.n_clusters_chroma + labels["chroma"]).unsqueeze(-1)
        return torch.stack([labels["logmel"], labels["chroma"]], dim=-1)


class HiddenKMeansTeacher(KMeansTeacher):
    """k-means of one hidden layer of a trained student (HuBERT's second iteration).

    The student is loaded with :func:`mert_core.checkpoint.load_student` and
    runs in eval mode on the teacher's device. The fitted file records the
    checkpoint's content id; a different checkpoint is refused.
    """

    name = "kmeans-hidden"
    description = "k-means of a trained student's hidden layer, K=500 or 2000 (HuBERT's second iteration)"
    Options = HiddenOptions

    def __init__(self, options: HiddenOptions, geometry: FrameGeometry = STUDENT_GEOMETRY):
        self._checkpoint_id: str | None = None
        super().__init__(options, geometry)
        if self.fit_info is not None:
            want = self.fit_info.get("identity", {}).get("checkpoint_id")
            if want != self._checkpoint_id:
                raise TeacherFileError(
                    f"teacher_file {self.options.teacher_file} was fitted on checkpoint id {want}, but checkpoint "
                    f"{self.options.checkpoint} has id {self._checkpoint_id}; pass the checkpoint it was fitted on, or refit"
                )

    def streams(self) -> dict[str, int]:
        return {"hidden": self.options.n_clusters}

    def _extractors(self) -> dict[str, FrameFeatures]:
        from mert_core.checkpoint import load_student

        ckpt = self.options.checkpoint
        if ckpt is None:
            raise TeacherFileError(
                "kmeans-hidden: option 'checkpoint' is required (a trained student: run folder, .pt or student.safetensors)"
            )
        if not Path(ckpt).exists():
            raise TeacherFileError(f"kmeans-hidden: option checkpoint={str(ckpt)!r}: no such file or folder; pass a trained student")
        student, info = load_student(ckpt, "cpu")
        for p in student.parameters():
            p.requires_grad_(False)
        self._checkpoint_id = info["checkpoint_id"]
        layer = self.options.layer if self.options.layer is not None else student.num_layers // 2
        if layer > student.num_layers:
            raise TeacherFileError(
                f"kmeans-hidden: option layer={layer}, but checkpoint {ckpt} has {student.num_layers} layers "
                f"(hidden states 0..{student.num_layers}); pick one of those"
            )
        if student.sample_rate != self.sample_rate or student.hop_samples != self.hop_samples:
            raise TeacherFileError(
                f"kmeans-hidden: checkpoint {ckpt} reads {student.sample_rate} Hz audio with hop {student.hop_samples}, "
                f"this run uses {self.sample_rate} Hz and hop {self.hop_samples}"
            )
        self.options = self.options.model_copy(update={"layer": layer})  # the artifact records the layer actually used
        return {"hidden": HiddenStateFeatures(student, layer, self.hop_samples, dim=student.embed_dim)}

    def _identity(self) -> dict[str, Any]:
        # the checkpoint by content, not by path: a copied run folder is the same teacher
        settings = {k: v for k, v in self.feature_settings().items() if k != "checkpoint"}
        return {**settings, "checkpoint_id": self._checkpoint_id}

    def _overridable_settings(self) -> set[str]:
        return {"checkpoint"}  # another path to the same checkpoint is fine: compared by content id in __init__


@hookimpl
def register_teachers(register):
    register(MFCCKMeansTeacher)
    register(LogMelChromaKMeansTeacher)
    register(HiddenKMeansTeacher)
