"""Span masking: a pure, seedable function that never masks padding."""

from __future__ import annotations

import math

import pytest
import torch

from mert_core.masking import MaskEmbedding, compute_span_mask


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def expected_masked_fraction(n: int, prob: float, length: int) -> float:
    """Reference: the expected fraction of n frames masked when k = round(prob n / length)
    distinct starts are drawn uniformly from the n - length + 1 possible ones.

    Frame t is unmasked iff none of the c_t starts whose span covers it is drawn:
    P = C(P - c_t, k) / C(P, k), P the number of possible starts.
    """
    starts = n - length + 1
    k = math.floor(prob * n / length + 0.5)
    total = 0.0
    for t in range(n):
        covering = min(t, starts - 1) - max(0, t - length + 1) + 1
        total += 1.0 - math.comb(starts - covering, k) / math.comb(starts, k)
    return total / n


def test_never_masks_padding_and_respects_lengths():
    lengths = torch.tensor([374, 300, 17, 3, 0])
    mask = compute_span_mask((5, 374), lengths, 0.8, 5, _gen(0))
    assert mask.shape == (5, 374) and mask.dtype == torch.bool
    frames = torch.arange(374)[None, :]
    assert not (mask & (frames >= lengths[:, None])).any()
    assert mask[0].any() and mask[1].any() and mask[2].any()
    assert not mask[3].any()  # round(0.8 * 3 / 5) = 0 spans
    assert not mask[4].any()


@pytest.mark.parametrize("n,prob,length", [(374, 0.8, 5), (200, 0.65, 10), (50, 0.3, 3)])
def test_masked_fraction_matches_the_combinatorial_expectation(n, prob, length):
    batch = 400
    mask = compute_span_mask((batch, n), torch.full((batch,), n), prob, length, _gen(1))
    observed = mask.float().mean().item()
    expected = expected_masked_fraction(n, prob, length)
    # 400 x n frames: the standard error of the mean is well under 0.005
    assert abs(observed - expected) < 0.01, (observed, expected)


def test_span_count_and_shape_of_spans():
    # length-1 spans: the masked count is exactly the number of distinct starts
    n = torch.tensor([100, 57, 10])
    mask = compute_span_mask((3, 100), n, 0.5, 1, _gen(2))
    assert mask.sum(1).tolist() == [50, 29, 5]  # round half up of 0.5 * n
    # prob 1 and length 1: every valid frame, nothing else
    mask = compute_span_mask((3, 100), n, 1.0, 1, _gen(3))
    assert torch.equal(mask, torch.arange(100)[None, :] < n[:, None])
    # every masked run is made of whole spans: runs are at least `length` long unless clipped at the end
    mask = compute_span_mask((50, 120), torch.full((50,), 120), 0.2, 6, _gen(4))
    for row in mask.tolist():
        run = 0
        for value in row + [False]:
            if value:
                run += 1
            elif run:
                assert run >= 6
                run = 0


def test_seeded_determinism_and_seeds_differ():
    lengths = torch.tensor([374, 250])
    a = compute_span_mask((2, 374), lengths, 0.8, 5, _gen(7))
    b = compute_span_mask((2, 374), lengths, 0.8, 5, _gen(7))
    c = compute_span_mask((2, 374), lengths, 0.8, 5, _gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(5)
    d = compute_span_mask((2, 374), lengths, 0.8, 5)
    torch.manual_seed(5)
    assert torch.equal(d, compute_span_mask((2, 374), lengths, 0.8, 5))


def test_prob_zero_and_empty_shapes():
    assert not compute_span_mask((2, 50), torch.tensor([50, 40]), 0.0, 5, _gen(0)).any()
    assert compute_span_mask((2, 0), torch.tensor([0, 0]), 0.8, 5, _gen(0)).shape == (2, 0)
    assert compute_span_mask((0, 10), torch.zeros(0, dtype=torch.long), 0.8, 5, _gen(0)).shape == (0, 10)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prob=1.5), r"prob: expected a value in \[0, 1\], got 1.5"),
        (dict(length=0), r"length: expected a span length of at least 1 frame, got 0"),
        (dict(frame_lengths=torch.tensor([10])), r"frame_lengths: expected shape \(2,\) for a batch of 2, got \(1,\)"),
    ],
)
def test_bad_arguments_give_one_line_errors(kwargs, match):
    args = dict(shape=(2, 20), frame_lengths=torch.tensor([20, 10]), prob=0.8, length=5, generator=_gen(0))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        compute_span_mask(**args)


def test_mask_embedding_replaces_exactly_the_masked_frames():
    emb = MaskEmbedding(8)
    x = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    y = emb(x, mask)
    assert torch.equal(y[mask], emb.weight.detach().expand(3, 8))
    assert torch.equal(y[~mask], x[~mask])
    y.sum().backward()
    assert torch.equal(emb.weight.grad, torch.full((8,), 3.0))
