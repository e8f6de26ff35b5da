"""The musical teacher ``cqt``: the Constant-Q magnitude of the clean audio, as MERT regresses it.

The same numbers as nnAudio's ``CQT1992v2`` (fmin 32.7 Hz, 336 bins, 48 per
octave, hop 320, ``center=True``) from one FFT per clip and a sparse matrix of
folded kernels (:class:`FastCQT`), or from nnAudio itself (``backend='nnaudio'``).
How it works, what it matches and how fast it is: ``docs/cqt.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from mert_core.errors import ConfigError, NotFittedError, TeacherFileError
from mert_core.fitting import FittedTeacherOptions, measure_frame_stats, plan_sample, write_teacher_file
from mert_core.geometry import STUDENT_GEOMETRY, FrameGeometry
from mert_core.hookspecs import hookimpl
from mert_core.teacher import TargetSpec, Teacher

log = logging.getLogger("mert.teachers.cqt")

STATS_FORMAT = "mert-cqt-bin-stats"
"""Metadata key of a per-bin statistics file (JSON of the settings it was measured with)."""

SIDELOBES = 16
"""Side lobes kept either side of each kernel's main lobe, in window-bins (sr / kernel
length); the hann side lobes left out are below -85 dB. Measured against nnAudio on
synthetic music: relative error 2.5e-4 at 8, 5.8e-5 at 16, 1.2e-5 at 32 (2x the nonzeros)."""

MAX_FRAMES_PER_CHUNK = 2048
"""Longer clips are cut into overlapping chunks of this many frames (27 s at 75 Hz),
which bounds memory and the number of cached kernel sets."""


class CQTOptions(FittedTeacherOptions):
    fmin_hz: float = Field(32.7, gt=0, description="Centre frequency of the lowest bin in Hz (the MERT paper: 32.7 Hz, C1).")
    n_bins: int = Field(336, ge=1, description="Number of CQT bins = target size (the MERT paper: 336 = 7 octaves x 48).")
    bins_per_octave: int = Field(48, ge=1, description="Bins per octave (the MERT paper: 48).")
    pad_mode: Literal["constant", "reflect"] = Field(
        "constant",
        description="How the clip is extended past its ends so border frames are centred (nnAudio center=True): "
        "'constant' (zeros, what MERT's code uses) or 'reflect' (nnAudio's default; needs clips longer than half "
        "the lowest bin's kernel, ~1.05 s at the paper's settings).",
    )
    compression: Literal["none", "log1p", "log"] = Field(
        "none",
        description="'none': the CQT magnitude, as MERT regresses it (default). 'log1p': log(1 + magnitude), "
        "which barely compresses (music's CQT magnitudes are mostly below 1). 'log': log(magnitude + log_floor), "
        "which spreads the MSE over every octave instead of the loud bass bins (not in the paper; the 'cpu' recipe's).",
    )
    log_floor: float = Field(
        1e-3, gt=0, description="With compression='log': added to the magnitude before the log (1e-3 = -60 dB "
        "below a full-scale sine's ~1), so silence gives a finite target.",
    )
    normalize: Literal["none", "per-bin"] = Field(
        "none",
        description="'none': the (compressed) magnitude as is (the paper). 'per-bin': standardise each bin with the mean "
        "and std measured on the training audio (fitted once, like k-means: `mert train` does it before training, or "
        "`mert teacher fit cqt --set normalize=per-bin`), so every bin weighs the same in the MSE and targets start "
        "near 0 (not in the paper; the 'cpu' recipe's).",
    )
    teacher_file: Path | None = Field(
        None, description="With normalize='per-bin': the per-bin statistics made by fitting (safetensors); set by "
        "`mert train` after it fits them.",
    )
    stats_hours: float = Field(0.5, gt=0, description="With normalize='per-bin': hours of training audio (random 5 s chunks) the statistics are measured on.")
    backend: Literal["native", "nnaudio"] = Field(
        "native",
        description="Who computes the CQT magnitude: 'native' (mert's one-FFT CQT, ~100x faster on CPU) or 'nnaudio' "
        "(nnAudio.features.CQT1992v2 itself, the reference 'native' reproduces to ~1e-4). Same bins, hop and padding; "
        "compression and normalisation follow either way.",
    )


# -- kernel geometry (nnAudio's create_cqt_kernels, filter_scale=1, norm=1) ----------


def cqt_frequencies(fmin_hz: float, n_bins: int, bins_per_octave: int) -> np.ndarray:
    """``(n_bins,)`` centre frequencies in Hz: ``fmin * 2 ** (k / bins_per_octave)``."""
    return fmin_hz * 2.0 ** (np.arange(n_bins) / float(bins_per_octave))


def cqt_kernel_lengths(freqs_hz: np.ndarray, sample_rate: int, bins_per_octave: int) -> np.ndarray:
    """``(n_bins,)`` kernel lengths in samples: ``ceil(Q * sr / f)``, Q = 1 / (2^(1/bpo) - 1)."""
    q = 1.0 / (2.0 ** (1.0 / bins_per_octave) - 1.0)
    return np.ceil(q * sample_rate / freqs_hz).astype(np.int64)


def _kernel_spectrum(freq_bins: np.ndarray, n_fft: int, nu: np.ndarray, length: np.ndarray, offset: int) -> np.ndarray:
    """Spectra of conjugated nnAudio kernels, evaluated on ``freq_bins``.

    All arguments but ``n_fft`` and ``offset`` are arrays of one shape
    (``nu`` = frequency / sample rate); returns that shape, complex128.

    The kernel is ``h[m] = w[m + c] exp(-2 pi i nu m) / sum(w)`` for
    ``m in [-c, length - c)``, ``c = ceil(length / 2)``, ``w`` the periodic hann
    window; we return ``sum_m h[m] exp(2 pi i f (m + offset) / n_fft)``, where
    ``offset`` moves the frame centre to where the padded clip puts it.
    """
    length = length.astype(np.float64)
    theta = freq_bins / n_fft - nu
    # The hann window is 0.5 - 0.25 e^{2 pi i n/L} - 0.25 e^{-2 pi i n/L}, so the sum is
    # three Dirichlet kernels D(x) = sum_{n<L} e^{2 pi i n x} = e^{i pi (L-1) x} R(x) with
    # R(x) = sin(pi L x) / sin(pi x), at x = theta and theta -/+ 1/L. Their phases differ
    # by constants, which leaves 0.5 R(theta) + 0.25 e^{-+ i pi/L} R(theta +- 1/L).
    numerator = np.sin(np.pi * length * theta)

    def ratio(sign: float, x: np.ndarray) -> np.ndarray:  # R(x); sin(pi L x) = sign * numerator
        den = np.sin(np.pi * x)
        out = sign * numerator / np.where(np.abs(den) < 1e-9, 1.0, den)
        near = np.abs(den) < 1e-9  # x is (close to) an integer: the limit L cos(pi L x) / cos(pi x)
        out[near] = (length * np.cos(np.pi * length * x) / np.cos(np.pi * x))[near]
        return out

    r0, r_up, r_down = ratio(1.0, theta), ratio(-1.0, theta + 1 / length), ratio(-1.0, theta - 1 / length)
    cos_l, sin_l = np.cos(np.pi / length), np.sin(np.pi / length)
    window_sum = 0.5 * r0 + 0.25 * cos_l * (r_up + r_down) + 0.25j * sin_l * (r_down - r_up)
    # e^{i pi (L-1) theta} from D, e^{-2 pi i c theta} from centring, e^{2 pi i f offset / N}
    centre = np.ceil(length / 2)
    angle = np.pi * (length - 1 - 2 * centre) * theta + 2 * np.pi * ((freq_bins * offset) % n_fft) / n_fft
    return window_sum * (np.cos(angle) + 1j * np.sin(angle)) / (length / 2.0)  # sum(w) = L / 2 (L1 norm)


def checked_frequencies(sample_rate: int, fmin_hz: float, n_bins: int, bins_per_octave: int) -> np.ndarray:
    """:func:`cqt_frequencies`, refused unless the top bin lies below the Nyquist frequency."""
    freqs_hz = cqt_frequencies(fmin_hz, n_bins, bins_per_octave)
    if freqs_hz[-1] >= sample_rate / 2:
        raise ConfigError(
            f"cqt options: the top bin ({freqs_hz[-1]:.1f} Hz from fmin_hz={fmin_hz}, n_bins={n_bins}, "
            f"bins_per_octave={bins_per_octave}) must lie below the Nyquist frequency ({sample_rate / 2:g} Hz); "
            f"lower n_bins or fmin_hz"
        )
    return freqs_hz


class FastCQT(torch.nn.Module):
    """nnAudio's CQT1992v2 magnitude, from one FFT and a sparse matrix of folded kernels.

    Stateless apart from a cache of kernel matrices (one per FFT size and
    device, built on first use, ~0.5 s), so checkpoints hold nothing of it.

    Args:
        sample_rate: sample rate of the input in Hz.
        hop_samples: frame hop in samples.
        fmin_hz, n_bins, bins_per_octave: the bins (as nnAudio's ``CQT``).
        pad_mode: ``"constant"`` or ``"reflect"`` (nnAudio ``center=True``).

    Shapes:
        input ``(B, S)`` float; output ``(B, n_bins, S // hop_samples)`` float32.
    """

    def __init__(self, sample_rate: int = 24000, hop_samples: int = 320, fmin_hz: float = 32.7, n_bins: int = 336,
                 bins_per_octave: int = 48, pad_mode: str = "constant"):
        super().__init__()
        self.sample_rate, self.hop_samples, self.pad_mode = sample_rate, hop_samples, pad_mode
        self.freqs_hz = checked_frequencies(sample_rate, fmin_hz, n_bins, bins_per_octave)
        self.lengths = cqt_kernel_lengths(self.freqs_hz, sample_rate, bins_per_octave)
        # frame t reads samples [t*hop - ceil(L/2), t*hop + L - ceil(L/2)); pad so the lowest bin fits
        self.pad_samples = int(math.ceil(self.lengths.max() / 2))
        self._cache: OrderedDict[tuple[int, str], torch.Tensor] = OrderedDict()

    @property
    def n_bins(self) -> int:
        return len(self.freqs_hz)

    def extra_repr(self) -> str:
        return (f"sample_rate={self.sample_rate}, hop_samples={self.hop_samples}, n_bins={self.n_bins}, "
                f"fmin_hz={self.freqs_hz[0]:g}, pad_mode={self.pad_mode!r}")

    def _fold_matrix(self, m: int, device: torch.device) -> torch.Tensor:
        """Kernels times fold for an FFT of ``m * hop`` samples, built once per (m, device).

        Returns:
            sparse CSR ``(n_bins * m, n_fft // 2 + 1)`` complex64: row ``k * m + a``
            sums the rfft bins ``f = a (mod m)`` of bin ``k``'s band, each
            weighted by the kernel's spectrum there.
        """
        key = (m, str(device))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        n_fft = m * self.hop_samples
        num_freqs = n_fft // 2 + 1  # a real clip's spectrum is known from f >= 0
        # the band: main lobe (2 window-bins) + side lobes, n_fft / L FFT bins per window-bin.
        # Clipped to [0, n_fft / 2]: the kernel's mirror image at negative frequencies
        # is as far below the side lobes we keep.
        centre = self.freqs_hz / self.sample_rate * n_fft
        half = (SIDELOBES + 2) * n_fft / self.lengths
        first = np.clip(np.floor(centre - half), 0, num_freqs - 1).astype(np.int64)
        last = np.clip(np.ceil(centre + half), 0, num_freqs - 1).astype(np.int64)
        widths = last - first + 1
        k = np.repeat(np.arange(self.n_bins), widths)  # nnz: the bin of each entry
        freq_bins = np.arange(widths.sum()) - np.repeat(np.cumsum(widths) - widths, widths) + first[k]
        nu, lengths = self.freqs_hz[k] / self.sample_rate, self.lengths[k]
        # librosa normalisation (nnAudio's default) multiplies by sqrt(L); the fold by 1 / hop
        values = np.sqrt(lengths) / self.hop_samples * _kernel_spectrum(freq_bins, n_fft, nu, lengths, self.pad_samples)
        rows = k * m + freq_bins % m
        # CSR by hand: a stable sort by row keeps each row's columns ascending, and no
        # (row, column) pair repeats, so there is nothing to coalesce
        order = np.argsort(rows, kind="stable")
        row_starts = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=self.n_bins * m))])
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            matrix = torch.sparse_csr_tensor(
                torch.from_numpy(row_starts), torch.from_numpy(freq_bins[order]),
                torch.from_numpy(values[order].astype(np.complex64)), (self.n_bins * m, num_freqs),
            ).to(device)
        self._cache[key] = matrix
        while len(self._cache) > 8:  # clips of many lengths: keep the recent ones
            self._cache.popitem(last=False)
        return matrix

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """Magnitude CQT.

        Args:
            wave: ``(B, S)`` waveforms.

        Returns:
            ``(B, n_bins, S // hop_samples)`` float32.
        """
        if wave.dim() != 2:
            raise ValueError(f"cqt: expected a (batch, samples) waveform, got shape {tuple(wave.shape)}")
        with torch.autocast(device_type=wave.device.type, enabled=False):
            return self._magnitude(wave.float())

    def _magnitude(self, x: torch.Tensor) -> torch.Tensor:
        batch, samples = x.shape
        hop, pad = self.hop_samples, self.pad_samples
        num_frames = samples // hop
        if num_frames == 0 or batch == 0:
            return x.new_zeros((batch, self.n_bins, num_frames))
        if self.pad_mode == "reflect" and samples <= pad:
            raise ConfigError(
                f"cqt: pad_mode='reflect' needs clips longer than {pad} samples "
                f"({pad / self.sample_rate:.2f} s, half the lowest bin's kernel), got {samples}; "
                f"use pad_mode='constant' (MERT's choice) or longer clips"
            )
        # chunk c holds frames [c*C, c*C + C); frame t of a chunk is centred at t*hop + pad
        # of the padded clip, and reads at most pad samples either side of that
        chunk_frames = min(num_frames, MAX_FRAMES_PER_CHUNK)
        num_chunks = -(-num_frames // chunk_frames)
        m = _fft_friendly(chunk_frames - 1 + -(-(2 * pad + 1) // hop))
        n_fft = m * hop
        total = (num_chunks - 1) * chunk_frames * hop + n_fft
        # samples past the last frame's window are never read, so the right end is
        # padded with zeros or cut (a negative pad) to fill whole chunks
        if self.pad_mode == "reflect":
            x = F.pad(x.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
            x = F.pad(x, (0, total - x.shape[1]))
        else:
            x = F.pad(x, (pad, total - samples - pad))
        chunks = x.unfold(1, n_fft, chunk_frames * hop).reshape(batch * num_chunks, n_fft)

        spec = torch.fft.rfft(chunks.T, dim=0)  # N//2 + 1, B*nc: frequency first for the matmul
        folded = self._fold_matrix(m, x.device) @ spec  # K*M, B*nc
        frames = torch.fft.ifft(folded.view(self.n_bins, m, -1), dim=1)[:, :chunk_frames].abs()  # K, C, B*nc
        frames = frames.view(self.n_bins, chunk_frames, batch, num_chunks).permute(2, 0, 3, 1)
        return frames.reshape(batch, self.n_bins, num_chunks * chunk_frames)[..., :num_frames]


class NnAudioCQT(torch.nn.Module):
    """nnAudio's ``CQT1992v2`` magnitude (``backend='nnaudio'``), shaped like :class:`FastCQT`'s.

    The reference :class:`FastCQT` reproduces, at nnAudio's cost (every bin
    convolved with the lowest bin's kernel). nnAudio's extra last frame is
    dropped, so both backends give ``S // hop_samples`` frames.

    Args: as :class:`FastCQT`.

    Shapes:
        input ``(B, S)`` float; output ``(B, n_bins, S // hop_samples)`` float32.
    """

    def __init__(self, sample_rate: int = 24000, hop_samples: int = 320, fmin_hz: float = 32.7, n_bins: int = 336,
                 bins_per_octave: int = 48, pad_mode: str = "constant"):
        super().__init__()
        from nnAudio.features import CQT1992v2

        checked_frequencies(sample_rate, fmin_hz, n_bins, bins_per_octave)
        self.hop_samples, self.n_bins = hop_samples, n_bins
        self.layer = CQT1992v2(sr=sample_rate, hop_length=hop_samples, fmin=fmin_hz, n_bins=n_bins, bins_per_octave=bins_per_octave,
                               window="hann", center=True, pad_mode=pad_mode, output_format="Magnitude", verbose=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_frames = x.shape[1] // self.hop_samples
        if num_frames == 0 or x.shape[0] == 0:
            return x.new_zeros((x.shape[0], self.n_bins, num_frames))
        return self.layer(x.float())[..., :num_frames]  # B, K, T


BACKENDS = {"native": FastCQT, "nnaudio": NnAudioCQT}
"""The ``backend`` option's values: classes taking FastCQT's arguments."""


def _fft_friendly(n: int) -> int:
    """The smallest 5-smooth integer >= n (FFT sizes with factors 2, 3, 5 are fast)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p = p35
            while p < n:
                p *= 2
            best = min(best, p)
            p35 *= 3
        p5 *= 5
    return best


class CQTTeacher(Teacher):
    """Constant-Q magnitude spectrum of the clean audio (MERT's musical teacher)."""

    name = "cqt"
    description = "Constant-Q spectrum of the clean audio, 336 bins at 75 Hz, MSE target (MERT's musical teacher)"
    Options = CQTOptions
    fittable = True  # with normalize='per-bin'

    def __init__(self, options: CQTOptions, geometry: FrameGeometry = STUDENT_GEOMETRY):
        super().__init__(options, geometry)
        self.cqt = BACKENDS[options.backend](self.sample_rate, self.hop_samples, options.fmin_hz, options.n_bins, options.bins_per_octave, options.pad_mode)
        # per-bin statistics of normalize='per-bin' (identity until fitted or loaded)
        self.register_buffer("bin_mean", torch.zeros(options.n_bins), persistent=False)
        self.register_buffer("bin_std", torch.ones(options.n_bins), persistent=False)
        if options.normalize == "per-bin" and options.teacher_file is not None:
            self._load_stats(Path(options.teacher_file))

    # -- per-bin statistics (normalize='per-bin') --------------------------------------

    def needs_fit(self) -> bool:
        return self.options.normalize == "per-bin" and self.options.teacher_file is None

    def _stats_settings(self) -> dict:
        """Everything the statistics depend on: a file made with other settings is refused."""
        keys = ("fmin_hz", "n_bins", "bins_per_octave", "pad_mode", "compression", "log_floor")
        return {"sample_rate": self.sample_rate, "hop_samples": self.hop_samples, **{k: getattr(self.options, k) for k in keys}}

    @torch.no_grad()
    def fit(self, files: list[Path], out_file: Path, *, seed: int = 0, device: str | torch.device | None = None,
            progress: bool = True) -> Path:
        """Measure each bin's mean and std of the (compressed) CQT on ``stats_hours``
        of random 5 s chunks of ``files``, save them to ``out_file`` and use them.

        Args:
            files: audio files, folders or manifests.
            out_file: the ``.safetensors`` file to write.
            seed: seed of the chunk sample.
            progress: show a progress bar.
            device: where to compute the CQT (default: the teacher's device).
        """
        device = torch.device(device) if device is not None else self.bin_mean.device
        plan = plan_sample(files, self.sample_rate, 5.0, 1.0, self.options.stats_hours, seed, progress)
        mean, std, frames, _ = measure_frame_stats(self._compressed, plan, self.sample_rate, 8, device, "cqt", progress, min_std=1e-6)
        meta = {**self._stats_settings(), "frames": frames, "hours": plan.sample_hours, "seed": seed}
        tensors = {"bin_mean": mean.float().contiguous(), "bin_std": std.float().contiguous()}
        write_teacher_file(Path(out_file), tensors, STATS_FORMAT, meta, quality=(), teacher=self.name)  # statistics: nothing to get worse
        log.info("cqt: per-bin statistics of %d frames (%.3g h) -> %s", frames, plan.sample_hours, out_file)
        self.options = self.options.model_copy(update={"teacher_file": Path(out_file)})
        self._load_stats(Path(out_file))
        return Path(out_file)

    def _load_stats(self, path: Path) -> None:
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        if not path.is_file():
            raise TeacherFileError(f"teacher 'cqt' option teacher_file {path}: no such file; fit it with `mert teacher fit cqt --set normalize=per-bin --data AUDIO --out {path}`")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get(STATS_FORMAT, "null"))
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise TeacherFileError(f"teacher 'cqt' option teacher_file {path}: cannot read it ({exc}); fit it again") from None
        if meta is None or set(tensors) != {"bin_mean", "bin_std"}:
            raise TeacherFileError(f"teacher 'cqt' option teacher_file {path}: not a file of CQT per-bin statistics; fit one with `mert teacher fit cqt`")
        mine = self._stats_settings()
        for key, value in mine.items():
            if meta.get(key) != value:
                raise TeacherFileError(f"teacher 'cqt' option teacher_file {path}: measured with {key}={meta.get(key)!r}, this run uses {value!r}; fit it again for this run")
        self.bin_mean.copy_(tensors["bin_mean"])
        self.bin_std.copy_(tensors["bin_std"])

    def _compressed(self, wave: torch.Tensor) -> torch.Tensor:
        """``(B, T, K)`` CQT magnitude after ``compression``, float32."""
        with torch.autocast(device_type=wave.device.type, enabled=False):
            mag = self.cqt(wave.float()).transpose(1, 2)  # B, T, K
            if self.options.compression == "log1p":
                mag = torch.log1p(mag)
            elif self.options.compression == "log":
                mag = torch.log(mag + self.options.log_floor)
        return mag

    def config_hash(self) -> str:
        """The base hash; ``backend`` counts only when it is not the default (hashes made before it existed still match)."""
        options = self.options.model_dump_json(exclude={"backend"} if self.options.backend == "native" else None)
        payload = f"{self.name}|{self.sample_rate}|{self.hop_samples}|{options}"
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def advice(self) -> list[str]:
        """The two target settings that made the CQT learnable at CPU scale (docs/learning.md), when not yet set."""
        tips = []
        if self.options.compression != "log":
            tips.append("teacher.cqt.compression=log")
        if self.options.normalize != "per-bin":
            tips.append("teacher.cqt.normalize=per-bin")
        return tips

    def target_spec(self) -> TargetSpec:
        return TargetSpec(kind="continuous", dim=self.options.n_bins, frame_rate_hz=self.frame_rate_hz, default_weight=1.0)

    @torch.no_grad()
    def targets(self, wave: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """CQT targets.

        Args:
            wave: ``(B, S)`` clean waveforms at ``sample_rate``.

        Returns:
            ``(B, S // hop_samples, n_bins)`` float32, even under autocast.
        """
        # a regression target: float32 whatever the run's precision (FFTs and
        # sums of many small terms lose the spectrum's quiet bins in bf16)
        mag = self._compressed(wave)
        if self.options.normalize == "per-bin":
            if self.needs_fit():
                raise NotFittedError("teacher 'cqt' with normalize='per-bin' has no statistics: pass option teacher_file (made by `mert teacher fit cqt`)")
            mag = (mag - self.bin_mean) / self.bin_std
        return mag.contiguous()


@hookimpl
def register_teachers(register):
    register(CQTTeacher)
