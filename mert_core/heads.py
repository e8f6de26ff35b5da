"""Prediction heads built from the teachers' target declarations.

The student returns features; these heads turn the last layer's features at
masked frames into one prediction per teacher. Losses live in
:mod:`mert_core.loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mert_core.teacher import TargetSpec


class CosineLogitHead(nn.Module):
    """HuBERT's discrete head: untied projection per codebook, cosine logits.

    Args:
        embed_dim: student feature size D.
        final_dim: projection size (MERT: 64 base, 128 large).
        num_codebooks: C label streams, one projection each.
        num_classes: K classes per codebook, each with a learned embedding.
        temperature: logits = cosine / temperature (MERT 0.1).
    """

    def __init__(self, embed_dim: int, final_dim: int, num_codebooks: int, num_classes: int, temperature: float = 0.1):
        super().__init__()
        self.num_codebooks, self.num_classes, self.final_dim = num_codebooks, num_classes, final_dim
        self.temperature = temperature
        self.proj = nn.Linear(embed_dim, final_dim * num_codebooks)
        self.class_embeddings = nn.Parameter(torch.empty(num_codebooks, num_classes, final_dim))
        nn.init.uniform_(self.class_embeddings)  # as fairseq's label_embs_concat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``(N, D)`` features of the N masked frames.

        Returns:
            ``(N, C, K)`` logits.
        """
        n = x.shape[0]
        proj = F.normalize(self.proj(x).view(n, self.num_codebooks, self.final_dim).float(), dim=-1)  # N, C, F
        classes = F.normalize(self.class_embeddings.float(), dim=-1)  # C, K, F
        return torch.einsum("ncf,ckf->nck", proj, classes) / self.temperature


class TargetHeads(nn.Module):
    """One head per teacher, built from its :class:`TargetSpec`.

    Args:
        specs: teacher name -> target declaration.
        embed_dim: student feature size D.
        final_dim: projection size of discrete heads.
        temperature: cosine-logit temperature of discrete heads.
    """

    def __init__(self, specs: dict[str, TargetSpec], embed_dim: int, final_dim: int, temperature: float = 0.1):
        super().__init__()
        self.specs = dict(specs)
        heads = {}
        for name, spec in specs.items():
            if spec.kind == "discrete":
                heads[name] = CosineLogitHead(embed_dim, final_dim, spec.num_codebooks, spec.num_classes, temperature)
            else:
                heads[name] = nn.Linear(embed_dim, spec.dim)
        # ModuleDict keys may not contain "."; teacher names use "-" anyway.
        self.heads = nn.ModuleDict({head_key(n): h for n, h in heads.items()})

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """
        Args:
            features: ``(N, D)`` student features at the frames that are scored.

        Returns:
            teacher name -> ``(N, C, K)`` logits (discrete) or ``(N, dim)`` (continuous).
        """
        return {name: self.heads[head_key(name)](features) for name in self.specs}


def head_key(name: str) -> str:
    return name.replace(".", "_")
