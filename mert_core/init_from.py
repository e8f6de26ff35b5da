"""Continued pretraining: start a run's student (and heads) from existing weights.

``model.init_from`` (``mert train --init-from PATH``) names a Hugging Face
HuBERT/MERT folder (e.g. m-a-p/MERT-v1-95M, ``model_type`` hubert or
mert_model), a ``mert`` run folder, a ``.pt`` checkpoint or a
``student.safetensors``. The run's preset decides the architecture; the source
must fit it tensor for tensor. Heads are fresh, except those of a ``mert``
checkpoint whose teacher (name and options) is the same in the new run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open

from mert_core.checkpoint import (
    LAST, STUDENT_FILE, CheckpointError, check_export_content, check_finite_weights, file_digest, load_checkpoint,
)
from mert_core.convert import HFConversionError, read_hf_hubert
from mert_core.errors import InitFromError  # noqa: F401 - re-exported: raised here, imported from here
from mert_core.heads import head_key

# Builder arguments that change the computation without changing any tensor's shape.
_STRUCTURE_ARGS = ("layer_norm_first", "num_heads", "extractor_norm", "conv_kernels", "conv_strides", "layer_norm_eps")


@dataclass
class InitSource:
    """Weights to start from, in ``MertStudent`` names.

    Attributes:
        weights_file: the file whose digest identifies the weights.
        args: the source student's builder arguments.
        student: its state dict.
        heads: a ``mert`` checkpoint's ``TargetHeads`` state dict (else empty).
        teacher_hashes: teacher name -> ``Teacher.config_hash()`` of those heads.
    """

    weights_file: Path
    args: dict[str, Any]
    student: dict[str, torch.Tensor]
    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_hashes: dict[str, str] = field(default_factory=dict)


def read_init_source(path: str | Path) -> InitSource:
    """Read a run folder (its ``last.pt``, which has the heads), ``.pt``, ``.safetensors`` or HF folder.

    Raises:
        InitFromError: the path is none of these or cannot be read.
    """
    path = Path(path)
    where = f"config field 'model.init_from' ({path})"
    if not path.exists():
        raise InitFromError(f"{where}: does not exist; pass a Hugging Face HuBERT/MERT folder, a mert run folder, a .pt or a student.safetensors")
    try:
        if path.is_dir() and not (path / LAST).exists() and not (path / STUDENT_FILE).exists():
            args, student, weights_file = read_hf_hubert(path)
            return InitSource(weights_file, args, student)
        if path.is_dir():
            path = path / LAST if (path / LAST).exists() else path / STUDENT_FILE
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if "model_args" not in meta:
                raise InitFromError(f"{where}: a safetensors file without mert model_args metadata; "
                                    f"for a Hugging Face model pass its folder (with config.json) instead")
            weights = load_file(str(path))
            check_export_content(path, meta, weights)
            return InitSource(path, json.loads(meta["model_args"]), weights)
        state = load_checkpoint(path)
        return InitSource(path, state["model_args"], state["student"], state["heads"], state.get("teacher_hashes", {}))
    except (HFConversionError, CheckpointError) as exc:
        raise InitFromError(f"{where}: {exc}") from None


def init_student(path: str | Path, student, heads, teacher_hashes: dict[str, str], expected_hash: str | None = None) -> tuple[str, list[str]]:
    """Load the source's weights into ``student`` (and matching heads into ``heads``), in place.

    Args:
        path: the source (see ``read_init_source``).
        student: the run's freshly built ``MertStudent``.
        heads: the run's freshly built ``TargetHeads``.
        teacher_hashes: the run's teacher name -> ``config_hash()``.
        expected_hash: refuse a source whose digest differs (a recorded ``init_from_hash``).

    Returns:
        the source's digest and the names of the teachers whose heads were taken over.

    Raises:
        InitFromError: a tensor that does not fit or is not finite (the first one
            is named), an architecture argument that differs, or a changed source.
    """
    source = read_init_source(path)
    where = f"config field 'model.init_from' ({path})"
    digest = file_digest(source.weights_file)
    if expected_hash is not None and digest != expected_hash:
        raise InitFromError(f"{where}: its weights hash to {digest}, the config records {expected_hash}; "
                            f"the source changed: point init_from at the original or drop model.init_from_hash")
    check_finite_weights(where, source.student, InitFromError)
    ours = student.state_dict()
    for key, tensor in ours.items():
        theirs = source.student.get(key)
        if theirs is None and key == "mask_embedding.weight":
            continue  # a HubertModel without masked_spec_embed: keep the fresh one
        if theirs is None:
            raise InitFromError(f"{where}: has no tensor {key!r}, which the run's student needs; choose the preset "
                                f"(and model.overrides) of the source")
        if tuple(theirs.shape) != tuple(tensor.shape):
            raise InitFromError(f"{where}: tensor {key} has shape {tuple(theirs.shape)}, the run's student needs "
                                f"{tuple(tensor.shape)}; choose the preset (and model.overrides) of the source")
    extra = [k for k in source.student if k not in ours]
    if extra:
        raise InitFromError(f"{where}: tensor {extra[0]!r} has no place in the run's student; choose the preset "
                            f"(and model.overrides) of the source")
    args = student.args
    for name in _STRUCTURE_ARGS:
        theirs, mine = source.args.get(name), args[name]
        if theirs is not None and _plain(theirs) != _plain(mine):
            raise InitFromError(f"{where}: the source has {name}={theirs!r}, the run's student {mine!r}; "
                                f"set model.overrides.{name}={theirs!r} (or the matching preset)")
    student.load_state_dict({**ours, **{k: v.to(ours[k].dtype) for k, v in source.student.items()}})
    reused = _take_matching_heads(source, heads, teacher_hashes)
    return digest, reused


def _take_matching_heads(source: InitSource, heads, teacher_hashes: dict[str, str]) -> list[str]:
    """Copy each head whose teacher has the same name, options and shapes in the source; the others stay fresh."""
    ours = heads.state_dict()
    reused = []
    for name in heads.specs:
        prefix = f"heads.{head_key(name)}."
        mine = {k: v for k, v in ours.items() if k.startswith(prefix)}
        theirs = {k: source.heads[k] for k in mine if k in source.heads}
        if (name in source.teacher_hashes and source.teacher_hashes[name] == teacher_hashes.get(name) and len(theirs) == len(mine)
                and all(theirs[k].shape == mine[k].shape for k in mine)):
            ours.update(theirs)
            reused.append(name)
    heads.load_state_dict(ours)
    return reused


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value
