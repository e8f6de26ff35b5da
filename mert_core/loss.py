"""Combining the teachers' losses: cross-entropy per codebook, MSE for
continuous targets, per-teacher weights, and HuBERT's feature penalty."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mert_core.teacher import IGNORE_LABEL, TargetSpec


class MultiTargetLoss:
    """Total loss = sum_t weight_t * loss_t + feature_penalty * mean(features^2).

    Args:
        specs: teacher name -> target declaration.
        weights: teacher name -> loss weight (MERT: acoustic alpha = 1, musical 1).
        feature_penalty: weight of the conv-feature penalty (MERT: 10).
    """

    def __init__(self, specs: dict[str, TargetSpec], weights: dict[str, float], feature_penalty: float = 10.0):
        missing = set(specs) - set(weights)
        if missing:
            raise ValueError(f"MultiTargetLoss: no weight for teacher(s) {sorted(missing)}")
        self.specs, self.weights, self.feature_penalty = specs, weights, feature_penalty

    def __call__(
        self,
        predictions: dict[str, torch.Tensor],
        targets: dict[str, torch.Tensor],
        features_penalty: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """
        Args:
            predictions: teacher name -> ``(N, C, K)`` logits or ``(N, dim)``
                values at the N scored (masked) frames.
            targets: teacher name -> ``(N, C)`` int64 labels (``IGNORE_LABEL``
                = no target) or ``(N, dim)`` floats at the same frames.
            features_penalty: scalar mean square of the conv features.

        Returns:
            the total (a scalar tensor with grad) and a dict of every term and
            the discrete heads' accuracies as detached scalars (converting them
            to floats is a host sync: the trainer does it only when it logs).
        """
        total = None
        terms: dict[str, torch.Tensor] = {}
        for name, spec in self.specs.items():
            pred, target = predictions[name], targets[name]
            if spec.kind == "discrete":
                n, c, k = pred.shape
                # per codebook the mean over its frames with a target, summed over
                # codebooks: MERT's fairseq criterion adds one cross-entropy per label
                # stream and normalises by the number of masked frames
                per_frame = F.cross_entropy(pred.reshape(n * c, k), target.reshape(n * c), ignore_index=IGNORE_LABEL, reduction="none").view(n, c)
                valid = target != IGNORE_LABEL
                loss = (per_frame.sum(0) / valid.sum(0).clamp(min=1)).sum()
                if not valid.any():  # e.g. no masked frames this batch: contribute zero, keep the graph
                    loss = pred.sum() * 0.0
                with torch.no_grad():
                    correct = (pred.argmax(-1) == target) & valid
                    terms[f"acc/{name}"] = correct.sum() / valid.sum().clamp(min=1)
            else:
                loss = F.mse_loss(pred.float(), target.float()) if pred.numel() else pred.sum() * 0.0
            terms[f"loss/{name}"] = loss.detach()
            weighted = self.weights[name] * loss
            total = weighted if total is None else total + weighted
        if features_penalty is not None and self.feature_penalty > 0:
            terms["loss/features_penalty"] = features_penalty.detach()
            total = total + self.feature_penalty * features_penalty
        return total, terms
