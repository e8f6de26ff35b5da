"""Shared fixtures: fake installed distributions, generated music files."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

torch.set_num_threads(2)


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
