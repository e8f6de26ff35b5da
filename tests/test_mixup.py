"""The inbatch-mixup augmentation: every rule of the in-batch noise mixup of the MERT paper (Li et al. 2023, arXiv 2306.00107).

Statistical rules are checked on the plan of random draws over many clips;
the vectorised mixing is checked against a plain loop over clips and segments,
and end to end on signals whose values name their clip.
"""

from __future__ import annotations

import pytest
import torch

from mert_core.registry import PluginError, load_registry
from mert_plugins.augment.mixup import InBatchMixup, MixupOptions, apply_mixup, plan_mixup

SR = 24000


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_mix(wave: torch.Tensor, plan, volume: float) -> torch.Tensor:
    """The rule written as loops: clip by clip, segment by segment."""
    out = wave.clone()
    K, B = plan.active.shape
    for b in range(B):
        for k in range(K):
            if plan.active[k, b]:
                n, src = int(plan.length[k, b]), int(plan.source[k, b])
                s0, d0 = int(plan.source_start[k, b]), int(plan.target_start[k, b])
                out[b, d0 : d0 + n] += volume * wave[src, s0 : s0 + n]
    return out


def test_registered_with_spec_defaults(registry):
    assert "inbatch-mixup" in registry.names("augment")
    aug = registry.build("augment", "inbatch-mixup", {}, sample_rate=SR)
    assert isinstance(aug, InBatchMixup)
    o = aug.options
    assert (o.prob, o.min_segments, o.max_segments, o.min_seconds, o.max_seconds, o.volume) == (0.5, 1, 3, 0.5, 1.0, 1.0)
    assert all(f.description for f in MixupOptions.model_fields.values())


def test_probability_per_clip():
    B = 4000
    plan = plan_mixup(torch.full((B,), 5 * SR), MixupOptions(), SR, gen(0))
    chosen = plan.active.any(0).float().mean().item()
    assert abs(chosen - 0.5) < 0.035  # 4.4 standard deviations
    for p in (0.0, 1.0):
        plan = plan_mixup(torch.full((B,), 5 * SR), MixupOptions(prob=p), SR, gen(0))
        assert plan.active.any(0).float().mean().item() == p


def test_segment_counts_in_range():
    B = 3000
    plan = plan_mixup(torch.full((B,), 5 * SR), MixupOptions(), SR, gen(1))
    counts = plan.active.sum(0)
    chosen = counts > 0
    assert set(counts[chosen].tolist()) == {1, 2, 3}
    share = torch.bincount(counts[chosen], minlength=4)[1:].float() / chosen.sum()
    assert (share - 1 / 3).abs().max() < 0.05  # uniform over 1..3
    # slots are filled in order: slot k active only if slot k-1 is
    assert (plan.active[1:] <= plan.active[:-1]).all()
    plan = plan_mixup(torch.full((B,), 5 * SR), MixupOptions(prob=1, min_segments=2, max_segments=2), SR, gen(1))
    assert (plan.active.sum(0) == 2).all()


@pytest.mark.parametrize("max_seconds", [1.0, 1.5])
def test_segment_lengths_in_range(max_seconds):
    B = 3000
    plan = plan_mixup(torch.full((B,), 5 * SR), MixupOptions(prob=1, max_seconds=max_seconds), SR, gen(2))
    n = plan.length[plan.active]
    lo, hi = int(0.5 * SR), int(max_seconds * SR)
    assert n.min() >= lo and n.max() <= hi
    assert n.min() < lo + 0.01 * (hi - lo) and n.max() > hi - 0.01 * (hi - lo)  # the whole range is used
    assert (plan.length[~plan.active] == 0).all()


def test_segments_come_from_other_clips_valid_regions():
    B = 6
    lengths = torch.tensor([5 * SR, 3 * SR, 4 * SR, 72000, 100000, 5 * SR])
    sources = set()
    for seed in range(50):
        plan = plan_mixup(lengths, MixupOptions(prob=1), SR, gen(seed))
        a = plan.active
        assert (plan.source[a] != torch.arange(B).expand_as(plan.source)[a]).all()  # never the clip itself
        assert (plan.source_start + plan.length <= lengths[plan.source])[a].all()  # inside the source's valid audio
        assert (plan.target_start + plan.length <= lengths[None, :])[a].all()  # inside the receiver's valid audio
        assert (plan.source_start >= 0).all() and (plan.target_start >= 0).all()
        sources |= {(b, int(s)) for b, s in zip(torch.arange(B).expand_as(a)[a].tolist(), plan.source[a].tolist())}
    assert sources == {(b, s) for b in range(B) for s in range(B) if s != b}  # every other clip is used


def test_short_clips_get_shortened_segments():
    lengths = torch.tensor([5 * SR, 4000, 0])  # 4000 samples < 0.5 s; an empty clip
    for seed in range(20):
        plan = plan_mixup(lengths, MixupOptions(prob=1), SR, gen(seed))
        assert not plan.active[:, 2].any()  # nothing into an empty clip
        assert not (plan.active & (plan.source == 2)).any()  # nothing from it
        assert (plan.length[:, 1][plan.active[:, 1]] <= 4000).all()
        into_long_from_short = plan.active[:, 0] & (plan.source[:, 0] == 1)
        assert (plan.length[:, 0][into_long_from_short] <= 4000).all()


def test_vectorised_mix_equals_the_loop():
    B, S = 5, 3 * SR
    wave = torch.randn(B, S, generator=gen(3))
    lengths = torch.tensor([S, S - 5000, 2 * SR, S, 30000])
    wave[torch.arange(S)[None, :] >= lengths[:, None]] = 0
    opts = MixupOptions(prob=0.7, volume=0.8)
    aug = InBatchMixup(opts, sample_rate=SR)
    out = aug(wave, lengths, gen(4))
    plan = plan_mixup(lengths, opts, SR, gen(4))  # the same draws from the same seed
    assert plan.active.any()
    torch.testing.assert_close(out, reference_mix(wave, plan, 0.8), rtol=0, atol=1e-6)
    torch.testing.assert_close(apply_mixup(wave, plan, 0.8), out, rtol=0, atol=0)


def test_end_to_end_adds_other_clips_audio():
    """Each clip holds a constant that names it; with one segment per clip the
    difference must be one run of another clip's constant, of a legal length."""
    B, S, sr = 8, 4000, 1000  # a low rate keeps this small: segments of 500-1000 samples
    wave = (torch.arange(B, dtype=torch.float32)[:, None] + 1).expand(B, S).clone()
    aug = InBatchMixup(MixupOptions(prob=1, max_segments=1), sample_rate=sr)
    for seed in range(10):
        delta = aug(wave, torch.full((B,), S), gen(seed)) - wave
        for b in range(B):
            touched = delta[b].nonzero().flatten()
            assert 500 <= len(touched) <= 1000
            assert (touched.diff() == 1).all()  # one contiguous segment
            values = delta[b, touched].unique()
            assert len(values) == 1 and values.item() != b + 1 and values.item() in range(1, B + 1)


def test_padding_untouched_and_input_unchanged():
    B, S = 4, 2 * SR
    lengths = torch.tensor([S, SR, 30000, 13000])
    wave = torch.randn(B, S, generator=gen(5))
    wave[torch.arange(S)[None, :] >= lengths[:, None]] = 0
    before = wave.clone()
    aug = InBatchMixup(MixupOptions(prob=1, max_segments=3), sample_rate=SR)
    for seed in range(10):
        out = aug(wave, lengths, gen(seed))
        pad = torch.arange(S)[None, :] >= lengths[:, None]
        assert (out[pad] == 0).all()
        assert not torch.equal(out, wave)
    assert torch.equal(wave, before)  # the clean batch (the teachers' input) is not modified


def test_deterministic_under_seed():
    B, S = 4, SR
    wave = torch.randn(B, S, generator=gen(6))
    lengths = torch.full((B,), S)
    aug = InBatchMixup(MixupOptions(min_seconds=0.1, max_seconds=0.3), sample_rate=SR)
    a, b, c = (aug(wave, lengths, gen(s)) for s in (7, 7, 8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_volume():
    B, S = 4, SR
    wave = torch.randn(B, S, generator=gen(9))
    lengths = torch.full((B,), S)

    def mixed(volume):
        return InBatchMixup(MixupOptions(prob=1, min_seconds=0.2, max_seconds=0.4, volume=volume), sample_rate=SR)(wave, lengths, gen(10))

    assert torch.equal(mixed(0.0), wave)
    torch.testing.assert_close(mixed(2.0) - wave, 2 * (mixed(1.0) - wave), rtol=0, atol=1e-5)


def test_single_clip_batch_is_unchanged():
    wave = torch.randn(1, SR, generator=gen(11))
    out = InBatchMixup(MixupOptions(prob=1), sample_rate=SR)(wave, torch.tensor([SR]), gen(0))
    assert torch.equal(out, wave)


@pytest.mark.parametrize(
    "options, field",
    [
        ({"min_segments": 3, "max_segments": 2}, "min_segments"),
        ({"min_seconds": 1.2, "max_seconds": 1.0}, "min_seconds"),
        ({"prob": 1.5}, "prob"),
        ({"volume": -1}, "volume"),
        ({"segments": 2}, "segments"),
    ],
)
def test_bad_options(registry, options, field):
    with pytest.raises(PluginError, match=field):
        registry.build("augment", "inbatch-mixup", options)


def test_bad_shapes():
    aug = InBatchMixup(MixupOptions(), sample_rate=SR)
    with pytest.raises(ValueError, match="expected wave"):
        aug(torch.zeros(2, 3, 100), torch.tensor([100, 100]), gen(0))
    with pytest.raises(ValueError, match="lengths"):
        aug(torch.zeros(2, 100), torch.tensor([100]), gen(0))
