"""HuBERT span masking: a pure, seedable function and the module that owns
the learned mask embedding. Padding frames are never masked.
"""

from __future__ import annotations

import torch
from torch import nn


def compute_span_mask(
    shape: tuple[int, int],
    frame_lengths: torch.Tensor,
    prob: float,
    length: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Choose spans of frames to mask, as HuBERT does (MERT: prob 0.8, length 5).

    Per item with ``n`` valid frames: ``round(prob * n / length)`` distinct
    span starts are drawn uniformly from ``0 .. n - length`` (every start
    whose span fits; at most that many), and ``length`` frames from each start
    are masked. Spans may overlap, so the masked fraction is below ``prob``
    (about 0.58 of the valid frames at 0.8 / 5). Frames at or beyond ``n``
    are never masked; an item shorter than one span gets one span clipped to
    its valid frames (when the rounded count is not 0).

    Vectorised over the batch; the only randomness is one ``torch.rand``
    call on ``generator``, so the same generator state gives the same mask.

    Args:
        shape: ``(B, T)`` of the mask, T the padded number of frames.
        frame_lengths: ``(B,)`` valid frames per item (integer tensor).
        prob: HuBERT's mask_prob, in [0, 1].
        length: span length in frames, >= 1.
        generator: random source (on any device); None uses the global one.

    Returns:
        ``(B, T)`` bool on ``frame_lengths.device``, True on masked frames.
    """
    batch, frames = int(shape[0]), int(shape[1])
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"compute_span_mask prob: expected a value in [0, 1], got {prob}")
    if length < 1:
        raise ValueError(f"compute_span_mask length: expected a span length of at least 1 frame, got {length}")
    frame_lengths = torch.as_tensor(frame_lengths)
    if frame_lengths.shape != (batch,):
        raise ValueError(f"compute_span_mask frame_lengths: expected shape ({batch},) for a batch of {batch}, got {tuple(frame_lengths.shape)}")
    device = frame_lengths.device
    n = frame_lengths.to(torch.long).clamp(min=0, max=frames)  # B
    if batch == 0 or frames == 0:
        return torch.zeros(batch, frames, dtype=torch.bool, device=device)

    num_starts_possible = (n - length + 1).clamp(min=1) * (n > 0)  # B
    num_spans = torch.floor(prob * n.double() / length + 0.5).long()  # round half up
    num_spans = torch.minimum(num_spans, num_starts_possible)  # B

    # A random permutation of the possible starts per item: sort random keys,
    # with impossible starts pushed to the end; the first num_spans are used.
    gen_device = generator.device if generator is not None else device
    keys = torch.rand(batch, frames, generator=generator, device=gen_device).to(device)
    position = torch.arange(frames, device=device)
    keys = keys.masked_fill(position[None, :] >= num_starts_possible[:, None], 2.0)
    max_spans = int(num_spans.max())  # host sync: sizes the index tensor
    if max_spans == 0:
        return torch.zeros(batch, frames, dtype=torch.bool, device=device)
    starts = keys.argsort(dim=1)[:, :max_spans]  # B, S
    used = torch.arange(max_spans, device=device)[None, :] < num_spans[:, None]  # B, S

    spans = starts[:, :, None] + torch.arange(length, device=device)  # B, S, L
    keep = used[:, :, None] & (spans < n[:, None, None])
    mask = torch.zeros(batch, frames + 1, dtype=torch.bool, device=device)
    # unused or clipped positions are sent to the extra column, then dropped
    spans = torch.where(keep, spans, torch.full_like(spans, frames)).clamp(max=frames)
    mask.scatter_(1, spans.reshape(batch, -1), True)
    return mask[:, :frames]


class MaskEmbedding(nn.Module):
    """The learned vector that replaces masked frames (HuBERT's ``mask_emb``).

    Args:
        embed_dim: model width D.
    """

    def __init__(self, embed_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(embed_dim).uniform_())  # fairseq/transformers init

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``(B, T, D)`` projected features.
            mask: ``(B, T)`` bool, True on frames to replace.

        Returns:
            ``(B, T, D)``: ``x`` with masked frames replaced by the embedding.
        """
        return torch.where(mask[..., None], self.weight.to(x.dtype), x)
