"""The RVQ-VAE teacher ``rvq-vae`` (MERT-v1's acoustic teacher): EnCodec's residual-VQ codes.

EnCodec's 24 kHz model at 6 kbps gives 8 codebooks x 1024 codes at 75 Hz, the
student's frame rate; each codebook is one discrete target. Where the weights
come from (never downloaded: CC-BY-NC 4.0), how frames line up with the
student's, why one training window is encoded at a time (online and offline
codes agree) and why CPU batches go clip by clip: ``docs/rvq_vae_mixup.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator

from mert_core.errors import ConfigError, MertError
from mert_core.geometry import STUDENT_GEOMETRY, FrameGeometry
from mert_core.hookspecs import hookimpl
from mert_core.teacher import IGNORE_LABEL, TargetSpec, Teacher, TeacherOptions

CHECKPOINT_NAME = "encodec_24khz-d7cc33bc.th"  # the name encodec.EncodecModel.encodec_model_24khz uses
CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/encodec/v0/" + CHECKPOINT_NAME
BANDWIDTH_KBPS = 6.0  # 6 kbps = 8 codebooks x 10 bits x 75 Hz
NUM_CODEBOOKS = 8
CODEBOOK_SIZE = 1024
SAMPLE_RATE = 24000
HOP_SAMPLES = 320  # EnCodec's own hop, which happens to equal the student's (checked against its geometry)


class EncodecWeightsError(MertError, ValueError):
    """The EnCodec checkpoint is missing, unreadable or not the 24 kHz model."""


def default_weights_path() -> Path:
    """Where ``encodec`` caches its 24 kHz checkpoint: ``torch.hub.get_dir()/checkpoints/``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / CHECKPOINT_NAME


def resolve_weights_path(weights_path: Path | None) -> Path:
    """The checkpoint file to load: ``weights_path`` (a file, or a folder holding
    the official file name) if given, else the torch hub cache.

    Raises:
        EncodecWeightsError: the file does not exist; the message names the
            paths checked, where to get the file and its licence.
    """
    hub = default_weights_path()
    if weights_path is not None:
        given = Path(weights_path).expanduser()
        candidate = given / CHECKPOINT_NAME if given.is_dir() else given
        checked = f"option weights_path={candidate}"
    else:
        candidate = hub
        checked = "option weights_path (not set)"
    if candidate.is_file():
        return candidate
    raise EncodecWeightsError(
        f"rvq-vae: EnCodec weights not found; checked {checked} and the torch hub cache {hub}"
        f"{' (not used when weights_path is set)' if weights_path is not None else ''}. "
        f"Download {CHECKPOINT_NAME} from {CHECKPOINT_URL} on a machine with internet access "
        f"(licence: CC-BY-NC 4.0, non-commercial use only), then put it at {hub} "
        f"or set the teacher option weights_path to it; mert never downloads it."
    )


def build_encodec(state_dict: dict | None = None, source: str = "state dict"):
    """EnCodec's 24 kHz model at 6 kbps in eval mode, built without any download.

    Args:
        state_dict: weights in the official checkpoint's format (what
            ``torch.save(model.state_dict())`` writes); None keeps the random init.
        source: where ``state_dict`` came from, for error messages.

    Raises:
        EncodecWeightsError: the keys or shapes do not match the 24 kHz model.
    """
    from encodec import EncodecModel

    with warnings.catch_warnings():  # encodec uses the deprecated torch.nn.utils.weight_norm
        warnings.simplefilter("ignore", FutureWarning)
        model = EncodecModel.encodec_model_24khz(pretrained=False)  # pretrained=True would download
    model.set_target_bandwidth(BANDWIDTH_KBPS)
    if state_dict is not None:
        expected = model.state_dict()
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        wrong = [
            f"{k} {tuple(state_dict[k].shape)} (expected {tuple(v.shape)})"
            for k, v in expected.items()
            if k in state_dict and tuple(getattr(state_dict[k], "shape", ())) != tuple(v.shape)
        ]
        if missing or unexpected or wrong:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
            if wrong:
                parts.append(f"{len(wrong)} tensors of the wrong shape (e.g. {wrong[0]})")
            raise EncodecWeightsError(
                f"rvq-vae: {source} is not an EnCodec 24 kHz checkpoint: {'; '.join(parts)}; "
                f"use the official {CHECKPOINT_NAME} ({CHECKPOINT_URL}), not the 48 kHz model or an LM checkpoint"
            )
        model.load_state_dict(state_dict)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint saved like the official one (``torch.save`` of a state dict)."""
    from mert_core.checkpoint import describe_load_error

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for a bad file
        raise EncodecWeightsError(
            f"rvq-vae: cannot read EnCodec weights {path} ({describe_load_error(exc)}); "
            f"the file is corrupt or truncated: download {CHECKPOINT_NAME} again from {CHECKPOINT_URL}"
        ) from None
    if not isinstance(state, dict):
        raise EncodecWeightsError(
            f"rvq-vae: {path} holds a {type(state).__name__}, expected a state dict (the format of {CHECKPOINT_NAME})"
        )
    return state


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


@contextlib.contextmanager
def _strict_float32(device: torch.device):
    """Plain float32 math: no autocast, and no TF32 on CUDA.

    Codes are argmins over distances; reduced precision flips near-ties and
    would make online codes differ from stored ones.
    """
    if device.type != "cuda":
        with torch.autocast(device.type, enabled=False):
            yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast("cuda", enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class RVQVAEOptions(TeacherOptions):
    codebooks: Literal["all", "random"] | list[int] = Field(
        "all",
        description=(
            "Which codebooks are targets: 'all' 8 (the final MERT-v1), a list of indices 0-7 "
            "(e.g. [0] or [7], the paper's ablations), or 'random': one codebook per batch, drawn "
            "from the trainer's per-step generator. Codebooks not chosen get IGNORE_LABEL."
        ),
    )
    weights_path: Path | None = Field(
        None,
        description=(
            f"EnCodec 24 kHz checkpoint ({CHECKPOINT_NAME}, CC-BY-NC 4.0), or a folder holding it; "
            "None reads it from the torch hub cache (torch.hub.get_dir()/checkpoints/). Never downloaded."
        ),
    )
    seed: int = Field(
        0, description="Seed of the 'random' codebook draw when no generator is set on the teacher (the trainer sets one per step)."
    )
    clips_per_call: int | None = Field(
        None,
        ge=1,
        description=(
            "Clips EnCodec encodes per call. None: 1 on CPU (the codes then never depend on the batch; batching "
            "gained 0.9-1.5x there), the whole batch on other devices."
        ),
    )

    @field_validator("codebooks")
    @classmethod
    def _check_codebooks(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("give at least one codebook index, or 'all' / 'random'")
            bad = [i for i in value if not 0 <= i < NUM_CODEBOOKS]
            if bad:
                raise ValueError(f"codebook indices must be in 0..{NUM_CODEBOOKS - 1}, got {bad}")
            if len(set(value)) != len(value):
                raise ValueError(f"codebook indices must be unique, got {value}")
        return value


class RVQVAETeacher(Teacher):
    """EnCodec 24 kHz RVQ codes at 6 kbps: 8 codebooks x 1024 classes at 75 Hz (MERT-v1).

    The ``'random'`` codebook draw comes from the ``generator`` handed to
    :meth:`targets` / :meth:`targets_from_store` (the trainer's per-step one);
    without one, from a CPU generator seeded with ``options.seed``.

    Attributes:
        weights_file: the checkpoint that was loaded.
    """

    name = "rvq-vae"
    description = "EnCodec 24 kHz RVQ codes at 6 kbps: 8 codebooks x 1024 classes at 75 Hz (MERT-v1 acoustic teacher)"
    Options = RVQVAEOptions

    def __init__(self, options: RVQVAEOptions, geometry: FrameGeometry = STUDENT_GEOMETRY):
        super().__init__(options, geometry)
        if (geometry.sample_rate, geometry.hop_samples) != (SAMPLE_RATE, HOP_SAMPLES):
            raise ConfigError(
                f"rvq-vae: EnCodec runs on {SAMPLE_RATE} Hz audio with a {HOP_SAMPLES}-sample hop (75 Hz); "
                f"got sample_rate={geometry.sample_rate}, hop_samples={geometry.hop_samples}; set data.sample_rate to {SAMPLE_RATE}"
            )
        # Resolve and check the weights here, so `mert train` stops before training starts.
        self.weights_file = resolve_weights_path(options.weights_path)
        self.codec = build_encodec(load_checkpoint(self.weights_file), source=str(self.weights_file))
        self.codec.decoder = None  # only the encoder and quantizer make codes; saves half the memory
        self._weights_sha256 = file_sha256(self.weights_file)
        self._fallback_generator = torch.Generator().manual_seed(options.seed)

    def train(self, mode: bool = True):
        # The codec is frozen: keep it in eval mode whatever the trainer asks.
        super().train(mode)
        self.codec.eval()
        return self

    def target_spec(self) -> TargetSpec:
        return TargetSpec(
            kind="discrete",
            frame_rate_hz=SAMPLE_RATE / HOP_SAMPLES,
            num_codebooks=NUM_CODEBOOKS,
            num_classes=CODEBOOK_SIZE,
            default_weight=1.0,  # the MERT paper: alpha = 1
        )

    @torch.no_grad()
    def codes(self, wave: torch.Tensor) -> torch.Tensor:
        """All 8 codebooks of every full 320-sample frame.

        Args:
            wave: ``(B, S)`` float waveforms at 24 kHz, on the teacher's device.

        Returns:
            ``(B, S // 320, 8)`` int64 codes in ``[0, 1024)``.
        """
        if wave.dim() != 2:
            raise ValueError(f"rvq-vae: expected a (batch, samples) waveform, got shape {tuple(wave.shape)}")
        num_frames = wave.shape[1] // HOP_SAMPLES
        if num_frames == 0 or wave.shape[0] == 0:
            return torch.zeros(wave.shape[0], num_frames, NUM_CODEBOOKS, dtype=torch.long, device=wave.device)
        x = wave.float().unsqueeze(1)  # B, 1, S
        step = self.options.clips_per_call or (1 if wave.device.type == "cpu" else x.shape[0])
        codes = []
        with _strict_float32(wave.device):
            for chunk in x.split(step):
                # model.encode with segment=None and normalize=False (the 24 kHz model) gives one
                # frame holding the codes of the whole input and no scale: exactly encoder + RVQ.
                frames = self.codec.encode(chunk)
                codes.append(frames[0][0][:, :, :num_frames])  # b, 8, T: the partial last frame dropped
        return torch.cat(codes).transpose(1, 2).long()  # B, T, 8

    def select_codebooks(self, codes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Apply the ``codebooks`` option: keep the chosen codebooks, ``IGNORE_LABEL`` the rest.

        Args:
            codes: ``(B, T, 8)`` int64 codes (from :meth:`codes` or a label store).
            generator: source of the ``'random'`` draw; None: the teacher's own,
                seeded with ``options.seed``.

        Returns:
            ``(B, T, 8)`` int64 targets.
        """
        choice = self.options.codebooks
        if choice == "all":
            return codes
        if choice == "random":
            g = generator if generator is not None else self._fallback_generator
            keep = [int(torch.randint(NUM_CODEBOOKS, (1,), generator=g, device=g.device).item())]
        else:
            keep = list(choice)
        out = torch.full_like(codes, IGNORE_LABEL)
        out[..., keep] = codes[..., keep]
        return out

    @torch.no_grad()
    def targets(self, wave: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Codes of the clean audio, with the ``codebooks`` option applied.

        Args:
            wave: ``(B, S)`` float waveforms at 24 kHz.

        Returns:
            ``(B, S // 320, 8)`` int64 labels, ``IGNORE_LABEL`` in codebooks not chosen.
        """
        return self.select_codebooks(self.codes(wave), generator)

    @torch.no_grad()
    def store_targets(self, wave: torch.Tensor) -> torch.Tensor:
        """A label store keeps all 8 codebooks; :meth:`targets_from_store` applies
        the ``codebooks`` option per batch, so one store serves every ablation."""
        return self.codes(wave)

    def targets_from_store(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.select_codebooks(labels, generator)

    def config_hash(self) -> str:
        """Framing, encodec version and the weights file's content: what decides the codes."""
        import encodec

        # where the weights lie does not change the codes, nor (beyond rare float near-ties) how many clips
        # go per call; the codebook choice is applied after the codes (store_targets / targets_from_store)
        options = self.options.model_dump_json(exclude={"weights_path", "clips_per_call", "codebooks", "seed"})
        payload = (
            f"{self.name}|{self.sample_rate}|{self.hop_samples}|{options}"
            f"|bw={BANDWIDTH_KBPS}|encodec={getattr(encodec, '__version__', '?')}|weights={self._weights_sha256}"
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def save_random_weights(path: Path, seed: int = 0) -> Path:
    """Save a randomly initialised EnCodec 24 kHz model in the official checkpoint format.

    For tests and benchmarks, where the CC-BY-NC weights are not available: same
    architecture, same file format, loaded through the same code path. EnCodec
    initialises its codebooks to zeros (it fits them by k-means on the first
    batch), which would give one code everywhere; here each codebook is instead
    set to residual vectors of a synthetic signal (k-means with zero iterations),
    so that the codes vary like real ones.

    Args:
        path: file to write (``torch.save`` of the state dict).
        seed: seed of the weights and of the codebooks.
    """
    torch.manual_seed(seed)
    model = build_encodec()
    g = torch.Generator().manual_seed(seed)
    clips, samples = 8, SAMPLE_RATE // 2  # 8 chirps of 0.5 s = 300 frames
    t = torch.arange(samples) / SAMPLE_RATE
    sweep_rate = 1 + 16 * torch.rand(clips, 1, generator=g)
    noise = 0.1 * torch.rand(clips, 1, generator=g) * torch.randn(clips, samples, generator=g)
    calibration = 0.3 * torch.sin(2 * torch.pi * 110 * t * (1 + sweep_rate * t)) + noise
    with torch.no_grad():
        residual = model.encoder(calibration.unsqueeze(1)).transpose(1, 2).reshape(-1, model.encoder.dimension)  # N, D
        for layer in model.quantizer.vq.layers:
            book = layer._codebook
            picked = residual[torch.randint(residual.shape[0], (CODEBOOK_SIZE,), generator=g)]
            picked = picked + 0.2 * picked.std() * torch.randn(picked.shape, generator=g)
            book.embed.copy_(picked)
            book.embed_avg.copy_(picked)
            residual = residual - picked[book.quantize(residual)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


@hookimpl
def register_teachers(register):
    register(RVQVAETeacher)
