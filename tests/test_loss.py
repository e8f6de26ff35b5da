"""Heads and the loss combiner against plain reference computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from mert_core.heads import CosineLogitHead, TargetHeads
from mert_core.loss import MultiTargetLoss
from mert_core.teacher import IGNORE_LABEL, TargetSpec
from mert_core.trainer import TargetLengthError, align_targets, lr_at


def test_cosine_logits_match_a_direct_computation():
    torch.manual_seed(0)
    head = CosineLogitHead(embed_dim=8, final_dim=4, num_codebooks=2, num_classes=5, temperature=0.1)
    x = torch.randn(3, 8)
    logits = head(x)
    assert logits.shape == (3, 2, 5)
    proj = head.proj(x).view(3, 2, 4)
    for n in range(3):
        for c in range(2):
            for k in range(5):
                expect = F.cosine_similarity(proj[n, c], head.class_embeddings[c, k], dim=0) / 0.1
                assert torch.allclose(logits[n, c, k], expect, atol=1e-5)


def test_combined_loss_is_the_weighted_sum_of_terms_and_ignores_missing_labels():
    torch.manual_seed(0)
    specs = {
        "codes": TargetSpec(kind="discrete", num_codebooks=2, num_classes=6, frame_rate_hz=75),
        "cqt": TargetSpec(kind="continuous", dim=3, frame_rate_hz=75),
    }
    loss_fn = MultiTargetLoss(specs, {"codes": 0.5, "cqt": 2.0}, feature_penalty=10.0)
    logits = torch.randn(4, 2, 6, requires_grad=True)
    labels = torch.tensor([[1, 2], [3, IGNORE_LABEL], [0, 5], [IGNORE_LABEL, IGNORE_LABEL]])
    pred_cqt, target_cqt = torch.randn(4, 3), torch.randn(4, 3)
    penalty = torch.tensor(0.25)
    total, terms = loss_fn({"codes": logits, "cqt": pred_cqt}, {"codes": labels, "cqt": target_cqt}, penalty)

    # MERT's criterion: one cross-entropy per codebook (mean over its labelled frames), summed
    valid = [[0, 1, 2], [0, 2]]  # frames with a label, per codebook
    ce = sum(sum(-torch.log_softmax(logits[n, c], -1)[labels[n, c]] for n in frames) / len(frames) for c, frames in enumerate(valid))
    mse = ((pred_cqt - target_cqt) ** 2).mean()
    assert math.isclose(terms["loss/codes"].item(), ce.item(), rel_tol=1e-5)
    assert math.isclose(terms["loss/cqt"].item(), mse.item(), rel_tol=1e-5)
    assert math.isclose(total.item(), 0.5 * ce.item() + 2.0 * mse.item() + 10 * 0.25, rel_tol=1e-5)
    total.backward()
    assert logits.grad[3].abs().sum() == 0  # frames without labels get no gradient


def test_no_masked_frames_gives_zero_loss_with_a_graph():
    specs = {"codes": TargetSpec(kind="discrete", num_codebooks=1, num_classes=4, frame_rate_hz=75)}
    heads = TargetHeads(specs, embed_dim=8, final_dim=4)
    preds = heads(torch.zeros(0, 8))
    total, _ = MultiTargetLoss(specs, {"codes": 1.0}, 0)(preds, {"codes": torch.zeros(0, 1, dtype=torch.long)})
    assert total.item() == 0.0
    total.backward()


def test_targets_within_one_frame_are_trimmed_or_padded_else_named_error():
    spec = TargetSpec(kind="discrete", num_codebooks=1, num_classes=4, frame_rate_hz=75)
    t = torch.zeros(2, 11, 1, dtype=torch.long)
    assert align_targets("x", t, 10, spec, ["a.wav"])[0].shape[1] == 10
    padded, have = align_targets("x", t[:, :9], 10, spec, ["a.wav"])
    assert have == 9 and (padded[:, 9] == IGNORE_LABEL).all()
    with pytest.raises(TargetLengthError, match=r"teacher 'x' gave 15 frames where the student has 10 \(files: a.wav"):
        align_targets("x", torch.zeros(2, 15, 1), 10, spec, ["a.wav"])


def test_lr_schedule_warms_up_then_decays_linearly_to_zero():
    lrs = [lr_at(s, 1.0, 10, 110) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.5) and lrs[110] == 0.0
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_decay_steps_trains_the_first_steps_of_a_longer_schedule(tmp_path, music_dir):
    """optim.decay_steps: the lr reaches 0 there, not at max_steps, and the default warmup is 8 % of it,
    so a run stopped at max_steps and resumed to a larger max_steps follows one schedule."""
    import json

    from mert_core import api

    out = tmp_path / "run"
    sets = ["optim.decay_steps=100", "log_every=1", "data.num_workers=0", "seed=3"]
    config = api.make_train_config(teachers=["cqt"], preset="tiny", data=[music_dir], out_dir=out, max_steps=4, overrides=sets)
    api.train(config, progress=False)
    api.train(config.model_copy(update={"optim": config.optim.model_copy(update={"max_steps": 10})}), resume=True, progress=False)
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([lr_at(s, 5e-4, 8, 100) for s in range(10)])
    assert lrs[-1] > 0.9 * 5e-4  # far from the end of the schedule


def test_unmasked_frames_are_scored_only_when_weighted(tmp_path, music_dir):
    """HuBERT's pred_nomask_weight: 0 (MERT) scores masked frames only; > 0 adds
    the same losses at the valid unmasked frames, logged as unmasked_loss/*."""
    import json

    from mert_core import api

    tiny = ["data.batch_size=2", "data.num_workers=0", "data.crop_seconds=2.0", "data.min_seconds=1.0", "log_every=1"]
    rows = {}
    for weight in (0.0, 0.5):
        out = tmp_path / f"w{weight}"
        config = api.make_train_config(teachers=["cqt"], preset="tiny", data=[music_dir], out_dir=out, max_steps=1,
                                       overrides=[*tiny, f"loss.unmasked_weight={weight}", "loss.feature_penalty=0"])
        api.train(config, progress=False, log=lambda m: None)
        rows[weight] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert "unmasked_loss/cqt" not in rows[0.0]
    assert rows[0.5]["loss/cqt"] == pytest.approx(rows[0.0]["loss/cqt"], rel=1e-5)  # same first step, same masks
    assert rows[0.5]["loss"] == pytest.approx(rows[0.5]["loss/cqt"] + 0.5 * rows[0.5]["unmasked_loss/cqt"], rel=1e-5)
