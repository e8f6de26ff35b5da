"""Export a student as a Hugging Face folder that plain ``transformers`` loads.

``export_hf(source, out_dir)`` (``mert export SOURCE --format hf --out DIR``)
writes ``config.json`` (a ``HubertConfig``, ``model_type: hubert``),
``model.safetensors`` (HubertModel's tensor names), ``preprocessor_config.json``
(a ``Wav2Vec2FeatureExtractor`` at the student's sample rate) and a
``README.md`` model card. ``transformers.HubertModel.from_pretrained(DIR)`` and
``AutoModel.from_pretrained(DIR)`` load it without remote code; transformers
itself is not needed to write it. See README.md, "Sharing a model".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from mert_core.checkpoint import LAST, STUDENT_FILE, load_student
from mert_core.errors import ExportError  # noqa: F401 - re-exported: raised here, imported from here
from mert_core.fitting import without_teacher_file
from mert_core.files import atomic_write
from mert_core.convert import hf_config_from_args, hf_export_problem, mert_state_dict_to_hf

HF_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "README.md")


def hf_export_config(args: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` for a student with builder ``args``.

    Besides HubertConfig's fields it keeps ``attention_relax`` and
    ``sample_rate`` as MERT's own configs do: transformers ignores them,
    ``mert`` reads them back (``convert.hf_config_to_args``).

    Raises:
        ExportError: the student is not expressible as a HubertModel.
    """
    problem = hf_export_problem(args)
    if problem:
        raise ExportError(f"cannot export as a HubertModel: {problem}")
    config = {"architectures": ["HubertModel"], **hf_config_from_args(args), "sample_rate": int(args["sample_rate"])}
    if args["attention_relax"] > 0:
        config["attention_relax"] = float(args["attention_relax"])
    return config


def preprocessor_config(sample_rate: int) -> dict[str, Any]:
    """A ``Wav2Vec2FeatureExtractor`` config: mono audio at ``sample_rate``, not normalised.

    ``do_normalize`` is False because the student is trained on the raw
    waveform (``mert_core.data`` never standardises a crop), as MERT-v1-95M's
    own preprocessor config says.
    """
    return {
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "sampling_rate": int(sample_rate),
        "padding_side": "right",
        "padding_value": 0.0,
        "do_normalize": False,
        "return_attention_mask": True,
    }


def write_hf_folder(student, out_dir: str | Path, card: str = "") -> list[Path]:
    """Write ``student`` as a Hugging Face HubertModel folder.

    Args:
        student: a ``MertStudent`` built from arguments (a preset or ``mert_student``).
        out_dir: the folder; created if needed, the four files replaced atomically.
        card: the ``README.md`` text; empty: a card from the student alone.

    Returns:
        the paths written, in ``HF_FILES`` order.

    Raises:
        ExportError: the student cannot be a plain HubertModel (one line, why).
    """
    try:
        args = student.args
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    config = hf_export_config(args)
    tensors = mert_state_dict_to_hf(student.state_dict(), args["num_layers"])
    out_dir = Path(out_dir)
    paths = [out_dir / name for name in HF_FILES]
    texts = {
        "config.json": json.dumps(config, indent=2) + "\n",
        "preprocessor_config.json": json.dumps(preprocessor_config(args["sample_rate"]), indent=2) + "\n",
        "README.md": card or model_card(student),
    }
    # transformers refuses a safetensors file without format metadata
    atomic_write(out_dir / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    for name, text in texts.items():
        atomic_write(out_dir / name, lambda tmp, text=text: tmp.write_text(text))
    return paths


# -- the model card -------------------------------------------------------------------------

def model_card(student, run_config: dict[str, Any] | None = None, facts: dict[str, Any] | None = None,
               results: list[dict[str, Any]] | None = None, name: str = "mert-student") -> str:
    """A ``README.md`` for the folder: architecture, parameters, teachers, training facts, evaluation.

    Args:
        student: the exported ``MertStudent``.
        run_config: the run's ``TrainConfig`` as plain data (empty when unknown).
        facts: ``steps`` and ``audio_hours_seen`` where known.
        results: rows of ``mert eval``'s ``results.json`` table for this student.
        name: the model's title.
    """
    args, run_config, facts = student.args, run_config or {}, facts or {}
    params = sum(p.numel() for p in student.parameters())
    preset = run_config.get("model", {}).get("preset")
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: feature-extraction",
        "tags: [audio, music, mert, hubert, self-supervised-learning]",
        "---",
        "",
        f"# {name}",
        "",
        "A MERT-style music audio encoder (a HuBERT architecture) pretrained with "
        "the `mert` toolkit by masked prediction of teacher targets. It is a plain "
        "`transformers.HubertModel`: no remote code is needed.",
        "",
        "## Use",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModel, Wav2Vec2FeatureExtractor",
        "",
        'model = AutoModel.from_pretrained("PATH_OR_REPO")',
        'processor = Wav2Vec2FeatureExtractor.from_pretrained("PATH_OR_REPO")',
        f"wave = torch.zeros({args['sample_rate']})  # one second of mono audio at {args['sample_rate']} Hz",
        f'inputs = processor(wave.numpy(), sampling_rate={args["sample_rate"]}, return_tensors="pt")',
        "with torch.no_grad():",
        "    hidden_states = model(**inputs, output_hidden_states=True).hidden_states  # layers + 1 tensors (B, T, D)",
        "```",
        "",
        f"The model reads mono audio at {args['sample_rate']} Hz, not normalised, and gives "
        f"{args['sample_rate'] / _hop(args):g} frames per second.",
        "",
        *_alignment_note(student),
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| preset | {preset or 'unknown'} |",
        f"| parameters | {params / 1e6:.2f} M |",
        f"| transformer | {args['num_layers']} layers x {args['embed_dim']}, {args['num_heads']} heads, FFN {args['ffn_dim']} |",
        f"| layer norm | {'pre-LN with a final LayerNorm' if args['layer_norm_first'] else 'post-LN'} |",
        f"| conv extractor | {len(args['conv_kernels'])} layers, kernels {args['conv_kernels']}, strides {args['conv_strides']} (hop {_hop(args)} samples), {args['extractor_norm']} norm |",
        f"| attention relaxation | {args['attention_relax']:g} (the same softmax; only fp16 arithmetic differs) |"
        if args["attention_relax"] > 0 else "| attention relaxation | off |",
        "",
        "## Training",
        "",
    ]
    teachers = run_config.get("teachers") or []
    if teachers:
        lines += ["| teacher | loss weight | options |", "|---|---|---|"]
        for t in teachers:
            options = without_teacher_file(t.get("options", {}))
            weight = "default" if t.get("weight") is None else f"{t['weight']:g}"
            lines.append(f"| {t['name']} | {weight} | `{json.dumps(options, sort_keys=True)}` |")
        lines.append("")
    augment = [a["name"] for a in run_config.get("augment") or []]
    steps, hours = facts.get("steps"), facts.get("audio_hours_seen")
    lines += [
        f"- augmentations: {', '.join(augment) if augment else 'none'}" if run_config else "- run config: unknown",
        f"- optimizer updates: {steps if steps is not None else 'unknown'}",
        f"- audio seen: {hours:.3f} hours" if hours is not None else "- audio seen: unknown",
    ]
    if run_config.get("data"):
        data = run_config["data"]
        lines.append(f"- crops of {data['crop_seconds']:g} s, {data['batch_size']} per micro-batch per process")
    init_from = run_config.get("model", {}).get("init_from")
    if init_from:
        lines.append(f"- continued from {init_from} (sha256 {run_config['model'].get('init_from_hash')})")
    lines.append("")
    if results:
        lines += ["## Evaluation", "", "MARBLE-style probes (`mert eval`): frozen features, selected on validation.", "",
                  "| task | metric | test | valid | layer |", "|---|---|---|---|---|"]
        for r in results:
            lines.append(f"| {r['task']} | {r['metric']} | {r['test']:.4f} | {r['valid']:.4f} | {r['layer']} |")
        lines.append("")
    return "\n".join(lines)


def _alignment_note(student) -> list[str]:
    """Model-card lines for a student whose frames start later than the paper's grid (the ``cpu`` preset)."""
    geometry = student.geometry
    lead = geometry.lead_samples
    if not lead:
        return []
    return [
        f"Each frame sees {geometry.receptive_field} samples, so frame `t` is centred "
        f"{lead} samples ({geometry.lead_frames} frames) later than frame `t` of a standard HuBERT/MERT "
        f"model (400 samples). `mert extract` puts frame `t` at time `t x {geometry.hop_samples}` samples "
        f"by leading the audio with {lead} samples of silence; do the same for the same features:",
        "",
        "```python",
        f"wave = torch.nn.functional.pad(wave, ({lead}, 0))",
        "```",
        "",
    ]


def _hop(args: dict[str, Any]) -> int:
    hop = 1
    for stride in args["conv_strides"]:
        hop *= stride
    return hop


# -- the whole export -----------------------------------------------------------------------

def _training_facts(source: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Steps and audio hours: from the checkpoint itself, else the run folder's ``summary.json``."""
    counters = info.get("counters") or {}
    if info.get("step") is not None:
        return {"steps": info["step"], "audio_hours_seen": counters.get("audio_seconds", 0.0) / 3600 if counters else None}
    run_dir = source if source.is_dir() else source.parent
    summary = run_dir / "summary.json"
    if (run_dir / STUDENT_FILE).exists() or (run_dir / LAST).exists():
        if summary.is_file():
            data = json.loads(summary.read_text())
            return {"steps": data.get("steps"), "audio_hours_seen": data.get("audio_hours_seen")}
    return {}


def _result_rows(results_file: Path, checkpoint_id: str) -> list[dict[str, Any]]:
    """The rows of a ``results.json`` (``mert eval --out``) that belong to ``checkpoint_id``."""
    try:
        table = json.loads(Path(results_file).read_text())["table"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ExportError(f"--results {results_file}: not a results.json written by mert eval ({type(exc).__name__}: {exc})") from None
    rows = [r for r in table if r.get("upstream_id") == checkpoint_id]
    if not rows:
        ids = sorted({str(r.get("upstream_id")) for r in table})
        raise ExportError(f"--results {results_file}: no rows for this checkpoint (id {checkpoint_id}; the file has {', '.join(ids) or 'none'}); "
                          f"evaluate this checkpoint with `mert eval --checkpoint ...` first")
    return rows


def export_hf(source: str | Path, out_dir: str | Path, results: str | Path | None = None, name: str | None = None) -> list[Path]:
    """Export a run folder, ``.pt`` checkpoint, ``student.safetensors`` or HF folder as a HubertModel folder.

    Args:
        source: anything ``checkpoint.load_student`` reads.
        out_dir: the folder to write (see ``write_hf_folder``).
        results: a ``results.json`` from ``mert eval`` whose rows for this
            checkpoint go into the model card.
        name: the model card's title; default: the source's name.

    Returns:
        the paths written.

    Raises:
        ExportError: the student cannot be a plain HubertModel, or bad ``results``.
        CheckpointError, HFConversionError: the source cannot be read.
    """
    source, out_dir = Path(source), Path(out_dir)
    if out_dir.resolve() == source.resolve():
        raise ExportError(f"--out {out_dir}: is the source itself; write the export to a new folder")
    student, info = load_student(source)
    hf_export_config(student.args)  # refuse before anything is written
    rows = _result_rows(Path(results), info["checkpoint_id"]) if results is not None else None
    title = name or (source.name if source.is_dir() else source.parent.name if source.name in (STUDENT_FILE, LAST) else source.stem)
    card = model_card(student, info.get("config") or {}, _training_facts(source, info), rows, name=title)
    return write_hf_folder(student, out_dir, card)
