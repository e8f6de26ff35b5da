"""The paper's recipes: teachers, augmentations and hyperparameters bundled
by name (MERT, Li et al. 2023, arXiv 2306.00107: optimisation, teachers, in-batch noise mixup).

Every value here can be overridden with ``--set`` or a config file.
"""

from __future__ import annotations

from mert_core.hookspecs import hookimpl
from mert_core.recipes import Recipe


def _optim(preset: str) -> dict:
    """MERT's optimisation: Adam(0.9, 0.98, 1e-6), wd 0.01, 400k updates,
    32k warmup; lr 5e-4 / clip 10 (base), lr 1.5e-3 / clip 1 (large)."""
    large = preset == "330m"
    return {
        "lr": 1.5e-3 if large else 5e-4,
        "grad_clip": 1.0 if large else 10.0,
        "betas": [0.9, 0.98],
        "eps": 1e-6,
        "weight_decay": 0.01,
        "max_steps": 400_000,
        # warmup_steps stays None = 8% of max_steps: MERT's 32k of 400k, and still a
        # sensible warmup when a user shortens the run with --max-steps
    }


def _data(preset: str) -> dict:
    # the large model trains on 5.12 s crops = 384 frames (MERT)
    return {"crop_seconds": 5.12 if preset == "330m" else 5.0, "min_seconds": 3.0, "sample_rate": 24000}


def mert_v1(preset: str) -> dict:
    large = preset == "330m"
    return {
        "model": {"preset": preset},
        "teachers": [{"name": "rvq-vae"}, {"name": "cqt"}],
        "augment": [{"name": "inbatch-mixup", "options": {"prob": 0.5, "max_seconds": 1.5 if large else 1.0}}],
        "optim": _optim(preset),
        "data": _data(preset),
        "mask": {"prob": 0.8, "length": 5},
        "loss": {"final_dim": 128 if large else 64},
        "precision": "auto",
    }


def mert_v0(preset: str) -> dict:
    return {
        "model": {"preset": preset},
        "teachers": [{"name": "kmeans-logmel-chroma"}, {"name": "cqt"}],
        "optim": _optim(preset),
        "data": _data(preset),
        "mask": {"prob": 0.8, "length": 5},
    }


def musichubert(preset: str) -> dict:
    return {
        "model": {"preset": preset},
        "teachers": [{"name": "kmeans-mfcc", "options": {"n_clusters": 2000}}],
        "optim": _optim(preset),
        "data": _data(preset),
        "mask": {"prob": 0.8, "length": 5},
    }


def cqt_only(preset: str) -> dict:
    return {
        "model": {"preset": preset},
        "teachers": [{"name": "cqt"}],
        "optim": _optim(preset),
        "data": _data(preset),
    }


def cpu(preset: str) -> dict:
    """A run that learns in minutes on a laptop CPU (see docs/learning.md for
    each difference from the paper and the measurement behind it)."""
    return {
        "model": {"preset": preset},
        "teachers": [
            # MERT-v0's pitch-aware acoustic teacher, as two codebooks: the 60000-class product
            # trains at a few audio-s/s on a CPU; this pair lifted the key probe from 0.58 to 0.86
            {"name": "kmeans-logmel-chroma", "options": {"combine": "separate"}},
            # log-compressed, per-bin standardised CQT: the raw magnitude's MSE is ~60% one
            # octave of bass, and a target far from 0 costs Adam hundreds of steps just to
            # move the head's bias
            {"name": "cqt", "options": {"compression": "log", "normalize": "per-bin"}},
        ],
        "optim": {**_optim(preset), "max_steps": 2000},
        "data": _data(preset),
        "mask": {"prob": 0.8, "length": 5},
        # the conv-feature penalty shrinks a small conv stack to noise within
        # ~100 Adam steps (the loss cannot resist: the LayerNorm after it
        # hides the scale); HuBERT's value is kept in the paper recipes
        "loss": {"feature_penalty": 0.0},
    }


def musicfm_style(preset: str) -> dict:
    """MusicFM's teacher (Won et al., ICASSP 2024) on MERT's student: BEST-RQ
    labels of normalised stacked log-mel frames; MusicFM itself has no CQT
    target, drop it with ``teachers`` in a config to follow it exactly."""
    return {
        "model": {"preset": preset},
        "teachers": [{"name": "best-rq"}, {"name": "cqt"}],
        "optim": _optim(preset),
        "data": _data(preset),
        "mask": {"prob": 0.8, "length": 5},
    }


def muq_style(preset: str) -> dict:
    """MuQ's teacher (Zhu et al., 2025) on MERT's student: Mel-RVQ codes
    (8 x 1024) + CQT + in-batch mixup, the MERT-v1 recipe without EnCodec's
    non-commercial weights."""
    return {**mert_v1(preset), "teachers": [{"name": "mel-rvq"}, {"name": "cqt"}]}


def music2vec(preset: str) -> dict:
    """Music2Vec (Li et al., 2022) / data2vec on MERT's student: regress the
    averaged top 8 layers of the student's EMA, span masking 10 frames with
    probability 0.65, no conv feature penalty (data2vec has none)."""
    return {
        "model": {"preset": preset},
        "teachers": [{"name": "ema"}],
        "optim": _optim(preset),
        "data": _data(preset),
        "mask": {"prob": 0.65, "length": 10},
        "loss": {"feature_penalty": 0.0},
    }


@hookimpl
def register_recipes(register):
    register(Recipe("mert-v1", "MERT-v1: EnCodec RVQ-VAE (8 codebooks) + CQT teachers, in-batch noise mixup (the paper's final model)", mert_v1))
    register(Recipe("mert-v0", "MERT-v0: log-mel x chroma k-means (60000 classes) + CQT teachers", mert_v0))
    register(Recipe("musichubert", "MusicHuBERT: MFCC k-means (K=2000) teacher only", musichubert))
    register(Recipe("musicfm-style", "MusicFM's teacher: BEST-RQ random-projection labels of log-mel (8192 classes) + CQT", musicfm_style))
    register(Recipe("muq-style", "MuQ's teacher: Mel-RVQ codes (8 x 1024) + CQT, in-batch noise mixup (MERT-v1 without EnCodec)", muq_style))
    register(Recipe("music2vec", "Music2Vec / data2vec: regress the student's own EMA (top 8 layers), span-10 masking", music2vec))
    register(Recipe("cqt-only", "CQT reconstruction only (the musical teacher alone)", cqt_only, default_preset="tiny"))
    register(Recipe("cpu", "A CPU-scale run that learns (not the paper's settings): the cpu student (tiny on a 67 ms front end), log-mel + chroma k-means as two codebooks + log, per-bin standardised CQT, no conv feature penalty, 2000 steps", cpu, default_preset="cpu"))
