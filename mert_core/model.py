"""The student encoder (HuBERT / MERT architecture) and its presets.

``MertStudent`` composes the parts from :mod:`mert_core.components`; the
presets ``tiny``, ``base_95m`` and ``large_330m`` are plain factory functions
over one builder, ``mert_student(**args)``. ``build_student`` is the only
function that reads the run config. A student remembers its builder
arguments (``student.args``), so a checkpoint can rebuild it with
``MertStudent.from_args(args)``.

"MERT" in the docstrings cites the MERT paper (Li et al. 2023, arXiv
2306.00107), whose student is HuBERT's (Hsu et al. 2021) architecture.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mert_core.components import (
    ConvLayerBlock,
    ConvolutionalPositionalEmbedding,
    EncoderLayer,
    FeatureExtractor,
    FeatureProjection,
    FeedForward,
    SelfAttention,
    Transformer,
    grad_multiply,
    valid_mask,
)
from mert_core.errors import CheckpointError, ConfigError
from mert_core.geometry import FrameGeometry
from mert_core.masking import MaskEmbedding


@dataclass
class StudentOutput:
    """What the student returns.

    Attributes:
        hidden_states: None, or ``num_layers + 1`` tensors ``(B, T, D)`` as
            ``transformers.HubertModel(output_hidden_states=True)`` gives them:
            the transformer's input, then each layer's output (pre-LN: before
            the final LayerNorm, whose output is ``last_hidden``).
        last_hidden: ``(B, T, D)``, equal to HubertModel's ``last_hidden_state``.
        padding_mask: ``(B, T)`` bool, True on padding frames (their values are
            unspecified; use only valid frames).
        mask: ``(B, T)`` bool, True on masked frames (the mask passed in), or None.
        features_penalty: scalar, mean square of the conv features over valid
            frames (HuBERT's feature penalty, fp32).
        features: ``(B, T, C)`` the conv feature extractor's output (for
            learning signals; kept for the backward pass anyway).
    """

    hidden_states: list[torch.Tensor] | None
    last_hidden: torch.Tensor
    padding_mask: torch.Tensor
    mask: torch.Tensor | None
    features_penalty: torch.Tensor
    features: torch.Tensor | None = None


class MertStudent(nn.Module):
    """Conv feature extractor -> feature projection -> mask embedding -> transformer.

    Build one with a preset (``tiny()``, ``base_95m()``, ``large_330m()``),
    ``mert_student(**args)`` or ``MertStudent.from_args(args)``.

    Args:
        feature_extractor: raw audio -> ``(B, T, C)`` frames.
        feature_projection: ``(B, T, C)`` -> ``(B, T, D)``.
        mask_embedding: replaces masked frames after the projection.
        transformer: the encoder.
        feature_grad_mult: scales the conv extractor's gradient (the MERT paper: 0.1
            base, 1.0 large); 0 freezes it (run without autograd).
        sample_rate: of the audio the student reads (informational).
    """

    def __init__(self, feature_extractor: FeatureExtractor, feature_projection: FeatureProjection,
                 mask_embedding: MaskEmbedding, transformer: Transformer, feature_grad_mult: float = 1.0,
                 sample_rate: int = 24000):
        super().__init__()
        self.feature_extractor = feature_extractor
        self.feature_projection = feature_projection
        self.mask_embedding = mask_embedding
        self.transformer = transformer
        self.feature_grad_mult = feature_grad_mult
        self.sample_rate = sample_rate
        self.hop_samples = feature_extractor.hop_samples
        self.embed_dim = mask_embedding.weight.shape[0]
        self.num_layers = len(transformer.layers)
        self._args: dict[str, Any] | None = None

    # -- arguments round trip ------------------------------------------------

    @property
    def args(self) -> dict[str, Any]:
        """The builder arguments (plain JSON data): ``MertStudent.from_args(s.args)`` rebuilds ``s``."""
        if self._args is None:
            raise ValueError("MertStudent.args: this student was assembled by hand; build it with mert_student(**args) or a preset to store its arguments")
        return dict(self._args)

    @classmethod
    def from_args(cls, args: dict[str, Any], stored_shapes: dict[str, tuple[int, ...]] | None = None,
                  optional: tuple[str, ...] = ()) -> "MertStudent":
        """A freshly initialised student built from ``args`` (as stored by ``.args``).

        Args:
            args: the builder arguments.
            stored_shapes: if given, the shape of every tensor a file holds for
                this student. ``args`` (untrusted metadata) are checked against
                them on the meta device before anything is allocated, so a small
                file cannot ask for a model that fills the memory.
            optional: keys the file may lack (they keep their initial values).

        Raises:
            ValueError: arguments of the wrong type, unknown, or (with
                ``stored_shapes``) implying other tensors than the file holds.
        """
        if not isinstance(args, dict):
            raise CheckpointError(f"MertStudent.from_args: expected a dict of builder arguments, got {type(args).__name__}")
        unknown = [k for k in args if k not in STUDENT_ARG_NAMES]
        if unknown:
            raise CheckpointError(f"MertStudent.from_args: unknown argument {unknown[0]!r} (valid: {', '.join(STUDENT_ARG_NAMES)}); "
                             f"the checkpoint was written by another version of mert")
        if stored_shapes is not None:
            _check_stored_shapes(args, stored_shapes, optional)
        return _build_from(args)

    # -- shapes --------------------------------------------------------------

    @property
    def receptive_field(self) -> int:
        """Samples one frame sees (400): shorter input gives no frame."""
        return self.feature_extractor.receptive_field

    @property
    def geometry(self) -> FrameGeometry:
        """Sample rate, hop and receptive field of this student: what teachers and label stores frame by."""
        return FrameGeometry(self.sample_rate, self.hop_samples, self.receptive_field)

    def num_frames(self, num_samples):
        """Frames for ``num_samples`` samples: ``floor((S - 400) / 320) + 1``, 0 if shorter.

        Args:
            num_samples: an int or an integer tensor of any shape.
        """
        return self.feature_extractor.num_frames(num_samples)

    # -- forward -------------------------------------------------------------

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> StudentOutput:
        """
        Args:
            wave: ``(B, S)`` float audio at ``sample_rate``.
            lengths: ``(B,)`` valid samples per item (right padding); None = all valid.
            mask: ``(B, T)`` bool, frames to replace by the mask embedding
                (``T = num_frames(S)``), or None.
            output_hidden_states: also return every layer's hidden states.

        Returns:
            a ``StudentOutput``. Input shorter than ``receptive_field`` (400
            samples for the paper's stack, 1840 for the ``cpu`` presets) gives
            well-defined empty outputs with T = 0.
        """
        if wave.dim() != 2 or not wave.is_floating_point():
            raise ValueError(f"MertStudent wave: expected a float tensor of shape (batch, samples), got {wave.dtype} {tuple(wave.shape)}")
        batch, samples = wave.shape
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=wave.device)
            if lengths.shape != (batch,) or lengths.is_floating_point():
                raise ValueError(f"MertStudent lengths: expected an integer tensor of shape ({batch},), got {lengths.dtype} {tuple(lengths.shape)}")
            if bool(((lengths < 0) | (lengths > samples)).any()):  # host sync, cheap next to the model
                raise ValueError(f"MertStudent lengths: expected values in [0, {samples}] (the padded length), got {lengths.tolist()}")
            # nothing padded: take the mask-free paths (native GroupNorm, SDPA without a mask)
            lengths = None if bool((lengths == samples).all()) else lengths.long()
        frames = int(self.num_frames(samples))
        if mask is not None and (mask.shape != (batch, frames) or mask.dtype != torch.bool):
            raise ValueError(f"MertStudent mask: expected a bool tensor of shape ({batch}, {frames}) for {samples} samples, "
                             f"got {mask.dtype} {tuple(mask.shape)}; make it with compute_span_mask((B, student.num_frames(S)), ...)")
        if frames == 0:
            return self._empty(wave, mask, output_hidden_states)

        if self.feature_grad_mult > 0:
            features, frame_lengths = self.feature_extractor(wave, lengths)  # B, T, C
            features = grad_multiply(features, self.feature_grad_mult)
        else:
            with torch.no_grad():
                features, frame_lengths = self.feature_extractor(wave, lengths)
        if frame_lengths is None:
            padding_mask = torch.zeros(batch, frames, dtype=torch.bool, device=wave.device)
            features_penalty = features.float().square().mean()
        else:
            padding_mask = ~valid_mask(frame_lengths, frames)
            valid = (~padding_mask)[..., None].to(torch.float32)
            count = (valid.sum() * features.shape[-1]).clamp(min=1.0)
            features_penalty = (features.float().square() * valid).sum() / count

        x = self.feature_projection(features)  # B, T, D
        if mask is not None:
            x = self.mask_embedding(x, mask)
        last_hidden, hidden_states = self.transformer(
            x, padding_mask if frame_lengths is not None else None, output_hidden_states=output_hidden_states
        )
        return StudentOutput(hidden_states, last_hidden, padding_mask, mask, features_penalty, features)

    def _empty(self, wave: torch.Tensor, mask: torch.Tensor | None, output_hidden_states: bool) -> StudentOutput:
        batch = wave.shape[0]
        dtype = torch.get_autocast_dtype(wave.device.type) if torch.is_autocast_enabled(wave.device.type) else wave.dtype
        empty = wave.new_zeros(batch, 0, self.embed_dim, dtype=dtype)
        hidden = [empty] * (self.num_layers + 1) if output_hidden_states else None
        padding_mask = torch.zeros(batch, 0, dtype=torch.bool, device=wave.device)
        return StudentOutput(hidden, empty, padding_mask, mask, wave.new_zeros((), dtype=torch.float32))


# -- the builder and presets ------------------------------------------------------

def mert_student(
    *,
    conv_channels: int | list[int] = 512,
    conv_kernels: list[int] = (10, 3, 3, 3, 3, 2, 2),
    conv_strides: list[int] = (5, 2, 2, 2, 2, 2, 2),
    conv_bias: bool = False,
    extractor_norm: str = "group",
    embed_dim: int = 768,
    num_layers: int = 12,
    num_heads: int = 12,
    ffn_dim: int = 3072,
    layer_norm_first: bool = False,
    pos_conv_kernel: int = 128,
    pos_conv_groups: int = 16,
    projection_layer_norm: bool = True,
    dropout: float = 0.1,
    attention_dropout: float = 0.1,
    activation_dropout: float = 0.0,
    input_dropout: float = 0.1,
    layerdrop: float = 0.05,
    attention_relax: float = 0.0,
    feature_grad_mult: float = 0.1,
    layer_norm_eps: float = 1e-5,
    sample_rate: int = 24000,
) -> MertStudent:
    """Build a student from plain arguments (defaults: the 95M base model).

    Args:
        conv_channels: channels of every conv layer (an int) or one per layer.
        conv_kernels, conv_strides: per conv layer (the MERT paper: (10,3,3,3,3,2,2),
            (5,2,2,2,2,2,2) = hop 320).
        conv_bias: conv biases (the MERT paper: none).
        extractor_norm: "group" (GroupNorm after the first conv only, as in the MERT paper) or
            "layer" (LayerNorm after every conv, fairseq's ``layer_norm`` mode).
        embed_dim, num_layers, num_heads, ffn_dim: transformer size.
        layer_norm_first: pre-LN with a final LayerNorm (large) or post-LN (base).
        pos_conv_kernel, pos_conv_groups: positional conv (128, 16 in the MERT paper).
        projection_layer_norm: LayerNorm before the feature projection.
        dropout: hidden dropout (after attention, FFN and positional embedding).
        attention_dropout: on attention probabilities.
        activation_dropout: inside the FFN, after the GELU.
        input_dropout: after the feature projection (HuBERT's dropout_input).
        layerdrop: probability of skipping a layer in training.
        attention_relax: MERT-large's r (32); 0 = off.
        feature_grad_mult: conv extractor gradient scale (0 = frozen).
        layer_norm_eps: of every LayerNorm and the GroupNorm.
        sample_rate: of the input audio (informational; 24 kHz in the MERT paper).
    """
    args = dict(locals())
    num_conv = len(conv_kernels)
    channels = [conv_channels] * num_conv if isinstance(conv_channels, int) else list(conv_channels)
    if len(channels) != num_conv or len(conv_strides) != num_conv:
        raise ConfigError(f"student arguments: conv_channels, conv_kernels and conv_strides need one value per conv layer; "
                         f"got {len(channels)}, {num_conv} and {len(conv_strides)}")
    if extractor_norm not in ("group", "layer"):
        raise ConfigError(f"student argument extractor_norm: expected 'group' or 'layer', got {extractor_norm!r}")
    if embed_dim % num_heads:
        raise ConfigError(f"student arguments: embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
    if embed_dim % pos_conv_groups:
        raise ConfigError(f"student arguments: embed_dim {embed_dim} must be divisible by pos_conv_groups {pos_conv_groups}")
    for name in ("dropout", "attention_dropout", "activation_dropout", "input_dropout", "layerdrop"):
        if not 0.0 <= args[name] <= 1.0:
            raise ConfigError(f"student argument {name}: expected a probability in [0, 1], got {args[name]}")

    conv_layers, in_channels = [], 1
    for i, (out_channels, kernel, stride) in enumerate(zip(channels, conv_kernels, conv_strides)):
        norm = "layer" if extractor_norm == "layer" else ("group" if i == 0 else None)
        conv_layers.append(ConvLayerBlock(in_channels, out_channels, kernel, stride, bias=conv_bias, norm=norm, eps=layer_norm_eps))
        in_channels = out_channels
    layers = [
        EncoderLayer(
            SelfAttention(embed_dim, num_heads, attention_dropout, attention_relax),
            FeedForward(embed_dim, ffn_dim, activation_dropout, dropout),
            dropout=dropout,
            layer_norm_first=layer_norm_first,
            eps=layer_norm_eps,
        )
        for _ in range(num_layers)
    ]
    transformer = Transformer(
        ConvolutionalPositionalEmbedding(embed_dim, pos_conv_kernel, pos_conv_groups, dropout),
        layers,
        nn.LayerNorm(embed_dim, eps=layer_norm_eps),
        dropout=dropout,
        layerdrop=layerdrop,
        layer_norm_first=layer_norm_first,
    )
    _init_bert_params(transformer)
    student = MertStudent(
        FeatureExtractor(conv_layers),
        FeatureProjection(in_channels, embed_dim, input_dropout, projection_layer_norm, layer_norm_eps),
        MaskEmbedding(embed_dim),
        transformer,
        feature_grad_mult=feature_grad_mult,
        sample_rate=sample_rate,
    )
    args["conv_channels"] = conv_channels if isinstance(conv_channels, int) else list(conv_channels)
    args["conv_kernels"], args["conv_strides"] = list(conv_kernels), list(conv_strides)
    student._args = args
    return student


def _init_bert_params(module: nn.Module) -> None:
    """fairseq's init_bert_params for the transformer's Linear layers: N(0, 0.02), zero bias."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


STUDENT_ARG_NAMES: tuple[str, ...] = tuple(inspect.signature(mert_student).parameters)


def _build_from(args: dict[str, Any], device: str | None = None) -> "MertStudent":
    """``mert_student(**args)`` (on ``device``), with arguments of the wrong type as one ValueError."""
    try:
        with torch.device(device) if device else contextlib.nullcontext():
            return mert_student(**args)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise CheckpointError(f"MertStudent.from_args: the model arguments do not build a student ({type(exc).__name__}: {exc})") from None


def _check_stored_shapes(args: dict[str, Any], stored: dict[str, tuple[int, ...]], optional: tuple[str, ...]) -> None:
    """Raise ValueError unless ``mert_student(**args)`` has exactly the ``stored`` tensors and shapes.

    Layer counts are compared first (building a billion layers, even on the
    meta device, would take hours); then the student is built on the meta
    device, which records shapes without allocating memory.
    """
    defaults = inspect.signature(mert_student).parameters

    def stored_count(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in stored if k.startswith(prefix)})

    for name, prefix in (("num_layers", "transformer.layers."), ("conv_kernels", "feature_extractor.conv_layers.")):
        value = args.get(name, defaults[name].default)
        count = len(value) if name == "conv_kernels" and isinstance(value, (list, tuple)) else value
        if count != stored_count(prefix):
            raise CheckpointError(f"model argument {name} asks for {str(count)[:40]} layers, the file holds {stored_count(prefix)}")
    skeleton = _build_from(args, device="meta")
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    for key, shape in stored.items():
        if key not in expected:
            raise CheckpointError(f"the file holds tensor {key!r}, which has no place in the student the model arguments describe")
        if tuple(shape) != expected[key]:
            raise CheckpointError(f"{key} has shape {tuple(shape)} in the file, the model arguments imply {expected[key]}")
    missing = sorted(set(expected) - set(stored) - set(optional))
    if missing:
        raise CheckpointError(f"the file lacks tensor {missing[0]!r} (and {len(missing) - 1} more) that the model arguments imply")
"""Every argument ``mert_student`` takes (the keys of ``student.args``)."""

TINY_ARGS: dict[str, Any] = dict(
    conv_channels=64, embed_dim=128, num_layers=2, num_heads=4, ffn_dim=512,
    dropout=0.1, attention_dropout=0.1, input_dropout=0.1, layerdrop=0.0, feature_grad_mult=0.1,
)
"""A CPU-sized student for tests and demos: the real 7-layer conv stack (hop 320) with 64 channels, 2 x 128-wide layers."""

CPU_ARGS: dict[str, Any] = dict(
    TINY_ARGS, conv_channels=128, conv_kernels=[1600, 4], conv_strides=[80, 4],
)
"""``tiny``'s transformer on a front end that can hear pitch (not the paper's conv stack; docs/learning.md).

The paper's stack sees 400 samples (17 ms) per frame: too short to resolve a
semitone below ~1 kHz, so a small student must assemble pitch across frames, which
it does not learn in a CPU budget (it learns the loudness envelope and probes below
its random twin). Here the first conv is a 1600-sample (67 ms) filter bank at a
hop of 80, and a second conv pools 4 of them: hop 320 (75 Hz) as in the paper,
receptive field 1840 samples. Teachers still make their targets on the paper's
400-sample grid (``FrameGeometry.target_grid``); the trainer shifts them onto these
frames (``FrameGeometry.shift_from``: 2 leading targets dropped)."""

SMALL_ARGS: dict[str, Any] = dict(
    TINY_ARGS, conv_channels=256, embed_dim=256, num_layers=4, num_heads=4, ffn_dim=1024,
)
"""The paper's 7-layer conv stack at 256 channels under 4 x 256 layers (4.8 M parameters): the
smallest student of the paper's shape that the CPU scaling curve trains (docs/scaling.md)."""

CPU_SMALL_ARGS: dict[str, Any] = dict(
    SMALL_ARGS, conv_channels=256, conv_kernels=[1600, 4], conv_strides=[80, 4],
)
"""``small``'s transformer on the ``cpu`` preset's front end (1600-sample filter bank at hop 80, then
a stride-4 conv; hop 320, receptive field 1840)."""

BASE_95M_ARGS: dict[str, Any] = dict(
    conv_channels=512, embed_dim=768, num_layers=12, num_heads=12, ffn_dim=3072, layer_norm_first=False,
    dropout=0.1, attention_dropout=0.1, activation_dropout=0.0, input_dropout=0.1, layerdrop=0.05,
    attention_relax=0.0, feature_grad_mult=0.1,
)
"""MERT-95M (Li et al. 2023, arXiv 2306.00107): post-LN, 12 x 768, dropouts 0.1, layerdrop 0.05, feature_grad_mult 0.1 (94.37 M parameters)."""

LARGE_330M_ARGS: dict[str, Any] = dict(
    conv_channels=512, embed_dim=1024, num_layers=24, num_heads=16, ffn_dim=4096, layer_norm_first=True,
    dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, input_dropout=0.0, layerdrop=0.0,
    attention_relax=32.0, feature_grad_mult=1.0,
)
"""MERT-330M (Li et al. 2023, arXiv 2306.00107): pre-LN with a final LayerNorm, 24 x 1024, no dropout, attention relax 32, feature_grad_mult 1.0."""

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": TINY_ARGS, "cpu": CPU_ARGS, "small": SMALL_ARGS, "cpu-small": CPU_SMALL_ARGS,
    "95m": BASE_95M_ARGS, "330m": LARGE_330M_ARGS,
}


PRESET_FINAL_DIMS: dict[str, int] = {"tiny": 64, "cpu": 64, "small": 64, "cpu-small": 64, "95m": 64, "330m": 128}
"""Each preset's projection size of the discrete target heads (MERT: 64 for the base model, 128 for the
large one), used when ``loss.final_dim`` is not set."""


def student_args(preset: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """The full builder arguments of a preset with ``overrides`` applied.

    Raises:
        ValueError: unknown preset or unknown override name.
    """
    if preset not in PRESETS:
        raise ConfigError(f"student preset {preset!r}: expected one of {', '.join(PRESETS)}")
    unknown = [k for k in overrides if k not in STUDENT_ARG_NAMES]
    if unknown:
        raise ConfigError(f"student override {unknown[0]!r} is not a student argument; valid names: {', '.join(STUDENT_ARG_NAMES)}")
    defaults = {name: p.default for name, p in inspect.signature(mert_student).parameters.items()}
    args = {**defaults, **PRESETS[preset], **overrides}
    for key in ("conv_kernels", "conv_strides"):
        args[key] = list(args[key])
    return args


def tiny(**overrides: Any) -> MertStudent:
    """A small student that trains on a CPU: 64-channel conv stack (hop 320), 2 layers x 128, 4 heads."""
    return mert_student(**student_args("tiny", **overrides))


def base_95m(**overrides: Any) -> MertStudent:
    """MERT-95M / HuBERT base: 12 post-LN layers x 768, 12 heads, FFN 3072."""
    return mert_student(**student_args("95m", **overrides))


def large_330m(**overrides: Any) -> MertStudent:
    """MERT-330M / HuBERT large: 24 pre-LN layers x 1024, 16 heads, FFN 4096, attention relax 32."""
    return mert_student(**student_args("330m", **overrides))


def build_student(model_config, sample_rate: int | None = None) -> MertStudent:
    """The student a run config asks for: ``model_config.preset`` with ``model_config.overrides``.

    Args:
        model_config: a ``mert_core.config.ModelConfig``.
        sample_rate: of the audio it will read (the run's ``data.sample_rate``),
            unless the overrides name one; None: the preset's (24 kHz).

    Raises:
        ValueError: one line naming a bad override (``config field 'model.overrides' ...``).
    """
    overrides = dict(model_config.overrides)
    unknown = [k for k in overrides if k not in STUDENT_ARG_NAMES]
    if unknown:
        raise ConfigError(f"config field 'model.overrides': {unknown[0]!r} is not a student argument; "
                         f"valid names: {', '.join(STUDENT_ARG_NAMES)}")
    try:
        rate = {} if sample_rate is None else {"sample_rate": sample_rate}
        student = mert_student(**student_args(model_config.preset, **{**rate, **overrides}))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config field 'model.overrides' {overrides}: {exc}") from None
    # a way of running the model, not part of it: not a builder argument, not in checkpoints' model_args
    student.transformer.activation_checkpointing = model_config.activation_checkpointing
    return student
