"""``ema``: the student's own exponential moving average as its teacher
(data2vec, Baevski et al. 2022; Music2Vec, Li et al. 2022).

The targets of a batch are the average of the top K transformer layers of an
EMA copy of the student's transformer, each layer's output instance-normalised
over time, computed on the unmasked input and regressed at the masked frames.
As in data2vec's audio model (``ema_transformer_only``), the copy covers the
transformer (positional convolution included); its input is the *current*
student's conv features after the feature projection, before input dropout and
masking. A layer's output is its feed-forward block's output before the
residual connection (data2vec's ``layer_results``). The decay is annealed
linearly from ``decay`` to ``decay_end`` over ``anneal_steps`` updates.

Contract use (see the README's plugin guide): :meth:`attach` reads the
student's width and depth; :meth:`on_step` copies the transformer on the first
call and updates the copy after every optimizer step; :meth:`training_state`
puts the copy in every checkpoint, so a resumed run continues the same
average. The targets change as the student trains, so there is no offline
label store for this teacher. See ``docs/teachers.md``.
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field

from mert_core.errors import CheckpointError, PluginError
from mert_core.hookspecs import hookimpl
from mert_core.teacher import TargetSpec, Teacher, TeacherOptions


class EMAOptions(TeacherOptions):
    top_k: int = Field(8, ge=1, description="Average this many top transformer layers (data2vec: 8); "
                       "at most the student's depth (a 2-layer tiny student averages 2).")
    decay: float = Field(0.999, gt=0, lt=1, description="EMA decay at the first update (data2vec: 0.999).")
    decay_end: float = Field(0.9999, gt=0, le=1, description="EMA decay after anneal_steps updates (data2vec: 0.9999).")
    anneal_steps: int = Field(30000, ge=1, description="Updates over which the decay rises linearly from decay to decay_end (data2vec audio: 30000).")
    instance_norm: bool = Field(True, description="Instance-normalise each layer's output over time before averaging (data2vec audio: on).")


class EMATeacher(Teacher):
    name = "ema"
    description = "Regress the averaged top layers of an EMA copy of the student (data2vec / Music2Vec)"
    Options = EMAOptions
    follows_student = True

    def __init__(self, options: EMAOptions, *args, **kwargs) -> None:
        super().__init__(options, *args, **kwargs)
        self.student: torch.nn.Module | None = None  # a reference, not a submodule: never saved or moved by us
        self.transformer: torch.nn.Module | None = None
        self.register_buffer("last_step", torch.tensor(-1, dtype=torch.long), persistent=False)

    # -- the contract ------------------------------------------------------------

    def attach(self, student: torch.nn.Module) -> None:
        object.__setattr__(self, "student", student)  # plain attribute: the student is not part of the teacher
        self.transformer = copy.deepcopy(student.transformer).requires_grad_(False).eval()
        self.top_k = min(self.options.top_k, len(self.transformer.layers))

    def target_spec(self) -> TargetSpec:
        if self.transformer is None:
            raise PluginError("teacher 'ema' follows the student being trained: it has targets only inside `mert train` "
                             "(no `mert teacher label`, no label store)")
        return TargetSpec(kind="continuous", dim=self.student.embed_dim, frame_rate_hz=self.frame_rate_hz, default_weight=1.0)

    def advice(self) -> list[str]:
        """data2vec-style targets collapse early while the copy is still the random initial network."""
        return [] if self.options.decay_end >= 0.9999 else ["teacher.ema.decay_end=0.9999"]

    def decay_at(self, updates: int) -> float:
        """The decay of the update that brings the copy to ``updates`` steps."""
        o = self.options
        if updates >= o.anneal_steps:
            return o.decay_end
        return o.decay + (o.decay_end - o.decay) * updates / o.anneal_steps

    @torch.no_grad()
    def on_step(self, student: torch.nn.Module, step: int) -> None:
        if int(self.last_step) < 0:  # first call of a fresh run: start from the student's weights
            self.transformer.load_state_dict(student.transformer.state_dict())
        elif step != int(self.last_step):  # after an optimizer step (the first call of a resumed run repeats the step)
            d = self.decay_at(step)
            for ema, live in zip(self.transformer.parameters(), student.transformer.parameters()):
                ema.mul_(d).add_(live.detach(), alpha=1.0 - d)
            for ema, live in zip(self.transformer.buffers(), student.transformer.buffers()):
                ema.copy_(live)
        self.last_step.fill_(step)

    def training_state(self) -> dict[str, torch.Tensor]:
        state = {f"transformer.{k}": v for k, v in self.transformer.state_dict().items()}
        return {**state, "last_step": self.last_step.clone()}

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            raise CheckpointError("teacher 'ema': the checkpoint holds no EMA weights; it was written by a run without this teacher")
        self.transformer.load_state_dict({k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")})
        self.last_step.fill_(int(state["last_step"]))

    @torch.no_grad()
    def targets(self, wave: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, T, D)`` float32: the instance-normalised average of the EMA copy's top layers."""
        if self.transformer is None:
            self.target_spec()  # raises the explanation
        student = self.student
        features, _ = student.feature_extractor(wave, None)
        proj = student.feature_projection
        x = proj.layer_norm(features) if proj.layer_norm is not None else features
        x = proj.projection(x)  # data2vec's pre_encoder_features: before input dropout, unmasked
        outputs: list[torch.Tensor] = []
        hooks = [layer.feed_forward.register_forward_hook(lambda _m, _i, out: outputs.append(out))
                 for layer in self.transformer.layers[-self.top_k:]]
        try:
            self.transformer.eval()
            self.transformer(x)
        finally:
            for h in hooks:
                h.remove()
        total = None
        for out in outputs:
            out = out.float()
            if self.options.instance_norm:  # F.instance_norm over time, also defined for a 1-frame clip (all zeros)
                var, mean = torch.var_mean(out, dim=1, unbiased=False, keepdim=True)
                out = (out - mean) * torch.rsqrt(var + 1e-5)
            total = out if total is None else total + out
        return (total / len(outputs)).contiguous()


@hookimpl
def register_teachers(register):
    register(EMATeacher)
