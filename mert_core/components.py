"""The student's building blocks: small modules in the style of torchaudio's
wav2vec2/HuBERT components, composed by :mod:`mert_core.model`.

Read bottom-up: conv blocks make the feature extractor; a feature projection
maps conv features to the model width; a convolutional positional embedding,
self-attention and a feed-forward block make an encoder layer; layers make the
transformer. No module sees a config object: every size is an argument.

Padding convention: ``lengths`` are valid samples (or frames) per item; frames
at or beyond an item's length are padding. Every module makes an item's valid
outputs independent of the padding around it, so a padded batch gives the
same valid frames as each item run alone (see ``tests/test_model.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from mert_core.geometry import frames_for


def conv_output_length(length, kernel_size: int, stride: int):
    """Frames a ``kernel_size``/``stride`` conv without padding makes from
    ``length`` inputs (0 when the input is shorter than the kernel).

    Works on ints and on integer tensors of any shape.
    """
    if isinstance(length, torch.Tensor):
        return (torch.div(length - kernel_size, stride, rounding_mode="floor") + 1).clamp(min=0)
    return max(0, (int(length) - kernel_size) // stride + 1)


def valid_mask(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """``(B,)`` lengths -> ``(B, max_length)`` bool, True on valid positions."""
    return torch.arange(max_length, device=lengths.device)[None, :] < lengths[:, None]


class _GradMultiply(torch.autograd.Function):
    """Identity forward, gradient times ``scale`` backward (fairseq's GradMultiply)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def grad_multiply(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` unchanged; its gradient is multiplied by ``scale`` on the way back."""
    return x if scale == 1.0 else _GradMultiply.apply(x, scale)


class _SwapTimeChannels(torch.autograd.Function):
    """``(B, C, T)`` <-> ``(B, T, C)`` as a contiguous copy, with a contiguous
    gradient too (a plain ``.transpose().contiguous()`` hands the op before it
    a transposed gradient, which makes its backward ~3x slower). The whole
    training step: 1.02x faster on 95m, 1.04x on tiny
    (``python benchmarks/bench_student.py --levers``, 2 cores)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.transpose(1, 2).contiguous()


class _CPUDropout(torch.autograd.Function):
    """Dropout whose keep-mask comes from 16-bit random integers: one 64-bit
    draw per 4 elements, ~5x faster than ``bernoulli_`` on the CPU (the
    training step: 1.05x faster on 95m, 1.04x on tiny; ``bench_student.py --levers``). The drop
    probability is p rounded to a multiple of 1/65536."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), 2**63 - 1)
        threshold = -32768 + round(p * 65536)
        keep = bits.view(torch.int16)[:n].view(x.shape) >= threshold  # uniform int16: P(keep) = 1 - p
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return torch.where(keep, x * ctx.scale, 0.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad * ctx.scale, 0.0), None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout``; on the CPU with a cheaper random mask (see ``_CPUDropout``)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training=True)
    return _CPUDropout.apply(x, p)


class Dropout(nn.Module):
    """``nn.Dropout`` through :func:`dropout`."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# -- conv feature extractor -----------------------------------------------------

def _tap_groups(kernel_size: int, stride: int) -> list[tuple[int, int]]:
    """Split a kernel's taps into runs of at most ``stride``: (first tap, number of taps)."""
    return [(a, min(kernel_size, a + stride) - a) for a in range(0, kernel_size, stride)]


def _tap_view(x: torch.Tensor, out_frames: int, first_tap: int, taps: int, stride: int) -> torch.Tensor:
    """``(B, T_in, C)`` contiguous -> ``(B, T_out, taps * C)`` view: row t holds
    frames ``stride * t + first_tap ...`` (adjacent in memory, so no copy)."""
    batch, frames, channels = x.shape
    return x.as_strided((batch, out_frames, taps * channels), (frames * channels, stride * channels, 1),
                        x.storage_offset() + first_tap * channels)


def _tap_matrix(weight: torch.Tensor, first_tap: int, taps: int) -> torch.Tensor:
    """``(C_out, C_in, K)`` -> ``(taps * C_in, C_out)``, rows frame-major like ``_tap_view``'s columns."""
    return weight[:, :, first_tap : first_tap + taps].permute(2, 1, 0).reshape(-1, weight.shape[0])


class _StridedConvGEMM(torch.autograd.Function):
    """A strided conv1d on ``(B, T, C)`` as batched GEMMs over views, forward and backward.

    In channels-last memory, the taps a window reads within one stride are
    adjacent, so "frames s*t .. s*t+s-1" of every output t is a strided matrix
    view of the input with leading dimension s*C: the conv is one batched GEMM
    per run of ``stride`` taps (two for kernel 3 / stride 2), read straight
    from views, with no unfolded copy in the forward and none in the backward
    (the input gradient is accumulated into the same views). Saves only the
    input. 1.3-1.7x faster than oneDNN's conv1d on 2 CPU cores, 64 to 512 channels;
    the whole training step 1.07-1.11x faster on 95m, 1.03x on tiny
    (``python benchmarks/bench_student.py --levers``).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
        batch, frames, _ = x.shape
        kernel_size = weight.shape[-1]
        out_frames = conv_output_length(frames, kernel_size, stride)
        w = weight.to(x.dtype)
        y = None
        for first, taps in _tap_groups(kernel_size, stride):
            view = _tap_view(x, out_frames, first, taps, stride)
            w_taps = _tap_matrix(w, first, taps).expand(batch, -1, -1)
            y = torch.bmm(view, w_taps) if y is None else y.baddbmm_(view, w_taps)
        ctx.save_for_backward(x, weight)
        ctx.stride = stride
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        stride = ctx.stride
        out_channels, in_channels, kernel_size = weight.shape
        grad = grad.contiguous().to(x.dtype)
        batch, out_frames, _ = grad.shape
        w = weight.to(x.dtype)
        grad_x = grad_w = None
        # When the first run of taps covers whole strides it tiles frames [0, stride * T_out):
        # it is written (beta=0), not added, and only the frames after it need zeros.
        overwrite = kernel_size >= stride
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x) if overwrite else torch.zeros_like(x)
            if overwrite:
                grad_x[:, stride * out_frames :].zero_()
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty(weight.shape, dtype=x.dtype, device=x.device)
        for i, (first, taps) in enumerate(_tap_groups(kernel_size, stride)):
            if grad_x is not None:
                w_taps = _tap_matrix(w, first, taps)
                beta = 0.0 if (i == 0 and overwrite) else 1.0
                _tap_view(grad_x, out_frames, first, taps, stride).baddbmm_(grad, w_taps.t().expand(batch, -1, -1), beta=beta)
            if grad_w is not None:
                view = _tap_view(x, out_frames, first, taps, stride)
                grad_w_taps = torch.bmm(view.transpose(1, 2), grad).sum(0)  # taps * C_in, C_out
                grad_w[:, :, first : first + taps] = grad_w_taps.view(taps, in_channels, out_channels).permute(2, 1, 0)
        return grad_x, (grad_w.to(weight.dtype) if grad_w is not None else None), None


class ConvLayerBlock(nn.Module):
    """Conv1d (no padding) -> optional norm -> GELU.

    Args:
        in_channels, out_channels, kernel_size, stride: of the convolution.
        bias: whether the convolution has a bias (the MERT paper: no).
        norm: ``"group"`` (GroupNorm with one group per channel: each channel is
            normalised over time), ``"layer"`` (LayerNorm over channels, per
            frame) or None.
        eps: of the norm.

    The group norm's statistics are taken over valid frames only, so padding
    never changes an item's features. (transformers and fairseq normalise over
    the whole padded length, which makes a padded item's features depend on
    the batch; without padding the two are identical.)

    Two layouts compute the same thing: ``channels_last`` (``(B, T, C)``,
    used on the CPU) runs the conv as GEMMs over strided views of the input
    (``_StridedConvGEMM``); ``(B, C, T)`` uses ``F.conv1d`` (cuDNN on the GPU).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 bias: bool = False, norm: str | None = None, eps: float = 1e-5):
        super().__init__()
        if norm not in (None, "group", "layer"):
            raise ValueError(f"ConvLayerBlock norm: expected 'group', 'layer' or None, got {norm!r}")
        self.kernel_size, self.stride, self.norm_kind, self.eps = kernel_size, stride, norm, eps
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, bias=bias)
        nn.init.kaiming_normal_(self.conv.weight)  # as fairseq's ConvFeatureExtractionModel
        if norm == "group":
            self.norm = nn.GroupNorm(out_channels, out_channels, eps=eps, affine=True)
        elif norm == "layer":
            self.norm = nn.LayerNorm(out_channels, eps=eps, elementwise_affine=True)
        else:
            self.norm = None

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None,
                channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            x: ``(B, T_in, C_in)`` if ``channels_last`` else ``(B, C_in, T_in)``.
            lengths: ``(B,)`` valid input frames, or None when all are valid.

        Returns:
            ``(B, T_out, C_out)`` (or ``(B, C_out, T_out)``) and the ``(B,)``
            valid output frames (or None).
        """
        if lengths is not None:
            lengths = conv_output_length(lengths, self.kernel_size, self.stride)
        if channels_last:
            x = self._conv_channels_last(x)  # B, T, C
            if self.norm_kind == "group":
                x = group_norm_over_time(x, self.norm.weight, self.norm.bias, self.eps, lengths)
            elif self.norm_kind == "layer":
                x = self.norm(x)
            return F.gelu(x), lengths
        x = self._conv(x)  # B, C, T
        if self.norm_kind == "group":
            if lengths is None or bool((lengths >= x.shape[-1]).all()):  # host sync; only with padding
                x = self.norm(x)  # the native kernel: identical without padding
            else:
                x = group_norm_over_time(x.transpose(1, 2), self.norm.weight, self.norm.bias, self.eps, lengths).transpose(1, 2)
        elif self.norm_kind == "layer":
            x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        return F.gelu(x), lengths

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, T_in)`` -> ``(B, C_out, T_out)``."""
        if self.conv.in_channels == 1 and x.device.type == "cpu" and self.kernel_size * self.conv.out_channels >= 1024:
            # one input channel (the waveform): the K-sample windows form a (K, T_out) matrix,
            # so the conv is one GEMM. Forward + backward on 2 cores, 4 x 5 s: 1.24x faster than
            # oneDNN's conv1d at 512 channels x 10 taps (95m), 1.2x with 1600 taps at 64-256 channels
            # (the cpu preset); at 64 x 10 (tiny) oneDNN is 1.15x faster, hence the size test
            # (python benchmarks/bench_student.py --levers times it in the whole step)
            windows = x[:, 0].unfold(1, self.kernel_size, self.stride).transpose(1, 2).contiguous()  # B, K, T_out: small
            # bmm writes (B, C_out, T_out) directly; a broadcasting matmul would compute (B, T, C) and copy
            y = torch.bmm(self.conv.weight[:, 0].expand(x.shape[0], -1, -1), windows)  # B, C_out, T_out
            return y if self.conv.bias is None else y + self.conv.bias[:, None]
        return self.conv(x)

    def _conv_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T_in, C_in)`` -> ``(B, T_out, C_out)`` (see ``_StridedConvGEMM``)."""
        y = _StridedConvGEMM.apply(x.contiguous(), self.conv.weight, self.stride)
        return y if self.conv.bias is None else y + self.conv.bias


def group_norm_over_time(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                         lengths: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm with one group per channel on ``(B, T, C)``: each channel of
    each item normalised over its valid frames (fp32 statistics).

    Args:
        x: ``(B, T, C)``.
        weight, bias: ``(C,)`` affine parameters.
        lengths: ``(B,)`` valid frames, or None when all are valid.

    Returns:
        ``(B, T, C)``; padding frames hold finite values that depend on nothing valid.
    """
    xf = x.float()
    if lengths is None or bool((lengths >= x.shape[1]).all()):  # host sync; only with padding
        var, mean = torch.var_mean(xf, dim=1, keepdim=True, correction=0)  # B, 1, C
    else:
        valid = valid_mask(lengths, x.shape[1])[..., None].to(torch.float32)  # B, T, 1
        count = valid.sum(1, keepdim=True).clamp(min=1.0)
        mean = (xf * valid).sum(1, keepdim=True) / count
        var = ((xf - mean).square() * valid).sum(1, keepdim=True) / count
    scale = weight.float() * torch.rsqrt(var + eps)  # B, 1, C
    return torch.addcmul(bias.float() - mean * scale, xf, scale).to(x.dtype)


class FeatureExtractor(nn.Module):
    """The wav2vec 2.0 conv stack: raw audio -> frames.

    Args:
        conv_layers: the ``ConvLayerBlock`` s, first to last.
        channels_last: layout of the convs after the first (see
            ``ConvLayerBlock``); None picks ``(B, T, C)`` GEMMs on the CPU and
            ``F.conv1d`` elsewhere.
    """

    def __init__(self, conv_layers: list[ConvLayerBlock], channels_last: bool | None = None):
        super().__init__()
        self.conv_layers = nn.ModuleList(conv_layers)
        self.channels_last = channels_last

    @property
    def receptive_field(self) -> int:
        """Samples one output frame sees (400 for the standard stack)."""
        field = 1
        for layer in reversed(self.conv_layers):
            field = (field - 1) * layer.stride + layer.kernel_size
        return field

    @property
    def hop_samples(self) -> int:
        """Samples between output frames: the product of the strides (320 for the standard stack)."""
        return math.prod(layer.stride for layer in self.conv_layers)

    def num_frames(self, num_samples):
        """Output frames for ``num_samples`` input samples (int or integer tensor)."""
        return frames_for(num_samples, self.hop_samples, self.receptive_field)

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            wave: ``(B, S)`` audio; at least ``receptive_field`` samples.
            lengths: ``(B,)`` valid samples, or None when all are valid.

        Returns:
            ``(B, T, C)`` features and ``(B,)`` valid frames (or None).
        """
        channels_last = self.channels_last if self.channels_last is not None else wave.device.type == "cpu"
        # The first layer makes the largest activation (B, C, S / 5); it stays (B, C, T) so that its
        # GroupNorm is the native kernel. Channels-last layers follow after one transpose.
        x, lengths = self.conv_layers[0](wave[:, None, :], lengths)  # B, C, T
        if channels_last:
            x = _SwapTimeChannels.apply(x)  # B, T, C
        for layer in self.conv_layers[1:]:
            x, lengths = layer(x, lengths, channels_last=channels_last)
        return (x if channels_last else x.transpose(1, 2)), lengths  # B, T, C


class FeatureProjection(nn.Module):
    """LayerNorm -> Linear -> Dropout: conv features to the model width.

    Args:
        in_features: conv channels C.
        out_features: model width D.
        dropout: HuBERT's ``dropout_input`` (the MERT paper: 0.1 base, 0 large).
        layer_norm: whether to normalise first (True for HuBERT/MERT).
    """

    def __init__(self, in_features: int, out_features: int, dropout: float = 0.0, layer_norm: bool = True, eps: float = 1e-5):
        super().__init__()
        self.layer_norm = nn.LayerNorm(in_features, eps=eps) if layer_norm else None
        self.projection = nn.Linear(in_features, out_features)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, C)`` -> ``(B, T, D)``."""
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return self.dropout(self.projection(x))


# -- transformer ----------------------------------------------------------------

class ConvolutionalPositionalEmbedding(nn.Module):
    """Relative position information from a wide grouped convolution over time.

    Conv1d (kernel ``kernel_size``, ``groups`` groups, "same" padding, weight
    norm over the kernel axis) -> drop the extra frame an even kernel makes ->
    GELU. Returns the embedding only; the transformer adds it to its input.

    Args:
        embed_dim: model width D.
        kernel_size: 128 in the MERT paper.
        groups: 16 in the MERT paper.
        dropout: only sets the init scale (fairseq's formula).
    """

    def __init__(self, embed_dim: int, kernel_size: int = 128, groups: int = 16, dropout: float = 0.0):
        super().__init__()
        if embed_dim % groups:
            raise ValueError(f"ConvolutionalPositionalEmbedding: embed_dim {embed_dim} is not divisible by groups {groups}")
        self.kernel_size = kernel_size
        conv = nn.Conv1d(embed_dim, embed_dim, kernel_size, padding=kernel_size // 2, groups=groups)
        nn.init.normal_(conv.weight, mean=0.0, std=math.sqrt(4 * (1.0 - dropout) / (kernel_size * embed_dim)))
        nn.init.zeros_(conv.bias)
        # dim=2: one norm per kernel tap, as fairseq and transformers do
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.num_remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, D)`` (zeros on padding frames) -> ``(B, T, D)`` embedding."""
        y = self.conv(x.transpose(1, 2))  # B, D, T + num_remove
        if self.num_remove:
            y = y[..., : -self.num_remove]
        return F.gelu(y).transpose(1, 2)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend: torch.Tensor | None,
                      dropout_p: float = 0.0, relax: float = 0.0) -> torch.Tensor:
    """Softmax attention written out, optionally with MERT-large's relaxation.

    Without relaxation this is what ``F.scaled_dot_product_attention``
    computes. With ``relax`` = r > 0 the scores ``s = q k^T / sqrt(d)`` go
    through softmax((s / r - max(s / r)) * r): mathematically the same
    softmax, but the product is formed from ``q / (sqrt(d) r)`` so that
    half-precision scores stay small, and the shift and softmax run in fp32.

    Args:
        q, k, v: ``(B, H, T, d)``.
        attend: ``(B, 1, 1, T)`` bool, True on keys that take part, or None.
        dropout_p: attention-probability dropout (applied when > 0).
        relax: r (MERT-large: 32); 0 = off.

    Returns:
        ``(B, H, T, d)``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    if relax > 0:
        scores = torch.matmul(q * (scale / relax), k.transpose(-2, -1)).float()  # B, H, T, T
    else:
        scores = torch.matmul(q * scale, k.transpose(-2, -1))
    if attend is not None:
        scores = scores.masked_fill(~attend, float("-inf"))
    if relax > 0:
        scores = (scores - scores.amax(dim=-1, keepdim=True)) * relax
    weights = dropout(scores.softmax(dim=-1), dropout_p, training=dropout_p > 0)
    return torch.matmul(weights.to(v.dtype), v)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a key padding mask.

    q, k and v come from one fused Linear (one GEMM instead of three: the
    training step 1.01-1.02x faster on 95m and tiny, measured by
    ``python benchmarks/bench_student.py --levers`` like the paths below); the attention is
    ``F.scaled_dot_product_attention`` except in two cases, where it is
    written out (``softmax_attention``): fp16 with ``attention_relax`` set,
    and training with attention dropout on the CPU, where SDPA falls back to
    the same math with a slower dropout and an extra pass for fully masked rows
    (written out, the training step is 1.03-1.04x faster on tiny and 95m; at
    inference SDPA's fused kernel is 1.04-1.07x faster than written out).

    Args:
        embed_dim: model width D.
        num_heads: H; D must be divisible by H.
        dropout: attention-probability dropout.
        attention_relax: MERT-large's r (32), 0 = off. It only changes the
            fp16 computation; in fp32/bf16 the softmax is the same and SDPA's
            fused kernels never hold the scores in half precision anyway.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, attention_relax: float = 0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"SelfAttention: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.attention_relax = dropout, attention_relax
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor, attend: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: ``(B, T, D)``.
            attend: ``(B, 1, 1, T)`` bool, True on keys that take part (valid
                frames), or None when every frame is valid.

        Returns:
            ``(B, T, D)``.
        """
        batch, frames, _ = x.shape
        qkv = self.qkv(x).view(batch, frames, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B, H, T, d
        dropout_p = self.dropout if self.training else 0.0
        relax = self.attention_relax if q.dtype == torch.float16 else 0.0
        if relax > 0 or (dropout_p > 0 and q.device.type == "cpu"):
            out = softmax_attention(q, k, v, attend, dropout_p, relax)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=dropout_p)
        return self.out_proj(out.transpose(1, 2).reshape(batch, frames, self.embed_dim))


class FeedForward(nn.Module):
    """Linear -> GELU -> Dropout -> Linear -> Dropout.

    Args:
        embed_dim: D.
        ffn_dim: inner width (the MERT paper: 3072 base, 4096 large).
        activation_dropout: after the GELU.
        dropout: after the output Linear.
    """

    def __init__(self, embed_dim: int, ffn_dim: int, activation_dropout: float = 0.0, dropout: float = 0.0):
        super().__init__()
        self.intermediate = nn.Linear(embed_dim, ffn_dim)
        self.activation_dropout = Dropout(activation_dropout)
        self.output = nn.Linear(ffn_dim, embed_dim)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, D)`` -> ``(B, T, D)``."""
        return self.dropout(self.output(self.activation_dropout(F.gelu(self.intermediate(x)))))


class EncoderLayer(nn.Module):
    """One transformer layer, post-LN (base) or pre-LN (large).

    post-LN: ``x = LN(x + drop(attn(x))); x = LN(x + ffn(x))``
    pre-LN:  ``x = x + drop(attn(LN(x))); x = x + ffn(LN(x))``

    Args:
        attention: a ``SelfAttention``.
        feed_forward: a ``FeedForward``.
        dropout: after the attention.
        layer_norm_first: pre-LN when True.
    """

    def __init__(self, attention: SelfAttention, feed_forward: FeedForward, dropout: float = 0.0,
                 layer_norm_first: bool = False, eps: float = 1e-5):
        super().__init__()
        self.attention, self.feed_forward = attention, feed_forward
        self.dropout = Dropout(dropout)
        self.attention_norm = nn.LayerNorm(attention.embed_dim, eps=eps)
        self.ffn_norm = nn.LayerNorm(attention.embed_dim, eps=eps)
        self.layer_norm_first = layer_norm_first

    def forward(self, x: torch.Tensor, attend: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T, D)`` -> ``(B, T, D)``; ``attend`` as in ``SelfAttention``."""
        if self.layer_norm_first:
            x = x + self.dropout(self.attention(self.attention_norm(x), attend))
            return x + self.feed_forward(self.ffn_norm(x))
        x = self.attention_norm(x + self.dropout(self.attention(x, attend)))
        return self.ffn_norm(x + self.feed_forward(x))


class Transformer(nn.Module):
    """Positional embedding, layers with layerdrop, and the pre- or post-LN norm.

    Args:
        pos_conv: a ``ConvolutionalPositionalEmbedding``.
        layers: the ``EncoderLayer`` s.
        layer_norm: post-LN: applied to the input (after adding the positional
            embedding); pre-LN: applied to the output.
        dropout: on the input, after the positional embedding.
        layerdrop: probability of skipping each layer in training (the MERT paper: 0.05 base).
        layer_norm_first: pre-LN when True.
        activation_checkpointing: keep only each layer's input for the backward
            pass and recompute the layer there (less memory, about one more
            forward of compute); the gradients are the same.
    """

    def __init__(self, pos_conv: ConvolutionalPositionalEmbedding, layers: list[EncoderLayer], layer_norm: nn.LayerNorm,
                 dropout: float = 0.0, layerdrop: float = 0.0, layer_norm_first: bool = False,
                 activation_checkpointing: bool = False):
        super().__init__()
        self.pos_conv = pos_conv
        self.layers = nn.ModuleList(layers)
        self.layer_norm = layer_norm
        self.dropout = Dropout(dropout)
        self.layerdrop, self.layer_norm_first = layerdrop, layer_norm_first
        self.activation_checkpointing = activation_checkpointing

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """
        Args:
            x: ``(B, T, D)`` projected (and masked) features.
            padding_mask: ``(B, T)`` bool, True on padding frames, or None.
            output_hidden_states: also return every layer's input and the last output.

        Returns:
            ``(B, T, D)`` output (after the final LayerNorm in pre-LN), and
            None or ``num_layers + 1`` tensors ``(B, T, D)``: the transformer's
            input (after the positional embedding, and the LayerNorm in
            post-LN), then each layer's output. A layer skipped by layerdrop
            repeats its input, so the list length never changes.
        """
        attend = None
        if padding_mask is not None:
            # zeros on padding, so the positional conv sees what it sees past the end of an item run alone
            x = x.masked_fill(padding_mask[..., None], 0.0)
            keep = ~padding_mask
            # an item with no valid frame attends to everything: finite junk instead of NaN (it is all padding)
            keep = keep | ~keep.any(dim=1, keepdim=True)
            attend = keep[:, None, None, :]  # B, 1, 1, T
        x = x + self.pos_conv(x)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = self.dropout(x)
        hidden = [x] if output_hidden_states else None
        for layer in self.layers:
            # torch.rand on the CPU generator: no device sync, reproducible under the trainer's seed
            if not (self.training and self.layerdrop > 0 and float(torch.rand(())) < self.layerdrop):
                if self.activation_checkpointing and torch.is_grad_enabled():
                    # the recomputation replays the same dropout masks (the RNG state is saved with the input)
                    x = torch.utils.checkpoint.checkpoint(layer, x, attend, use_reentrant=False)
                else:
                    x = layer(x, attend)
            if hidden is not None:
                hidden.append(x)
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x, hidden
