"""The extract/probe engine: feature cache, the batched probe grid against
reference implementations, and probes that must learn on real audio through
a third-party task plugin (clip-level multiclass, multilabel, regression)."""

from __future__ import annotations

import logging
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import threads
from mert_core.evaluation.extract import ExtractOptions, FeatureSet, _NpyAppender, extract
from mert_core.evaluation.probe import GridAdam, ProbeGrid, ProbeOptions, probe
from mert_core.evaluation.upstreams import HandcraftedUpstream
from mert_core.hookspecs import hookimpl
from mert_core.registry import load_registry
from mert_core.tasks import SPLITS, Example, Task, TaskOptions

SR = 24000
PITCH_CLASSES = (0, 4, 7, 9)  # C, E, G, A


# -- a third-party task plugin, written as an outside package would ---------------------

class ToneOptions(TaskOptions):
    data_dir: Path = ...


class ToneClassTask(Task):
    """Pitch class of a harmonic tone, 4 classes."""

    name = "tone-class"
    Options = ToneOptions
    problem = "multiclass"
    metrics = ("accuracy",)

    def labels(self):
        return ["C", "E", "G", "A"]

    def load_examples(self, split):
        rows = np.load(self.options.data_dir / f"{split}.npy", allow_pickle=True)
        return [Example(self.options.data_dir / r["file"], r["cls"]) for r in rows]


class ToneChordTask(ToneClassTask):
    """Which pitch classes sound (multi-label)."""

    name = "tone-chord"
    problem = "multilabel"
    metrics = ("roc_auc", "average_precision")

    def load_examples(self, split):
        rows = np.load(self.options.data_dir / f"{split}.npy", allow_pickle=True)
        return [Example(self.options.data_dir / r["file"], tuple(r["chord"])) for r in rows]


class ToneHeightTask(ToneClassTask):
    """Octave height of the tone (regression)."""

    name = "tone-height"
    problem = "regression"
    metrics = ("r2",)

    def labels(self):
        return ["octave"]

    def load_examples(self, split):
        rows = np.load(self.options.data_dir / f"{split}.npy", allow_pickle=True)
        return [Example(self.options.data_dir / r["file"], (float(r["octave"]),)) for r in rows]


@hookimpl
def register_tasks(register):
    for t in (ToneClassTask, ToneChordTask, ToneHeightTask):
        register(t)


tone_plugin = types.ModuleType("tone_tasks")
tone_plugin.register_tasks = register_tasks


def _tone(pcs, octave, seconds, rng) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    y = np.zeros_like(t)
    for pc in pcs:
        f0 = 65.4 * 2 ** (octave + pc / 12)
        for h in range(1, 4):
            y += 0.2 / h * np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 6.3))
    return (y / len(pcs) + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="module")
def tone_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tones")
    rng = np.random.default_rng(0)
    counts = {"train": 16, "valid": 8, "test": 8}
    for split, n in counts.items():
        rows = []
        for i in range(n):
            cls = i % 4
            chord = sorted({cls, int(rng.integers(0, 4))})
            octave = int(rng.integers(1, 4))
            file = f"{split}-{i}.wav"
            if i % 2:  # odd items: the class's tone alone
                chord = [cls]
            sf.write(root / file, _tone([PITCH_CLASSES[c] for c in chord], octave, 0.4, rng), SR)
            rows.append({"file": file, "cls": cls, "chord": chord, "octave": octave})
        np.save(root / f"{split}.npy", np.array(rows, dtype=object), allow_pickle=True)
    return root


@pytest.fixture(scope="module")
def registry():
    return load_registry(extra_plugins=[tone_plugin])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The probes here are tiny: on a shared 2-core machine a second intra-op
    thread only adds scheduling stalls (30x slower under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(threads(1))
    yield
    torch.set_num_threads(n)


SMALL = dict(hidden_units=32, lrs=[1e-3, 1e-2], max_epochs=30, patience=6, batch_size=8)


# -- storage ------------------------------------------------------------------------------

def test_npy_appender_writes_a_valid_npy(tmp_path):
    w = _NpyAppender(tmp_path / "a.npy", (3, 4), "float16")
    blocks = [np.random.default_rng(i).normal(size=(n, 3, 4)) for i, n in enumerate((2, 0, 5))]
    for b in blocks:
        w.append(b)
    w.close()
    back = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert back.shape == (7, 3, 4) and back.dtype == np.float16
    np.testing.assert_array_equal(back, np.concatenate(blocks).astype(np.float16))
    empty = _NpyAppender(tmp_path / "b.npy", (2,), "float32")
    empty.close()
    assert np.load(tmp_path / "b.npy").shape == (0, 2)


def test_features_are_cached_keyed_by_settings_and_reused(registry, tone_dir, tmp_path, caplog):
    task = registry.build("task", "tone-class", {"data_dir": tone_dir})
    up = HandcraftedUpstream()
    opts = ExtractOptions(audio_workers=2, batch_windows=5)
    with caplog.at_level(logging.INFO, logger="mert.evaluation"):
        first = extract(up, task, "valid", opts, cache_dir=tmp_path, progress=False)
        assert not first.reused and "extracting handcrafted" in caplog.text
        second = extract(up, task, "valid", opts, cache_dir=tmp_path, progress=False)
    assert second.reused and f"reusing cached features at {second.directory}" in caplog.text
    assert isinstance(second.features, np.memmap)
    np.testing.assert_array_equal(np.asarray(first.features), np.asarray(second.features))
    assert first.features.shape == (8, 4, 696) and first.layer_names == ["mfcc", "chroma", "cqt", "all"]
    # Reference: the same features computed directly, one file at a time.
    wave = sf.read(task.examples("valid")[3].path, dtype="float32")[0]
    np.testing.assert_allclose(first.item(3), up.clip_features([wave])[0], rtol=1e-5, atol=1e-5)
    # Nothing half-written is left behind; other settings get another folder.
    assert not [p for p in first.directory.parent.iterdir() if p.name.startswith(".")]
    other = extract(up, task, "valid", ExtractOptions(audio_workers=0, window_seconds=10), cache_dir=tmp_path, progress=False)
    assert not other.reused and other.directory != first.directory


# -- the grid against references ------------------------------------------------------------

def test_probe_grid_members_equal_plain_mlps():
    gen = torch.Generator().manual_seed(0)
    grid = ProbeGrid([0, 2, None], [8, 8, 8], hidden_units=16, num_outputs=3, dropout=0.2, generator=gen).eval()
    with torch.no_grad():
        grid.layer_logits.normal_()
    x = torch.randn(5, 3, 8)
    out = grid(x)
    weights = torch.softmax(grid.layer_logits[2], dim=0)
    for g, inp in enumerate([x[:, 0], x[:, 2], (x * weights[None, :, None]).sum(1)]):
        mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        with torch.no_grad():
            mlp[0].weight.copy_(grid.w1[g].T), mlp[0].bias.copy_(grid.b1[g, 0])
            mlp[2].weight.copy_(grid.w2[g].T), mlp[2].bias.copy_(grid.b2[g, 0])
        torch.testing.assert_close(out[g], mlp(inp))


def test_grid_adam_matches_torch_adam_per_member():
    torch.manual_seed(0)
    lrs = torch.tensor([1e-3, 1e-2, 5e-2])
    p = torch.nn.Parameter(torch.randn(3, 4, 5))
    refs = [torch.nn.Parameter(p[g].detach().clone()) for g in range(3)]
    adam = GridAdam([p], lrs, weight_decay=0.01)
    ref_opts = [torch.optim.Adam([r], lr=float(lrs[g]), weight_decay=0.01) for g, r in enumerate(refs)]
    for step in range(4):
        grad = torch.randn(3, 4, 5)
        p.grad = grad.clone()
        adam.step(torch.ones(3, dtype=torch.bool))
        for g in range(3):
            refs[g].grad = grad[g].clone()
            ref_opts[g].step()
    for g in range(3):
        torch.testing.assert_close(p[g].detach(), refs[g].detach())
    frozen = p.detach().clone()
    p.grad = torch.randn(3, 4, 5)
    adam.step(torch.tensor([True, False, True]))
    torch.testing.assert_close(p[1].detach(), frozen[1])
    assert not torch.equal(p[0].detach(), frozen[0])


# -- probes that must learn ------------------------------------------------------------------

def _features(registry, task_name, tone_dir, cache):
    task = registry.build("task", task_name, {"data_dir": tone_dir})
    up = HandcraftedUpstream()
    fs = {s: extract(up, task, s, ExtractOptions(audio_workers=0), cache_dir=cache, progress=False) for s in SPLITS}
    return task, fs


def test_multiclass_probe_learns_pitch_class_deterministically_from_ram_or_memmap(registry, tone_dir, tmp_path):
    task, fs = _features(registry, "tone-class", tone_dir, tmp_path)
    result = probe(task, fs["train"], fs["valid"], fs["test"], ProbeOptions(**SMALL), progress=False, upstream_name="handcrafted")
    assert result.metric == "accuracy" and result.test_score >= 0.75
    assert {m["layer"] for m in result.per_layer} == {"mfcc", "chroma", "cqt", "all"}  # no weighted sum: sizes differ
    assert len(result.members) == 4 * 2 and all(m["test"] is None for m in result.members if m not in result.per_layer)
    # The selected member is the best on validation, whatever its test score.
    assert result.best["valid"]["accuracy"] == max(m["valid"]["accuracy"] for m in result.members)
    # Reading batches from the memory map instead of RAM gives the same probes.
    again = probe(task, fs["train"], fs["valid"], fs["test"], ProbeOptions(**SMALL, max_memory_gb=1e-9), progress=False)
    assert again.best == result.best


def test_multilabel_and_regression_probes_learn(registry, tone_dir, tmp_path):
    task, fs = _features(registry, "tone-chord", tone_dir, tmp_path)
    result = probe(task, fs["train"], fs["valid"], fs["test"], ProbeOptions(**SMALL), progress=False)
    assert set(result.best["test"]) == {"roc_auc", "average_precision"} and result.test_score > 0.8

    task, fs = _features(registry, "tone-height", tone_dir, tmp_path)
    result = probe(task, fs["train"], fs["valid"], fs["test"], ProbeOptions(**SMALL), progress=False)
    assert result.metric == "r2" and result.test_score > 0.5


def test_weighted_sum_is_searched_when_layers_share_a_size(registry, tone_dir, tmp_path):
    """A feature set whose layers have one size: the grid adds the learned
    weighted sum, and its weights favour the one informative layer."""
    task, fs = _features(registry, "tone-class", tone_dir, tmp_path)
    rng = np.random.default_rng(0)
    for split, f in fs.items():  # layers: [noise, chroma stats, noise], all 72 wide
        chroma = np.asarray(f.features[:, 1, :72])
        stacked = np.stack([rng.normal(size=chroma.shape), chroma, rng.normal(size=chroma.shape)], axis=1).astype(np.float32)
        d = tmp_path / "same" / split
        d.mkdir(parents=True)
        np.save(d / "features.npy", stacked)
        np.save(d / "index.npy", f.index)
        meta = dict(f.meta, layer_names=["layer0", "layer1", "layer2"], layer_dims=[72, 72, 72])
        (d / "meta.json").write_text(__import__("json").dumps(meta))
        fs[split] = FeatureSet.open(d)
    result = probe(task, fs["train"], fs["valid"], fs["test"], ProbeOptions(**SMALL), progress=False)
    names = [m["layer"] for m in result.per_layer]
    assert names == ["layer0", "layer1", "layer2", "weighted-sum"]
    weights = result.layer_weights
    assert weights is not None and len(weights) == 3 and abs(sum(weights) - 1) < 1e-5
    assert weights[1] == max(weights)
    by_layer = {m["layer"]: m["test"]["accuracy"] for m in result.per_layer}
    assert by_layer["layer1"] > by_layer["layer0"] and by_layer["layer1"] > by_layer["layer2"]
