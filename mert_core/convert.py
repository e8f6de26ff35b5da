"""Load Hugging Face ``HubertModel`` weights (e.g. m-a-p/MERT-v1-95M / -330M)
into a ``MertStudent``, without importing transformers.

A Hugging Face folder holds ``config.json`` and ``model.safetensors`` (or
``pytorch_model.bin``, or a sharded index of either). MERT's folders declare
``model_type: "mert_model"`` (remote code ``MERTModel``, a HubertModel
subclass); their weights use HubertModel's names, which ``hf_state_dict_to_mert``
maps onto ours. ``hf_config_from_args`` goes the other way for the config, so
a ``transformers.HubertConfig`` can be built for any student (tests, benchmarks),
and ``mert_state_dict_to_hf`` for the weights (``mert export --format hf``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from mert_core.errors import HFConversionError  # noqa: F401 - re-exported: raised here, imported from here
from mert_core.model import MertStudent

HUBERT_MODEL_TYPES = ("hubert", "mert_model", "music2vec")
"""``model_type`` values whose weights are HubertModel weights."""

# HubertConfig's defaults, for keys a config.json leaves out.
_HF_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "hidden_act": "gelu", "hidden_dropout": 0.1, "activation_dropout": 0.1, "attention_dropout": 0.1,
    "feat_proj_layer_norm": True, "feat_proj_dropout": 0.0, "layerdrop": 0.1, "layer_norm_eps": 1e-5,
    "feat_extract_norm": "group", "feat_extract_activation": "gelu", "conv_dim": [512] * 7,
    "conv_stride": [5, 2, 2, 2, 2, 2, 2], "conv_kernel": [10, 3, 3, 3, 3, 2, 2], "conv_bias": False,
    "num_conv_pos_embeddings": 128, "num_conv_pos_embedding_groups": 16, "conv_pos_batch_norm": False,
    "do_stable_layer_norm": False, "attention_relax": -1.0, "feature_extractor_cqt": False, "deepnorm": False,
    "sample_rate": 24000, "mask_time_prob": 0.05,
}


def hf_config_to_args(config: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """``MertStudent`` builder arguments for a HubertModel / MERTModel config dict.

    Raises:
        HFConversionError: not a HuBERT config, or a variant this student does
            not implement (MERT's CQT feature input, DeepNorm, batch-norm
            positional conv, non-GELU activations).
    """
    model_type = config.get("model_type")
    if model_type not in HUBERT_MODEL_TYPES:
        raise HFConversionError(f"{where}: model_type {model_type!r} is not a HuBERT model (expected one of {', '.join(HUBERT_MODEL_TYPES)}); "
                                f"pass a HubertModel or MERT folder such as m-a-p/MERT-v1-95M")
    c = {**_HF_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    unsupported = {
        "feature_extractor_cqt": (c["feature_extractor_cqt"], False),
        "deepnorm": (c["deepnorm"], False),
        "conv_pos_batch_norm": (c["conv_pos_batch_norm"], False),
        "hidden_act": (c["hidden_act"], "gelu"),
        "feat_extract_activation": (c["feat_extract_activation"], "gelu"),
    }
    for key, (got, expected) in unsupported.items():
        if got != expected:
            raise HFConversionError(f"{where}: {key}={got!r} is not supported (expected {expected!r}); "
                                    f"the MERT-v1 checkpoints use {key}={expected!r}")
    if c["feat_extract_norm"] not in ("group", "layer"):
        raise HFConversionError(f"{where}: feat_extract_norm={c['feat_extract_norm']!r}, expected 'group' or 'layer'")
    try:
        return _args_from(c)
    except (TypeError, ValueError) as exc:
        raise HFConversionError(f"{where}: a size or rate has the wrong type ({type(exc).__name__}: {exc}); the file is damaged") from None


def _args_from(c: dict[str, Any]) -> dict[str, Any]:
    """``MertStudent`` arguments from a HubertConfig dict with every key filled in."""
    relax = float(c["attention_relax"])
    return dict(
        conv_channels=list(c["conv_dim"]),
        conv_kernels=list(c["conv_kernel"]),
        conv_strides=list(c["conv_stride"]),
        conv_bias=bool(c["conv_bias"]),
        extractor_norm=c["feat_extract_norm"],
        embed_dim=int(c["hidden_size"]),
        num_layers=int(c["num_hidden_layers"]),
        num_heads=int(c["num_attention_heads"]),
        ffn_dim=int(c["intermediate_size"]),
        layer_norm_first=bool(c["do_stable_layer_norm"]),
        pos_conv_kernel=int(c["num_conv_pos_embeddings"]),
        pos_conv_groups=int(c["num_conv_pos_embedding_groups"]),
        projection_layer_norm=bool(c["feat_proj_layer_norm"]),
        dropout=float(c["hidden_dropout"]),
        attention_dropout=float(c["attention_dropout"]),
        activation_dropout=float(c["activation_dropout"]),
        input_dropout=float(c["feat_proj_dropout"]),
        layerdrop=float(c["layerdrop"]),
        attention_relax=relax if relax > 0 else 0.0,
        feature_grad_mult=1.0,
        layer_norm_eps=float(c["layer_norm_eps"]),
        sample_rate=int(c["sample_rate"]),
    )


def hf_config_from_args(args: dict[str, Any]) -> dict[str, Any]:
    """A HubertConfig dict (``transformers.HubertConfig(**d)``) for student ``args``.

    ``attention_relax`` is left out: HubertModel has no such option, and the
    relaxed softmax equals the plain one.
    """
    num_conv = len(args["conv_kernels"])
    channels = args["conv_channels"]
    return dict(
        model_type="hubert",
        conv_dim=[channels] * num_conv if isinstance(channels, int) else list(channels),
        conv_kernel=list(args["conv_kernels"]),
        conv_stride=list(args["conv_strides"]),
        conv_bias=args["conv_bias"],
        feat_extract_norm=args["extractor_norm"],
        feat_extract_activation="gelu",
        hidden_size=args["embed_dim"],
        num_hidden_layers=args["num_layers"],
        num_attention_heads=args["num_heads"],
        intermediate_size=args["ffn_dim"],
        hidden_act="gelu",
        do_stable_layer_norm=args["layer_norm_first"],
        num_conv_pos_embeddings=args["pos_conv_kernel"],
        num_conv_pos_embedding_groups=args["pos_conv_groups"],
        feat_proj_layer_norm=args["projection_layer_norm"],
        hidden_dropout=args["dropout"],
        attention_dropout=args["attention_dropout"],
        activation_dropout=args["activation_dropout"],
        feat_proj_dropout=args["input_dropout"],
        layerdrop=args["layerdrop"],
        layer_norm_eps=args["layer_norm_eps"],
        mask_time_prob=0.05,  # any value > 0 makes HubertModel hold masked_spec_embed
    )


_LAYER_KEYS = {
    "attention.out_proj.weight": "attention.out_proj.weight",
    "attention.out_proj.bias": "attention.out_proj.bias",
    "layer_norm.weight": "attention_norm.weight",
    "layer_norm.bias": "attention_norm.bias",
    "final_layer_norm.weight": "ffn_norm.weight",
    "final_layer_norm.bias": "ffn_norm.bias",
    "feed_forward.intermediate_dense.weight": "feed_forward.intermediate.weight",
    "feed_forward.intermediate_dense.bias": "feed_forward.intermediate.bias",
    "feed_forward.output_dense.weight": "feed_forward.output.weight",
    "feed_forward.output_dense.bias": "feed_forward.output.bias",
}
_POS = "encoder.pos_conv_embed.conv."
_OURS_POS = "transformer.pos_conv.conv."


def _strip_prefix(sd: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix (``hubert.`` in HubertForCTC, ``mert_model.``) and head weights."""
    anchor = "feature_extractor.conv_layers.0.conv.weight"
    hits = [k for k in sd if k.endswith(anchor)]
    if not hits:
        raise HFConversionError(f"{where}: no {anchor!r} tensor; this is not a HubertModel state dict")
    prefix = min(hits, key=len)[: -len(anchor)]
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def hf_state_dict_to_mert(sd: dict[str, torch.Tensor], config: dict[str, Any], where: str = "state dict") -> dict[str, torch.Tensor]:
    """Rename (and fuse) HubertModel weights into a ``MertStudent`` state dict.

    q/k/v projections are concatenated into our fused ``qkv``; the positional
    conv's weight norm is accepted in either layout (``weight_g``/``weight_v``
    of older transformers and MERT's files, or ``parametrizations.weight.original0/1``).
    Keys outside the encoder (CTC or pretraining heads) are ignored.

    Args:
        sd: HubertModel (or a wrapper's) state dict.
        config: its HF config dict (``config.json``).

    Returns:
        a state dict for ``MertStudent.from_args(hf_config_to_args(config))``
        (without ``mask_embedding.weight`` when the file has no ``masked_spec_embed``).
    """
    sd = _strip_prefix(sd, where)
    num_layers = int(config.get("num_hidden_layers", _HF_DEFAULTS["num_hidden_layers"]))
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(src: str, dst: str, required: bool = True) -> None:
        if src in sd:
            out[dst] = sd[src]
            used.add(src)
        elif required:
            raise HFConversionError(f"{where}: missing tensor {src!r}; the file does not match its config.json")

    conv_re = re.compile(r"feature_extractor\.conv_layers\.(\d+)\.(conv|layer_norm)\.(weight|bias)$")
    for key in sd:
        m = conv_re.match(key)
        if m:
            i, part, kind = m.groups()
            take(key, f"feature_extractor.conv_layers.{i}.{'conv' if part == 'conv' else 'norm'}.{kind}")
    for part in ("layer_norm", "projection"):
        for kind in ("weight", "bias"):
            take(f"feature_projection.{part}.{kind}", f"feature_projection.{part}.{kind}", required=part == "projection")
    take("masked_spec_embed", "mask_embedding.weight", required=False)

    # positional conv: weight norm g (dim 2) and v, in whichever layout the file uses
    if _POS + "parametrizations.weight.original0" in sd:
        take(_POS + "parametrizations.weight.original0", _OURS_POS + "parametrizations.weight.original0")
        take(_POS + "parametrizations.weight.original1", _OURS_POS + "parametrizations.weight.original1")
    elif _POS + "weight_g" in sd:
        take(_POS + "weight_g", _OURS_POS + "parametrizations.weight.original0")
        take(_POS + "weight_v", _OURS_POS + "parametrizations.weight.original1")
    elif _POS + "weight" in sd:  # weight norm already folded in: any (g, v) with g * v / |v| = w will do
        w = sd[_POS + "weight"]
        used.add(_POS + "weight")
        out[_OURS_POS + "parametrizations.weight.original0"] = w.norm(dim=(0, 1), keepdim=True)
        out[_OURS_POS + "parametrizations.weight.original1"] = w
    else:
        raise HFConversionError(f"{where}: missing the positional conv weight ({_POS}weight_g / parametrizations.weight.original0)")
    take(_POS + "bias", _OURS_POS + "bias")
    for kind in ("weight", "bias"):
        take(f"encoder.layer_norm.{kind}", f"transformer.layer_norm.{kind}")

    for i in range(num_layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.layers.{i}."
        for kind in ("weight", "bias"):
            parts = [f"{src}attention.{p}_proj.{kind}" for p in ("q", "k", "v")]
            missing = [p for p in parts if p not in sd]
            if missing:
                raise HFConversionError(f"{where}: missing tensor {missing[0]!r}; the file does not match its config.json ({num_layers} layers)")
            out[f"{dst}attention.qkv.{kind}"] = torch.cat([sd[p] for p in parts], dim=0)
            used.update(parts)
        for theirs, ours in _LAYER_KEYS.items():
            take(src + theirs, dst + ours)
    extra_layers = sorted({k.split(".")[2] for k in sd if k.startswith("encoder.layers.") and k not in used}, key=int)
    if extra_layers:
        raise HFConversionError(f"{where}: holds encoder layers {extra_layers} beyond num_hidden_layers={num_layers} in config.json")
    return out


def hf_export_problem(args: dict[str, Any]) -> str | None:
    """Why a student with builder ``args`` cannot be a plain HubertModel, or None if it can.

    HubertModel expresses every other argument: ``attention_relax`` changes
    only the fp16 arithmetic of the same softmax, and ``feature_grad_mult``
    only training.
    """
    if float(args["layer_norm_eps"]) != 1e-5:
        return (f"layer_norm_eps={args['layer_norm_eps']:g}: HubertModel's conv extractor norms always use eps 1e-5, "
                f"so its outputs would differ; only students with layer_norm_eps=1e-5 can be exported")
    return None


def mert_state_dict_to_hf(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """The inverse of ``hf_state_dict_to_mert``: a ``MertStudent`` state dict in HubertModel's names.

    The fused ``qkv`` is split into q/k/v; the positional conv keeps its weight
    norm (``parametrizations.weight.original0/1``, the layout of current
    transformers, which also renames it for older releases).

    Args:
        sd: ``MertStudent.state_dict()``.
        num_layers: the student's transformer layers.

    Returns:
        tensors for ``HubertModel.load_state_dict`` (contiguous, on the CPU).
    """
    out: dict[str, torch.Tensor] = {}
    conv_re = re.compile(r"feature_extractor\.conv_layers\.(\d+)\.(conv|norm)\.(weight|bias)$")
    renames = {"mask_embedding.weight": "masked_spec_embed"}
    for kind in ("weight", "bias"):
        renames[f"transformer.layer_norm.{kind}"] = f"encoder.layer_norm.{kind}"
        renames[_OURS_POS + kind] = _POS + kind
        for part in ("layer_norm", "projection"):
            renames[f"feature_projection.{part}.{kind}"] = f"feature_projection.{part}.{kind}"
    for i in ("0", "1"):
        renames[_OURS_POS + f"parametrizations.weight.original{i}"] = _POS + f"parametrizations.weight.original{i}"
    for i in range(num_layers):
        src, dst = f"transformer.layers.{i}.", f"encoder.layers.{i}."
        renames.update({src + ours: dst + theirs for theirs, ours in _LAYER_KEYS.items()})
        for kind in ("weight", "bias"):
            for p, chunk in zip("qkv", sd[f"{src}attention.qkv.{kind}"].chunk(3, dim=0)):
                out[f"{dst}attention.{p}_proj.{kind}"] = chunk
    for key, tensor in sd.items():
        m = conv_re.match(key)
        if m:
            i, part, kind = m.groups()
            out[f"feature_extractor.conv_layers.{i}.{'conv' if part == 'conv' else 'layer_norm'}.{kind}"] = tensor
        elif key in renames:
            out[renames[key]] = tensor
        elif ".attention.qkv." not in key:
            raise HFConversionError(f"student tensor {key!r} has no HubertModel counterpart")
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def _weight_files(folder: Path) -> tuple[list[Path], str]:
    """The files holding the folder's weights (a sharded index first, then its shards) and their kind
    (``safetensors`` or ``bin``)."""
    for index_name, kind in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [index, *(folder / shard for shard in shards)], kind
    for name, kind in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin")):
        if (folder / name).is_file():
            return [folder / name], kind
    raise HFConversionError(f"{folder}: no model.safetensors or pytorch_model.bin next to config.json; "
                            f"download the whole model folder (e.g. huggingface-cli download m-a-p/MERT-v1-95M)")


def _read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The folder's tensors and the file that identifies them (the weights file, or a sharded index)."""
    from safetensors.torch import load_file

    from mert_core.checkpoint import describe_load_error

    files, kind = _weight_files(folder)
    sd: dict[str, torch.Tensor] = {}
    for path in files[1:] if len(files) > 1 else files:  # an index names the shards
        try:
            sd.update(load_file(str(path)) if kind == "safetensors" else torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:  # noqa: BLE001 - a truncated, foreign or hostile file
            raise HFConversionError(f"{path}: cannot read the weights ({describe_load_error(exc)}); the download may be incomplete") from None
    return sd, files[0]


def hf_fingerprint(folder: str | Path) -> str:
    """``hf-`` and a content hash of everything :func:`load_hf_hubert` reads from ``folder``:
    ``config.json`` and every weights file (each shard of a sharded model). A feature cache
    keyed by it is not reused once any of them changes (an edited ``layer_norm_eps`` too)."""
    import hashlib

    from mert_core.checkpoint import file_digest

    folder = Path(folder)
    files, _ = _weight_files(folder)
    parts = [f"{p.name}:{file_digest(p)}" for p in [folder / "config.json", *files]]
    return "hf-" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def read_hf_hubert(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """A Hugging Face HubertModel folder's builder arguments and weights in our names.

    Returns:
        ``(args, state_dict, weights_file)``: ``mert_student(**args)`` holds
        ``state_dict`` (which lacks ``mask_embedding.weight`` when the file has
        no ``masked_spec_embed``); ``weights_file`` identifies the weights
        (``model.safetensors``, ``pytorch_model.bin`` or a sharded index).

    Raises:
        HFConversionError: not a HuBERT folder, an unsupported variant, or
            weights that do not match the config.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise HFConversionError(f"{folder}: no config.json; pass a Hugging Face HubertModel folder (save_pretrained output or a snapshot)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise HFConversionError(f"{config_path}: cannot read it as JSON ({exc})") from None
    if not isinstance(config, dict):
        raise HFConversionError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    args = hf_config_to_args(config, where=str(config_path))
    try:
        sd, weights_file = _read_weights(folder)
    except HFConversionError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise HFConversionError(f"{folder}: cannot read the weights ({type(exc).__name__}: {exc}); the download may be incomplete") from None
    return args, hf_state_dict_to_mert(sd, config, where=str(folder)), weights_file


def load_hf_hubert(folder: str | Path) -> MertStudent:
    """A ``MertStudent`` (eval mode, fp32, CPU) holding a Hugging Face HubertModel's weights.

    Args:
        folder: a ``save_pretrained`` output or a downloaded snapshot, e.g. of
            m-a-p/MERT-v1-95M: ``config.json`` + ``model.safetensors`` or
            ``pytorch_model.bin``.

    Raises:
        HFConversionError: not a HuBERT folder, an unsupported variant, or
            weights that do not match the config.
    """
    folder = Path(folder)
    args, converted, _ = read_hf_hubert(folder)
    from mert_core.checkpoint import check_finite_weights

    check_finite_weights(folder, converted, HFConversionError)
    try:  # config.json is untrusted: its sizes are checked against the weights before the student is allocated
        student = MertStudent.from_args(args, stored_shapes={k: tuple(v.shape) for k, v in converted.items()}, optional=("mask_embedding.weight",))
    except ValueError as exc:
        raise HFConversionError(f"{folder / 'config.json'}: does not match the weights in {folder}: {exc}") from None
    if "mask_embedding.weight" not in converted:  # HubertModel without masking keeps our random init
        converted["mask_embedding.weight"] = student.mask_embedding.weight.detach()
    student.load_state_dict({k: v.float() for k, v in converted.items()})
    return student.eval()
