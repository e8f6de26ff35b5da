"""Learning signals: numbers that tell whether a student learns or predicts an average.

A falling loss is not learning: a student that predicts the mean spectrum has a
falling loss too. These signals are logged next to every loss term:

- ``r2/<teacher>`` (continuous targets): the fraction of the target variance
  explained at the scored frames, against the per-dimension mean of the same
  frames: 0 = predicting the batch mean, 1 = perfect, below 0 = worse than the mean.
- ``acc/<teacher>`` (discrete targets, from the loss), ``ppl_target/<teacher>``
  and ``ppl_pred/<teacher>``: perplexity (exp of the entropy) of the class
  histogram of the targets and of the predicted classes, averaged over codebooks.
  A collapsed head predicts few classes: ``ppl_pred`` near 1.
- ``std/conv`` and ``std/layer<i>``: the standard deviation over frames of the
  conv features and of each layer's output, averaged over dimensions. A front
  end that collapses shows ``std/conv`` falling by orders of magnitude.

:class:`CollapseWatch` turns them into one warning per kind of collapse.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from mert_core.teacher import IGNORE_LABEL, TargetSpec


def explained_variance(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - SSE / SST`` with SST taken against the per-dimension mean of ``target``.

    Args:
        prediction: ``(N, dim)`` predicted values at N frames.
        target: ``(N, dim)`` targets at the same frames.

    Returns:
        a float32 scalar: 0 for a prediction equal to the per-dimension mean of
        the targets, 1 for a perfect one; 0 when there are fewer than 2 frames.
    """
    if target.shape[0] < 2:
        return target.new_zeros((), dtype=torch.float32)
    prediction, target = prediction.float(), target.float()
    sse = (prediction - target).square().sum()
    sst = (target - target.mean(0)).square().sum()
    return 1.0 - sse / sst.clamp(min=torch.finfo(torch.float32).tiny)


def class_perplexity(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Perplexity of the class histogram of ``labels``, averaged over codebooks.

    Args:
        labels: ``(N, C)`` int labels of C codebooks; ``IGNORE_LABEL`` entries are left out.
        num_classes: K classes per codebook.

    Returns:
        a float32 scalar in ``[1, K]`` (1 when one class takes every frame); 0 with no labels.
    """
    labels = labels.reshape(labels.shape[0], -1)
    total = labels.new_zeros((), dtype=torch.float32)
    for c in range(labels.shape[1]):
        valid = labels[:, c][labels[:, c] != IGNORE_LABEL]
        if valid.numel() == 0:
            continue
        p = torch.bincount(valid, minlength=num_classes).float() / valid.numel()
        total = total + torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum())
    return total / labels.shape[1]


@torch.no_grad()
def target_signals(predictions: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                   specs: dict[str, TargetSpec]) -> dict[str, torch.Tensor]:
    """Per-teacher signals at the scored frames (accuracy comes with the loss).

    Args:
        predictions: teacher name -> ``(N, C, K)`` logits or ``(N, dim)`` values.
        targets: teacher name -> ``(N, C)`` labels or ``(N, dim)`` values.
        specs: teacher name -> target declaration.

    Returns:
        ``r2/<name>`` for continuous teachers; ``ppl_target/<name>`` and
        ``ppl_pred/<name>`` for discrete ones; detached scalars (no host sync).
    """
    out = {}
    for name, spec in specs.items():
        pred, target = predictions[name], targets[name]
        if spec.kind == "continuous":
            out[f"r2/{name}"] = explained_variance(pred, target)
        else:
            predicted = pred.argmax(-1).masked_fill(target == IGNORE_LABEL, IGNORE_LABEL)
            out[f"ppl_target/{name}"] = class_perplexity(target, spec.num_classes)
            out[f"ppl_pred/{name}"] = class_perplexity(predicted, spec.num_classes)
    return out


def _std_over_frames(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Std over the valid frames of ``x`` (B, T, D), averaged over D."""
    rows = x[valid].float()  # N, D
    if rows.shape[0] < 2:
        return rows.new_zeros(())
    return rows.std(0).mean()


@torch.no_grad()
def feature_signals(conv_features: torch.Tensor, hidden_states: list[torch.Tensor] | None,
                    padding_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """``std/conv`` and ``std/layer<i>`` of one forward pass.

    Args:
        conv_features: ``(B, T, C)`` output of the conv feature extractor.
        hidden_states: ``num_layers + 1`` tensors ``(B, T, D)``, or None.
        padding_mask: ``(B, T)`` bool, True on padding frames.
    """
    valid = ~padding_mask
    out = {"std/conv": _std_over_frames(conv_features, valid)}
    for i, h in enumerate(hidden_states or []):
        out[f"std/layer{i}"] = _std_over_frames(h, valid)
    return out


class CollapseWatch:
    """Warns once per kind when the logged signals show a collapse.

    A head's verdict (``r2 <= 0``, ``ppl_pred`` near 1) is one of a stretch,
    not of a reading: it warns when the signal has been bad at every logged
    step of the last ``grace`` steps, ``grace = max(grace_steps, warmup_steps)``,
    and no earlier than ``warmup_steps + grace``. ``r2`` of a batch of 4 crops is
    noisy, and a healthy ``cpu`` recipe run crosses 0 between 1x and 2x its
    warmup (first positive reading at steps 190 / 220 / 280 of 3 seeds with
    warmup 160): one reading after warmup + 100 steps warned on it.

    Args:
        warmup_steps: the learning-rate warmup (a fresh head needs a while to
            reach even the mean).
        warn: where the one-line warnings go.
        grace_steps: the least grace (see above).
    """

    CONV_SHRINK = 100.0
    """``std/conv`` this many times below its first logged value counts as a collapse."""

    def __init__(self, warmup_steps: int, warn: Callable[[str], None], grace_steps: int = 100,
                 advice: dict[str, list[str]] | None = None, feature_penalty: float = 0.0):
        self.grace = max(grace_steps, warmup_steps)
        self.verdict_after, self.warn = warmup_steps + self.grace, warn
        self.last_good: dict[str, int] = {}  # signal -> last step it was healthy
        self.advice = advice or {}  # teacher name -> its own suggestions (Teacher.advice())
        self.feature_penalty = feature_penalty
        self.first_conv_std: float | None = None
        self.warned: set[str] = set()

    def check(self, record: dict[str, float]) -> list[str]:
        """Look at one logged record; returns the warnings issued now."""
        step = record["step"]
        issued = []
        conv = record.get("std/conv")
        if conv is not None and self.first_conv_std is None:
            self.first_conv_std = conv
        if conv is not None and self.first_conv_std and conv * self.CONV_SHRINK < self.first_conv_std:
            issued.append(self._once(
                "conv", f"step {step}: the conv features' std fell from {self.first_conv_std:.3g} to {conv:.3g} "
                f"(std/conv): the conv front end is collapsing; try loss.feature_penalty=0 (or smaller) or the 'cpu' recipe"))
        for key, value in record.items():
            name = key.split("/", 1)[-1]
            if key.startswith("r2/"):
                bad = value <= 0.0
            elif key.startswith("ppl_pred/"):
                target_ppl = record.get(f"ppl_target/{name}", math.inf)
                bad = value < 1.5 and target_ppl > 3.0
            else:
                continue
            if not bad:
                self.last_good[key] = step
            elif step > self.verdict_after and step - self.last_good.get(key, -math.inf) >= self.grace:
                if key.startswith("r2/"):
                    issued.append(self._once(
                        key, f"step {step}: teacher {name!r} explains {value:.3f} of its target variance ({key} <= 0 "
                        f"for {self.grace}+ steps): the student predicts no more than the mean target; try {self._tips(name)}"))
                else:
                    issued.append(self._once(
                        key, f"step {step}: teacher {name!r}'s head predicts almost one class ({key} {value:.2f}, "
                        f"targets {target_ppl:.1f}): the head has collapsed; try {self._tips(name, 'a longer warmup')}"))
        return [w for w in issued if w]

    def _tips(self, name: str, *extra: str) -> str:
        """What to try for teacher ``name``: its own advice, then what applies to every run."""
        tips = [*(f"--set {a}" for a in self.advice.get(name, [])), "a lower optim.lr", *extra]
        if self.feature_penalty > 0:
            tips.append("loss.feature_penalty=0")
        return ", ".join(tips) + " (docs/learning.md)"

    def _once(self, kind: str, message: str) -> str | None:
        if kind in self.warned:
            return None
        self.warned.add(kind)
        self.warn(message)
        return message
