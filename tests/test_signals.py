"""Learning signals: explained variance, class perplexity, feature spread, the
collapse warnings, and their place in a real training run's outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mert_core import api
from mert_core.registry import load_registry
from mert_core.signals import CollapseWatch, class_perplexity, explained_variance, feature_signals, target_signals
from mert_core.teacher import IGNORE_LABEL, TargetSpec


def _targets(n=200, dim=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-2, 1, dim)  # bins of very different loudness, like a CQT
    return torch.rand(n, dim, generator=g) * scale + scale


def test_predicting_the_mean_explains_nothing_and_a_perfect_prediction_everything():
    target = _targets()
    mean = target.mean(0, keepdim=True).expand_as(target)
    assert explained_variance(mean, target).item() == pytest.approx(0.0, abs=1e-6)
    assert explained_variance(target.clone(), target).item() == pytest.approx(1.0, abs=1e-6)
    # a global constant (the mean over every bin) is worse than the per-bin mean
    assert explained_variance(torch.full_like(target, target.mean().item()), target).item() < 0.0
    # half way between the mean and the truth explains 1 - 0.25 of the variance
    assert explained_variance((mean + target) / 2, target).item() == pytest.approx(0.75, abs=1e-5)


def test_explained_variance_of_too_few_frames_is_zero():
    one = _targets(n=1)
    assert explained_variance(one, one).item() == 0.0


def test_class_perplexity_counts_the_classes_in_use():
    k = 16
    uniform = torch.arange(k * 10).remainder(k)[:, None]
    assert class_perplexity(uniform, k).item() == pytest.approx(k, rel=1e-5)
    one_class = torch.full((50, 1), 3)
    assert class_perplexity(one_class, k).item() == pytest.approx(1.0)
    # ignored labels are left out; two codebooks are averaged
    two = torch.stack([uniform[:, 0], torch.full((k * 10,), 2)], 1)
    two[:5, 1] = IGNORE_LABEL
    assert class_perplexity(two, k).item() == pytest.approx((k + 1) / 2, rel=1e-5)


def test_target_signals_for_continuous_and_discrete_teachers():
    specs = {"cqt": TargetSpec("continuous", 75.0, dim=12), "codes": TargetSpec("discrete", 75.0, num_codebooks=2, num_classes=8)}
    target = _targets()
    labels = torch.arange(200).remainder(8)[:, None].repeat(1, 2)
    collapsed_logits = torch.zeros(200, 2, 8)
    collapsed_logits[..., 5] = 1.0  # always class 5
    out = target_signals({"cqt": target, "codes": collapsed_logits}, {"cqt": target, "codes": labels}, specs)
    assert set(out) == {"r2/cqt", "ppl_target/codes", "ppl_pred/codes"}
    assert out["r2/cqt"].item() == pytest.approx(1.0)
    assert out["ppl_target/codes"].item() == pytest.approx(8.0, rel=1e-5)
    assert out["ppl_pred/codes"].item() == pytest.approx(1.0)


def test_feature_signals_use_only_valid_frames():
    conv = torch.randn(2, 10, 4)
    conv[1, 6:] = 1e6  # padding: must not count
    padding = torch.zeros(2, 10, dtype=torch.bool)
    padding[1, 6:] = True
    hidden = [torch.randn(2, 10, 3) * (i + 1) for i in range(3)]
    out = feature_signals(conv, hidden, padding)
    assert set(out) == {"std/conv", "std/layer0", "std/layer1", "std/layer2"}
    expected = torch.cat([conv[0], conv[1, :6]]).std(0).mean()
    assert out["std/conv"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["std/layer2"] > out["std/layer0"]


def test_collapse_watch_warns_once_per_kind_and_not_during_warmup():
    said = []
    watch = CollapseWatch(warmup_steps=10, warn=said.append, grace_steps=5)
    watch.check({"step": 5, "r2/cqt": -0.5, "std/conv": 1.0})
    watch.check({"step": 14, "r2/cqt": -0.5, "std/conv": 1.0})
    assert said == []  # still warming up (10 steps), then 5 steps of grace
    watch.check({"step": 20, "r2/cqt": 0.3, "std/conv": 0.5, "ppl_pred/codes": 40.0, "ppl_target/codes": 60.0})
    assert said == []
    watch.check({"step": 30, "r2/cqt": -0.01, "std/conv": 0.005, "ppl_pred/codes": 1.1, "ppl_target/codes": 60.0})
    assert len(said) == 3
    assert any("'cqt'" in s and "r2/cqt" in s for s in said)
    assert any("std/conv" in s and "feature_penalty" in s for s in said)
    assert any("ppl_pred/codes" in s for s in said)
    watch.check({"step": 40, "r2/cqt": -0.02, "std/conv": 0.001, "ppl_pred/codes": 1.0, "ppl_target/codes": 60.0})
    assert len(said) == 3  # once per kind


def test_collapse_advice_comes_from_the_teacher_and_skips_what_is_set():
    registry = load_registry()
    raw = registry.build("teacher", "cqt", {})
    tuned = registry.build("teacher", "cqt", {"compression": "log", "normalize": "per-bin", "teacher_file": None})
    assert raw.advice() == ["teacher.cqt.compression=log", "teacher.cqt.normalize=per-bin"]
    assert tuned.advice() == []
    said = []
    watch = CollapseWatch(warmup_steps=0, warn=said.append, grace_steps=0, advice={"cqt": raw.advice()}, feature_penalty=10.0)
    watch.check({"step": 1, "r2/cqt": -0.1})
    assert "--set teacher.cqt.compression=log" in said[0] and "loss.feature_penalty=0" in said[0]
    said.clear()
    watch = CollapseWatch(warmup_steps=0, warn=said.append, grace_steps=0, advice={"cqt": tuned.advice()}, feature_penalty=0.0)
    watch.check({"step": 1, "r2/cqt": -0.1})
    assert "compression" not in said[0] and "feature_penalty" not in said[0] and "optim.lr" in said[0]


def test_a_noisy_r2_that_rises_through_zero_after_warmup_is_not_a_collapse():
    """Shaped like the cpu recipe's real runs (warmup 160 steps, batch 4: r2 -0.6 at the start,
    noisy, first above 0 near step 190-280): no warning. One reading after warmup + 100 steps
    used to warn on it. The same run stuck at the mean warns once, after twice the warmup."""
    def trace(slope):
        return [{"step": s, "r2/cqt": -0.6 + slope * s + (0.05 if (s // 10) % 3 == 0 else -0.05)} for s in range(10, 2001, 10)]

    said = []
    watch = CollapseWatch(warmup_steps=160, warn=said.append)
    for record in trace(0.002):
        watch.check(record)
    assert said == []
    watch = CollapseWatch(warmup_steps=160, warn=said.append)
    for record in trace(0.0):
        watch.check(record)
    assert len(said) == 1 and said[0].startswith("step 330: teacher 'cqt' explains")


TINY = ["data.batch_size=2", "data.num_workers=0", "data.crop_seconds=2.0", "data.min_seconds=1.0", "log_every=1"]


def test_a_training_run_logs_the_signals_and_plots_them(tmp_path, music_dir):
    out = tmp_path / "run"
    config = api.make_train_config(teachers=["cqt"], preset="tiny", data=[music_dir], out_dir=out, max_steps=3, overrides=TINY)
    api.train(config, progress=False, log=lambda m: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    layers = 1 + config.model.overrides.get("num_layers", 2)
    for row in rows:
        assert {"r2/cqt", "std/conv", *(f"std/layer{i}" for i in range(layers))} <= row.keys()
        assert row["r2/cqt"] <= 1.0 and math.isfinite(row["r2/cqt"])
        assert row["std/conv"] > 0
    assert (out / "loss.png").stat().st_size > 0
