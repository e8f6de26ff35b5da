"""Memory and speed options: activation checkpointing (same gradients, fewer
saved activations) and torch.compile (same loss as eager)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from mert_core import api
from mert_core.checkpoint import load_checkpoint
from mert_core.config import ModelConfig
from mert_core.masking import compute_span_mask
from mert_core.model import build_student

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_throughput import saved_activation_bytes  # noqa: E402

TINY = ["data.batch_size=2", "data.num_workers=0", "data.crop_seconds=2.0", "data.min_seconds=1.0", "log_every=1"]


def masked_loss(student, wave, seed: int = 0):
    """A scalar that depends on every layer: the masked frames' squared features plus the feature penalty."""
    frames = student.num_frames(wave.shape[1])
    mask = compute_span_mask((wave.shape[0], frames), torch.full((wave.shape[0],), frames), 0.8, 5, torch.Generator().manual_seed(seed))
    out = student(wave, mask=mask)
    return out.last_hidden[mask].square().mean() + out.features_penalty


def gradients(activation_checkpointing: bool, wave):
    torch.manual_seed(0)
    student = build_student(ModelConfig(preset="tiny", activation_checkpointing=activation_checkpointing)).train()
    torch.manual_seed(1)  # the same dropout masks in both runs
    masked_loss(student, wave).backward()
    return {name: p.grad for name, p in student.named_parameters()}


def test_activation_checkpointing_gives_the_same_gradients_with_dropout_on():
    wave = torch.randn(2, 16000, generator=torch.Generator().manual_seed(2))
    plain, checkpointed = gradients(False, wave), gradients(True, wave)
    assert set(plain) == set(checkpointed)
    for name, grad in plain.items():
        # the recomputation replays the same arithmetic and dropout masks
        assert torch.equal(checkpointed[name], grad), name


def test_activation_checkpointing_saves_activation_memory():
    wave = torch.randn(2, 24000)
    saved = {}
    for flag in (False, True):
        torch.manual_seed(0)
        student = build_student(ModelConfig(preset="tiny", activation_checkpointing=flag)).train()
        saved[flag] = saved_activation_bytes(lambda: masked_loss(student, wave))
    # tiny has 2 layers over a 64-channel conv stack that is not checkpointed; the layers' share goes
    assert saved[True] < 0.8 * saved[False], saved
    # and it is only a training option: evaluation and checkpoints do not see it
    student = build_student(ModelConfig(preset="tiny", activation_checkpointing=True))
    assert "activation_checkpointing" not in student.args


def test_training_option_is_recorded_and_may_change_on_resume(tmp_path, music_dir):
    out = tmp_path / "run"
    config = api.make_train_config(teachers=["cqt"], preset="tiny", data=[music_dir], out_dir=out, max_steps=1,
                                   overrides=[*TINY, "model.activation_checkpointing=true"])
    api.train(config, progress=False)
    assert load_checkpoint(out / "last.pt")["config"]["model"]["activation_checkpointing"] is True
    resumed = config.model_copy(update={"model": config.model.model_copy(update={"activation_checkpointing": False}),
                                        "optim": config.optim.model_copy(update={"max_steps": 2})})
    api.train(resumed, resume=True, progress=False)
    state = load_checkpoint(out / "last.pt")
    assert state["step"] == 2 and state["config"]["model"]["activation_checkpointing"] is False


@pytest.mark.slow  # inductor compiles C++ kernels: minutes on 2 busy CPU cores
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="torch.compile (inductor) needs a C++ compiler on CPU")
def test_compiled_tiny_student_gives_the_eager_loss():
    torch.manual_seed(0)
    student = build_student(ModelConfig(preset="tiny", overrides={"dropout": 0.0, "attention_dropout": 0.0, "input_dropout": 0.0})).train()
    wave = torch.randn(2, 16000, generator=torch.Generator().manual_seed(3))
    eager = masked_loss(student, wave)
    compiled = masked_loss(torch.compile(student), wave)
    # inductor fuses and reorders float operations: equal to rounding
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_the_throughput_benchmark_runs_a_training_step_on_cpu():
    """The benchmark is meant for the day a GPU is at hand: it must keep working on a CPU with tiny
    (it broke unseen once, when the pretrainer's outputs changed)."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_throughput.py"
    proc = subprocess.run([sys.executable, str(script), "--preset", "tiny", "--batch", "1", "--seconds", "1",
                           "--steps", "1", "--warmup", "0", "--variants", "eager", "--device", "cpu", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| eager |" in proc.stdout and "model FLOPs per step" in proc.stdout
