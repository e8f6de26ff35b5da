"""The run configuration: one pydantic object, the single source of truth.

Only builders read it; components take explicit arguments. It is saved, whole,
in every checkpoint. Every model forbids unknown fields, so a typo in a YAML
file or a ``--set`` is an error naming the field.

Defaults follow the MERT paper (Li et al. 2023, arXiv 2306.00107), cited as
"MERT" in the field descriptions, and HuBERT (Hsu et al. 2021) where MERT
keeps its settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

PresetName = Literal["tiny", "cpu", "small", "cpu-small", "95m", "330m"]
"""The student presets (``mert_core.model.PRESETS`` has one builder per name)."""
PRESET_NAMES: tuple[str, ...] = get_args(PresetName)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    preset: PresetName = Field("tiny", description="Student size preset (MERT: 95m base, 330m large).")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword overrides of the preset's builder arguments, e.g. {'num_layers': 4}.",
    )
    init_from: Path | None = Field(
        None,
        description="Continued pretraining: start the student from a Hugging Face HuBERT/MERT folder, a mert run folder, "
                    "a .pt checkpoint or a student.safetensors (shapes must fit the preset); None = random init.",
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each transformer layer in the backward pass instead of keeping its activations: "
                           "less memory for about one more forward of compute; same gradients.",
    )
    init_from_hash: str | None = Field(
        None, description="Content hash of init_from's weights, recorded when the run starts; a source that changed since is refused.",
    )


class TeacherConfig(_Strict):
    name: str = Field(description="Registered teacher name, e.g. 'cqt', 'rvq-vae', 'kmeans-mfcc'.")
    options: dict[str, Any] = Field(default_factory=dict, description="Teacher options, validated by the teacher's Options model.")
    weight: float | None = Field(None, ge=0, description="Loss weight; None uses the teacher's default (MERT alpha=1).")
    label_store: Path | None = Field(None, description="Offline label store made by `mert teacher label`; None computes labels online.")


class AugmentConfig(_Strict):
    name: str = Field(description="Registered augmentation name, e.g. 'inbatch-mixup'.")
    options: dict[str, Any] = Field(default_factory=dict, description="Augmentation options, validated by its Options model.")


def _data_source(value: Any) -> Any:
    """A local path as pathlib writes it (``music/`` -> ``music``); a URL or brace pattern as given."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str) and "://" not in value:
        return str(Path(value))
    return value


DataSource = Annotated[str, BeforeValidator(_data_source)]
"""One ``--data`` entry: a local path, or a URL (``https://``, ``s3://``, ...) kept as written."""


class StreamConfig(_Strict):
    lanes: int = Field(4, ge=1, description="Shards only: independent shard streams per rank, read in turn; batch i comes from lane "
                                            "i % lanes. The crops do not depend on data.num_workers, which must divide it.")
    buffer_crops: int = Field(128, ge=1, description="Shards only: crops per lane shuffled together (a block; the reader holds up to "
                                                     "two per lane: 2 x lanes x buffer_crops x crop_seconds of float32 audio per rank).")
    retries: int = Field(3, ge=0, description="Shards only: new attempts at a shard after a failed request or a broken tar stream.")
    retry_seconds: float = Field(1.0, ge=0, description="Shards only: wait before the first retry; doubles with each retry.")
    timeout_seconds: float = Field(60.0, gt=0, description="Shards only: connect and read timeout of a shard request (HTTP, S3).")


class DataConfig(_Strict):
    paths: list[DataSource] = Field(
        default_factory=list,
        description="Audio folders (recursive), manifest files (.tsv/.csv) or audio files; or shards: an index.json (path or "
                    "URL), a folder holding one, a brace pattern such as https://host/c/shard-{000000..000099}.tar, .tar "
                    "files. Empty = built-in demo data.",
    )
    sample_rate: int = Field(24000, ge=1000, le=1_000_000, description="Student sample rate (MERT: 24 kHz; 1 kHz to 1 MHz, like audio headers).")
    crop_seconds: float = Field(5.0, gt=0, description="Training crop length (MERT: 5 s; large 5.12 s).")
    min_seconds: float = Field(3.0, ge=0, description="Files shorter than this are not used (MERT: 3 s).")
    batch_size: int = Field(4, ge=1, description="Clips per micro-batch per process.")
    num_workers: int = Field(1, ge=0, description="DataLoader worker processes.")
    stream: StreamConfig = Field(default_factory=StreamConfig, description="How shards are streamed (ignored for folders and manifests).")


class MaskConfig(_Strict):
    prob: float = Field(0.8, ge=0, le=1, description="HuBERT mask_prob: fraction of frames that start a span, times span length (MERT 0.8).")
    length: int = Field(5, ge=1, description="Span length in frames (MERT 5).")


class OptimConfig(_Strict):
    lr: float = Field(5e-4, gt=0, description="Peak learning rate (MERT: 5e-4 base, 1.5e-3 large).")
    betas: tuple[float, float] = Field((0.9, 0.98), description="Adam betas (MERT).")
    eps: float = Field(1e-6, gt=0, description="Adam eps (MERT).")
    weight_decay: float = Field(0.01, ge=0, description="Weight decay (MERT).")
    warmup_steps: int | None = Field(None, ge=0, description="Linear warmup updates; None = 8% of decay_steps or max_steps (MERT: 32k of 400k).")
    max_steps: int = Field(400000, ge=1, description="Total optimizer updates (MERT 400k).")
    decay_steps: int | None = Field(
        None, ge=1, description="Step at which the linear decay reaches lr 0; None = max_steps (MERT). Larger than max_steps "
                                "trains the first max_steps of a longer schedule (checkpoints along a scaling curve).")
    grad_clip: float = Field(10.0, gt=0, description="Gradient norm clip (MERT: 10 base, 1 large).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer update.")


class LossConfig(_Strict):
    feature_penalty: float = Field(10.0, ge=0, description="Weight of the conv-feature L2 penalty (HuBERT, Hsu et al. 2021, and MERT: 10).")
    unmasked_weight: float = Field(
        0.0, ge=0, description="Weight of the same losses at the unmasked frames (HuBERT's pred_nomask_weight; MERT: 0, masked frames only).")
    logit_temperature: float = Field(0.1, gt=0, description="Cosine-logit temperature of discrete heads (MERT 0.1).")
    final_dim: int | None = Field(None, ge=1, description="Discrete head projection size; None: the preset's (model.PRESET_FINAL_DIMS: 64, 128 for 330m).")


class TrainConfig(_Strict):
    """Everything one training run needs."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    teachers: list[TeacherConfig] = Field(default_factory=lambda: [TeacherConfig(name="cqt")], min_length=1)
    augment: list[AugmentConfig] = Field(default_factory=list)
    data: DataConfig = Field(default_factory=DataConfig)
    mask: MaskConfig = Field(default_factory=MaskConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    out_dir: Path = Field(Path("runs/mert"), description="Run folder: checkpoints, metrics.jsonl, plots, TensorBoard logs.")
    seed: int = Field(0, description="Seed of data order, masks, augmentation and init.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU.")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N.")
    log_every: int = Field(10, ge=1, description="Steps between metric lines.")
    checkpoint_every: int = Field(100, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Numbered checkpoints kept besides last.pt.")
    max_bad_steps: int = Field(5, ge=1, description="Consecutive bad steps (non-finite, or beyond max_scale_growth) before the run stops.")
    max_scale_growth: float = Field(
        1000.0, gt=1, description="A step whose loss or conv-feature std exceeds this multiple of the largest in the run's "
                                  "first 10 good steps is bad (exploding weights): its update is skipped.")
    compile: bool = Field(False, description="Run the student and heads through torch.compile (faster steps after a "
                                             "compilation of a minute or more; needs a C++ compiler on CPU).")
    recipe: str | None = Field(None, description="Recipe the run was built from (informational).")

    @field_validator("teachers")
    @classmethod
    def _each_teacher_once(cls, teachers: list[TeacherConfig]) -> list[TeacherConfig]:
        names = [t.name for t in teachers]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"teacher {twice[0]!r} is listed twice; list each teacher once")
        return teachers


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line naming the first bad field and what is wrong with it."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    where = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
    got = err.get("input")
    got_txt = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    return f"config field {where!r}: {err['msg'].removeprefix('Value error, ')}{got_txt}"
