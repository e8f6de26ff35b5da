"""Upstreams: the feature extractors that the probe compares.

An upstream turns waveforms into features of every "layer":

- :class:`StudentUpstream` wraps a ``MertStudent`` (a mert checkpoint, a
  randomly initialised student, or a Hugging Face HuBERT/MERT folder): layer
  0 is the transformer's input, layer ``i`` the output of block ``i``.
- :class:`HandcraftedUpstream` is MARBLE's handcrafted baseline: MFCC,
  chroma and CQT, one "layer" per feature family plus their concatenation.

Every upstream has a stable ``id`` (a content hash of every file it is built
from, or the seed of its random weights): feature caches are keyed by it, with
the extraction settings and :data:`FEATURES_VERSION`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from mert_core.errors import BadInputError

log = logging.getLogger("mert.evaluation")

FEATURES_VERSION = 1
"""The version of the code that turns audio into features (windows, lead, pooling, the
handcrafted families): bump it when a change here changes the numbers an upstream
makes; feature caches are keyed by it."""


class Upstream:
    """Base class: a named, identified feature extractor.

    Attributes:
        id: stable cache key.
        name: display name in tables and plots.
        kind: "checkpoint", "random", "hf" or "handcrafted".
        sample_rate: rate the waveforms must have.
        frame_rate_hz: rate of frame-level features.
        layer_names: one per layer.
        layer_dims: feature size of each layer; features are stored padded
            with zeros to ``max(layer_dims)``.
    """

    id: str = ""
    name: str = ""
    kind: str = ""
    sample_rate: int = 24000
    frame_rate_hz: float = 75.0
    layer_names: list[str] = []
    layer_dims: list[int] = []

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def dim(self) -> int:
        return max(self.layer_dims)

    def layer_dims_for(self, level: str) -> list[int]:
        """Layer sizes of ``"clip"`` or ``"frame"`` features."""
        return list(self.layer_dims)

    def clip_features(self, waves: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Clip-level features.

        Args:
            waves: mono float32 waveforms ``(S_i,)`` at ``sample_rate``.

        Returns:
            one ``(L, D)`` float32 array per wave.
        """
        raise NotImplementedError

    def frame_features(self, waves: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Frame-level features: one ``(T_i, L, D)`` float32 array per wave."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "kind": self.kind, "layers": self.layer_names,
                "layer_dims": self.layer_dims, "sample_rate": self.sample_rate, "frame_rate_hz": self.frame_rate_hz}


# -- students ----------------------------------------------------------------------

class StudentUpstream(Upstream):
    """Features of every hidden state of a frozen ``MertStudent``.

    Long audio is cut into ``window_seconds`` windows (MARBLE: 30 s). Each
    window reads a few extra samples (the conv stack's receptive field minus
    one hop) so that it yields exactly ``window_seconds * frame_rate_hz``
    frames and the windows' frames tile the file without gap or overlap.
    Clip features are the mean over all frames of the file, i.e. the average
    of the windows' means weighted by their frame counts.

    Args:
        student: a ``MertStudent`` (put in eval mode here).
        id: cache key, e.g. the checkpoint's content hash.
        name: display name.
        kind: "checkpoint", "random" or "hf".
        device: where the student runs.
        window_seconds: window length for long audio.
        batch_windows: windows per forward pass.
        pad_batches: let windows of different lengths share a padded batch;
            None: on a GPU only (see :meth:`_batches`).
    """

    def __init__(self, student, id: str, name: str, kind: str = "checkpoint", device: str | torch.device = "cpu",
                 window_seconds: float = 30.0, batch_windows: int = 8, pad_batches: bool | None = None):
        self.student = student.to(device).eval()
        self.device = torch.device(device)
        self.id, self.name, self.kind = id, name, kind
        self.hop_samples = int(student.hop_samples)
        self.lead_samples = student.geometry.lead_samples
        self.sample_rate = int(getattr(student, "sample_rate", 24000))
        self.frame_rate_hz = self.sample_rate / self.hop_samples
        self.window_frames = max(1, int(round(window_seconds * self.frame_rate_hz)))
        self.window_samples = self.window_frames * self.hop_samples
        # Extra samples a window needs to yield window_frames frames (receptive field - hop).
        self.extra_samples = next(e for e in range(0, 64 * self.hop_samples) if student.num_frames(self.window_samples + e) >= self.window_frames)
        self.min_samples = next(s for s in range(1, 64 * self.hop_samples) if student.num_frames(s) >= 1)
        self.batch_windows = batch_windows
        self.pad_batches = self.device.type != "cpu" if pad_batches is None else pad_batches
        with torch.no_grad():
            probe = self._forward([np.zeros(self.min_samples + 4 * self.hop_samples, dtype=np.float32)])[0]
        num_layers, dim = probe.shape[1], probe.shape[2]
        self.layer_names = [f"layer{i}" for i in range(num_layers)]
        self.layer_dims = [dim] * num_layers

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(window_seconds=self.window_frames / self.frame_rate_hz, model_args=getattr(self.student, "args", None))
        return out

    def _segments(self, wave: np.ndarray) -> list[np.ndarray]:
        if self.lead_samples:  # frame t centred near t * hop + hop / 2, whatever the receptive field
            wave = np.pad(wave, (self.lead_samples, 0))
        segments = []
        for start in range(0, max(len(wave), 1), self.window_samples):
            seg = wave[start:start + self.window_samples + self.extra_samples]
            if len(seg) >= self.min_samples:
                segments.append(seg)
        if not segments:  # shorter than one frame: pad so that it yields one
            segments.append(np.pad(wave, (0, self.min_samples - len(wave))))
        return segments

    @torch.no_grad()
    def _forward(self, segments: list[np.ndarray], pooled: bool = False) -> list:
        """Run segments in one padded batch.

        Returns:
            per segment ``(T_i, L, D)`` float32 frames; with ``pooled``, the
            pair ``((L, D)`` float32 sum over its frames, ``T_i)`` instead.
        """
        lengths = torch.tensor([len(s) for s in segments], dtype=torch.long)
        wave = torch.zeros(len(segments), int(lengths.max()))
        for i, s in enumerate(segments):
            wave[i, : len(s)] = torch.from_numpy(np.asarray(s, dtype=np.float32))
        out = self.student(wave.to(self.device), lengths=lengths.to(self.device), output_hidden_states=True)
        frames = [int(self.student.num_frames(int(n))) for n in lengths]
        if pooled:
            # Clip features need only sums over valid frames: one (B, 1, T) x (B, T, D) product per
            # layer, instead of stacking every frame of every layer (B x T x L x D: 480 MB for
            # 8 x 20 s with 95M) and copying it out.
            T = out.hidden_states[0].shape[1]
            valid = (torch.arange(T, device=self.device)[None] < torch.tensor(frames, device=self.device)[:, None]).float()[:, None]  # B, 1, T
            sums = torch.stack([torch.bmm(valid, h.float())[:, 0] for h in out.hidden_states], dim=1).cpu()  # B, L, D
            return [(sums[i].numpy(), frames[i]) for i in range(len(segments))]
        hidden = torch.stack(list(out.hidden_states), dim=2).float().cpu()  # B, T, L, D
        return [hidden[i, : frames[i]].numpy() for i in range(len(segments))]

    def _batches(self, order: list[int], lengths: list[int]) -> list[list[int]]:
        """Split length-sorted windows into forward batches of at most ``batch_windows``.

        On a GPU windows of different lengths share a padded batch: padding is
        cheap beside the parallelism. On a CPU a batch brings no parallelism,
        and padding costs the masked paths (GroupNorm over valid samples only,
        attention with a mask): 8 padded clips of 10-20 s ran at 0.42x a plain
        HubertModel loop, one at a time at 1.15x (benchmarks/bench_extract.py).
        So on a CPU only windows of equal length (the full windows of long
        files) are batched, unless ``pad_batches`` says otherwise.
        """
        if self.pad_batches:
            return [order[i:i + self.batch_windows] for i in range(0, len(order), self.batch_windows)]
        batches: list[list[int]] = []
        for k, n in zip(order, lengths):
            if batches and len(batches[-1]) < self.batch_windows and batches[-1][-1][1] == n:
                batches[-1].append((k, n))
            else:
                batches.append([(k, n)])
        return [[k for k, _ in b] for b in batches]

    def _frames_per_wave(self, waves: Sequence[np.ndarray], pooled: bool = False):
        """Yield ``(wave index, segment features)`` in order, batching windows across waves
        (``pooled``: the segment's ``(sum over frames, frame count)``, see :meth:`_forward`)."""
        queue: list[tuple[int, np.ndarray]] = []
        for i, w in enumerate(waves):
            queue.extend((i, s) for s in self._segments(np.asarray(w, dtype=np.float32)))
        # Sort by length within the call so that padding is small; results are regrouped by wave.
        order = sorted(range(len(queue)), key=lambda k: len(queue[k][1]))
        results: dict[int, np.ndarray] = {}
        for chunk in self._batches(order, [len(queue[k][1]) for k in order]):
            for k, feats in zip(chunk, self._forward([queue[k][1] for k in chunk], pooled)):
                results[k] = feats
        for k in range(len(queue)):
            yield queue[k][0], results.pop(k)

    def clip_features(self, waves):
        sums = [None] * len(waves)
        counts = [0] * len(waves)
        for i, (s, n) in self._frames_per_wave(waves, pooled=True):
            s = s.astype(np.float64)
            sums[i] = s if sums[i] is None else sums[i] + s
            counts[i] += n
        return [(s / max(c, 1)).astype(np.float32) for s, c in zip(sums, counts)]

    def frame_features(self, waves):
        parts: list[list[np.ndarray]] = [[] for _ in waves]
        for i, feats in self._frames_per_wave(waves):
            parts[i].append(feats)
        return [np.concatenate(p, axis=0) for p in parts]


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _display_name(path: Path) -> str:
    path = Path(path)
    if path.is_dir():
        return path.name
    if path.stem in ("last", "student") or path.stem.startswith("step"):
        return f"{path.parent.name}/{path.stem}"
    return path.stem


def checkpoint_upstream(path: str | Path, device: str = "cpu", name: str | None = None, **kwargs) -> StudentUpstream:
    """A mert checkpoint (run folder, ``.pt`` or ``student.safetensors``)."""
    from mert_core.checkpoint import load_student

    student, info = load_student(path, device=device)
    kind = "hf" if str(info["checkpoint_id"]).startswith("hf-") else "checkpoint"
    return StudentUpstream(student, id=str(info["checkpoint_id"]), name=name or _display_name(Path(path)), kind=kind, device=device, **kwargs)


def hf_upstream(folder: str | Path, device: str = "cpu", name: str | None = None, **kwargs) -> StudentUpstream:
    """A Hugging Face ``HubertModel`` folder (e.g. a local copy of m-a-p/MERT-v1-95M).

    Raises:
        ValueError: the folder holds no ``config.json``.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise BadInputError(f"--hf-model {folder}: expected a Hugging Face model folder with config.json and model.safetensors "
                         f"or pytorch_model.bin (save_pretrained output or a downloaded snapshot)")
    from mert_core.convert import hf_fingerprint, load_hf_hubert

    student = load_hf_hubert(folder)
    return StudentUpstream(student, id=hf_fingerprint(folder), name=name or folder.name, kind="hf", device=device, **kwargs)


def random_upstream(like: Any = "tiny", seed: int = 0, device: str = "cpu", name: str | None = None, **kwargs) -> StudentUpstream:
    """A randomly initialised student: the floor every pretrained one must beat.

    Args:
        like: a ``MertStudent`` (same size), its ``args`` dict, or a preset
            name ("tiny", "cpu", "95m", "330m").
        seed: initialisation seed; with the architecture it makes the id, so
            the same random student is reused from the feature cache.
    """
    from mert_core import model as model_lib

    if isinstance(like, str):
        args, label = model_lib.student_args(like), like  # ValueError names the valid presets
    elif isinstance(like, dict):
        args, label = like, "student"
    else:
        args, label = like.args, "student"
    # fork_rng: the seed must not disturb the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = model_lib.MertStudent.from_args(args)
    uid = "random-" + _digest({"args": args, "seed": seed})
    return StudentUpstream(student, id=uid, name=name or f"random-{label}", kind="random", device=device, **kwargs)


# -- handcrafted ---------------------------------------------------------------------

class HandcraftedUpstream(Upstream):
    """MARBLE's handcrafted baseline: MFCC, chroma and CQT.

    Per frame (75 Hz, hop 320 at 24 kHz): 20 MFCCs with deltas and
    delta-deltas (60), 12 chroma bins (from the CQT), an 84-bin log-CQT
    (C1 = 32.7 Hz, 12 bins per octave). Per clip, as in MARBLE's
    handcrafted extractor: for each family, the mean and standard deviation
    over time of the feature and of its first and second differences (6 x
    dim: MFCC 120, chroma 72, CQT 504). The "layers" are the three families
    and their concatenation ("all"); smaller ones are zero-padded.
    """

    kind = "handcrafted"
    FAMILIES = ("mfcc", "chroma", "cqt")

    def __init__(self, sample_rate: int = 24000, hop_samples: int = 320, n_mfcc: int = 20, cqt_bins: int = 84):
        self.sample_rate, self.hop_samples = sample_rate, hop_samples
        self.frame_rate_hz = sample_rate / hop_samples
        self.n_mfcc, self.cqt_bins = n_mfcc, cqt_bins
        self.id = "handcrafted-" + _digest({"sr": sample_rate, "hop": hop_samples, "mfcc": n_mfcc, "cqt": cqt_bins, "v": 1})
        self.name = "handcrafted"
        self.layer_names = [*self.FAMILIES, "all"]
        self._frame_dims = [3 * n_mfcc, 12, cqt_bins]
        self._clip_dims = [6 * n_mfcc, 6 * 12, 6 * cqt_bins]

    @property
    def layer_dims(self) -> list[int]:  # the clip-level sizes (frame-level ones are smaller)
        return [*self._clip_dims, sum(self._clip_dims)]

    def _families(self, wave: np.ndarray) -> list[np.ndarray]:
        """``[(T, n_mfcc), (T, 12), (T, cqt_bins)]`` raw frame features (MFCC without deltas)."""
        import warnings

        import librosa

        y = np.asarray(wave, dtype=np.float32)
        min_len = 2048  # librosa's n_fft; shorter input is zero-padded
        if len(y) < min_len:
            y = np.pad(y, (0, min_len - len(y)))
        mfcc = librosa.feature.mfcc(y=y, sr=self.sample_rate, n_mfcc=self.n_mfcc, hop_length=self.hop_samples)
        with warnings.catch_warnings():
            # Short clips: librosa warns that its low octaves' FFTs exceed the (downsampled) input.
            warnings.simplefilter("ignore", UserWarning)
            cqt = np.abs(librosa.cqt(y, sr=self.sample_rate, hop_length=self.hop_samples, fmin=32.7, n_bins=self.cqt_bins, bins_per_octave=12))
        chroma = librosa.feature.chroma_cqt(C=cqt, sr=self.sample_rate, hop_length=self.hop_samples, bins_per_octave=12)
        log_cqt = librosa.amplitude_to_db(cqt, ref=1.0, top_db=None)
        t = min(mfcc.shape[1], cqt.shape[1], chroma.shape[1])
        return [mfcc[:, :t].T, chroma[:, :t].T, log_cqt[:, :t].T]

    def frame_features(self, waves):
        import librosa

        out = []
        for wave in waves:
            mfcc, chroma, cqt = self._families(wave)
            deltas = [librosa.feature.delta(mfcc.T, order=o, mode="nearest").T for o in (1, 2)]
            fams = [np.concatenate([mfcc, *deltas], axis=1), chroma, cqt]
            fams.append(np.concatenate(fams, axis=1))
            width = fams[-1].shape[1]
            x = np.zeros((mfcc.shape[0], len(fams), width), dtype=np.float32)
            for j, f in enumerate(fams):
                x[:, j, : f.shape[1]] = f
            out.append(x)
        return out

    def clip_features(self, waves):
        out = []
        for wave in waves:
            stats = []
            for f in self._families(wave):
                moments = []
                for n in range(3):
                    d = np.diff(f, n=n, axis=0) if f.shape[0] > n else np.zeros((1, f.shape[1]))
                    moments += [d.mean(axis=0), d.std(axis=0)]
                stats.append(np.concatenate(moments))
            stats.append(np.concatenate(stats))
            x = np.zeros((len(stats), len(stats[-1])), dtype=np.float32)
            for j, s in enumerate(stats):
                x[j, : len(s)] = s
            out.append(x)
        return out

    def layer_dims_for(self, level: str) -> list[int]:
        dims = self._frame_dims if level == "frame" else self._clip_dims
        return [*dims, sum(dims)]
