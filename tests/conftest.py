"""Shared fixtures: fake installed distributions, generated music files."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch


def threads(preferred: int) -> int:
    """Intra-op threads for the tests: ``MERT_TEST_THREADS`` when set, else ``preferred``.

    Results must not depend on the thread count (README, "Tests"); the variable
    reruns the suite under another one, overriding the modules that pin 1 thread.
    """
    value = os.environ.get("MERT_TEST_THREADS", "")
    if not value:
        return preferred
    if not value.isdigit() or int(value) < 1:
        raise pytest.UsageError(f"MERT_TEST_THREADS must be a positive integer, got {value!r}; unset it or use e.g. 1 or 2")
    return int(value)


def pytest_configure(config):
    torch.set_num_threads(threads(2))  # here, so that a bad MERT_TEST_THREADS is one line, not a traceback


# Labels computed with other batch shapes, lengths, thread counts or kernels agree up to near-ties
# (README, "Tests"; docs/rvq_vae_mixup.md, "Batching"; docs/kmeans.md, "Caveats"): a differing label
# must lie this close to the boundary of its two candidates, relative to the norm of its features
# (measured float differences of features: up to 7e-7) ...
TIE_MARGIN = 1e-5
# ... and at most this fraction of the frames may differ (measured: 0 to 1 frame in 225).
MAX_FLIPPED_FRAMES = 0.02


def tie_margin(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """How far ``x`` is from the hyperplane halfway between codewords ``a`` and ``b``.

    The nearest codeword of ``x`` can switch between ``a`` and ``b`` under a
    perturbation of ``x`` this large and no smaller; float64.

    Args:
        x, a, b: ``(D,)`` vectors.
    """
    x, a, b = x.double(), a.double(), b.double()
    return float(abs(((x - a) ** 2).sum() - ((x - b) ** 2).sum()) / (2 * (a - b).norm()))


def assert_kmeans_labels_equal_up_to_ties(teacher, wave: torch.Tensor, want: torch.Tensor, got: torch.Tensor) -> None:
    """k-means labels ``got`` equal ``want`` but where a frame's features lie at a near-tie.

    Each stream's differing label must be a near-tie for the features of
    ``want``'s path: within ``TIE_MARGIN`` x |features| of the hyperplane
    halfway between the two centroids. At most ``MAX_FLIPPED_FRAMES`` differ.

    Args:
        teacher: a fitted k-means teacher.
        wave: ``(B, S)`` the audio ``want`` was computed from, clip by clip.
        want, got: ``(B, T, C)`` targets (a product label is split into its streams).
    """
    assert got.shape == want.shape
    flipped = (got != want).any(-1)  # B, T
    assert flipped.float().mean() <= MAX_FLIPPED_FRAMES, f"{int(flipped.sum())} of {flipped.numel()} frames differ"
    if not flipped.any():
        return
    streams = teacher.streams()  # name -> K, in the order the targets combine them
    if want.shape[-1] == len(streams):
        split = {name: (want[..., i], got[..., i]) for i, name in enumerate(streams)}
    else:  # one product codebook: label = ((l0 * K1) + l1) * K2 + ...
        split, w, g = {}, want[..., 0], got[..., 0]
        for name, k in reversed(streams.items()):
            split[name], w, g = (w % k, g % k), w // k, g // k
    for name, (w, g) in split.items():
        with torch.no_grad():
            features = torch.cat([teacher.extractors[name](clip[None]) for clip in wave])  # B, T, D
        centroids = teacher.codebooks[name].centroids
        for b, t in (w != g).nonzero().tolist():
            x = features[b, t]
            margin = tie_margin(x, centroids[w[b, t]], centroids[g[b, t]]) / float(x.norm())
            assert margin <= TIE_MARGIN, (
                f"{name} clip {b} frame {t}: label {int(w[b, t])} became {int(g[b, t])}, "
                f"{margin:.1e} x |features| from a tie (allowed: {TIE_MARGIN:g})"
            )


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets a private cache (manifests, demo data, features)."""
    cache = tmp_path_factory.getbasetemp() / "mert-cache"
    monkeypatch.setenv("MERT_CACHE", str(cache))


@pytest.fixture
def make_dist(tmp_path, monkeypatch):
    """Install a fake distribution (dist-info + modules) on sys.path, the way
    pip lays one out, so its ``mert`` entry points are found by importlib."""

    def make(name: str, version: str, entry_points: dict[str, str], modules: dict[str, str]) -> Path:
        site = tmp_path / f"site-{name}"
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(f"[mert]\n{eps}\n")
        for mod, source in modules.items():
            (site / f"{mod}.py").write_text(textwrap.dedent(source))
        monkeypatch.syspath_prepend(str(site))
        made.extend(modules)
        return site

    made: list[str] = []
    yield make
    for mod in made:  # the next test imports its own fresh copy
        sys.modules.pop(mod, None)


def music(seconds: float, sample_rate: int = 24000, seed: int = 0) -> np.ndarray:
    """A few seconds of music-like audio: chords of harmonic tones with a pulse."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    out = np.zeros_like(t)
    root = 110 * 2 ** (rng.integers(0, 12) / 12)
    for i, start in enumerate(np.arange(0, seconds, 0.5)):
        seg = (t >= start) & (t < start + 0.5)
        for interval in (0, 4 if i % 2 else 3, 7):
            f0 = root * 2 ** (interval / 12) * (2 if i % 4 == 3 else 1)
            for h in range(1, 5):
                out[seg] += 0.08 / h * np.sin(2 * np.pi * f0 * h * t[seg])
        out[seg] *= np.exp(-3 * (t[seg] - start))
    out += 0.01 * rng.standard_normal(len(t))
    return out.astype(np.float32)


@pytest.fixture
def music_dir(tmp_path) -> Path:
    """A folder of short real audio files (wav and flac, 24 and 44.1 kHz)."""
    folder = tmp_path / "music"
    (folder / "sub").mkdir(parents=True)
    sf.write(folder / "a.wav", music(6.0, 24000, 1), 24000)
    sf.write(folder / "b.flac", music(7.0, 24000, 2), 24000)
    sf.write(folder / "sub" / "c.wav", music(6.5, 44100, 3), 44100)
    stereo = np.stack([music(5.5, 24000, 4), music(5.5, 24000, 5)], axis=1)
    sf.write(folder / "sub" / "d.wav", stereo, 24000)
    return folder
