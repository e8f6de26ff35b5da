"""The ``ema`` teacher (data2vec / Music2Vec): the EMA formula, the targets'
definition, the contract checks, training, and an exact resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from mert_core import api
from mert_core.checkpoint import load_checkpoint
from mert_core.model import tiny
from mert_core.registry import load_registry
from mert_core.testing import check_teacher

TINY = ["data.batch_size=2", "data.num_workers=0", "data.crop_seconds=2.0", "data.min_seconds=1.0", "log_every=1"]


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def _teacher(registry, student, **options):
    teacher = registry.build("teacher", "ema", options, geometry=student.geometry)
    teacher.attach(student)
    return teacher


def test_the_copy_follows_the_ema_formula_over_real_optimizer_steps(registry):
    torch.manual_seed(0)
    student = tiny()
    teacher = _teacher(registry, student, decay=0.9, decay_end=0.99, anneal_steps=2)
    teacher.on_step(student, 0)
    expected = {k: v.clone() for k, v in student.transformer.state_dict().items()}
    for k, v in teacher.transformer.state_dict().items():
        assert torch.equal(v, expected[k]), k  # the first call copies the student
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    wave = torch.randn(2, 8000)
    for step in (1, 2, 3):
        optimizer.zero_grad()
        student(wave).last_hidden.square().mean().backward()
        optimizer.step()
        teacher.on_step(student, step)
        d = {1: 0.945, 2: 0.99, 3: 0.99}[step]  # linear from 0.9 to 0.99 over 2 updates, then flat
        assert teacher.decay_at(step) == pytest.approx(d)
        live = dict(student.transformer.named_parameters())
        for name, value in expected.items():
            if name in live:  # the same two float32 operations as the teacher: bitwise
                expected[name] = value.mul(teacher.decay_at(step)).add(live[name].detach(), alpha=1 - teacher.decay_at(step))
        for k, v in teacher.transformer.state_dict().items():
            assert torch.equal(v, expected[k]), (step, k)
    # the first call of a resumed run (the same step again) changes nothing
    before = {k: v.clone() for k, v in teacher.transformer.state_dict().items()}
    teacher.on_step(student, 3)
    assert all(torch.equal(before[k], v) for k, v in teacher.transformer.state_dict().items())


def test_targets_are_the_instance_normalised_mean_of_the_top_ffn_outputs(registry):
    torch.manual_seed(1)
    student = tiny().eval()
    teacher = _teacher(registry, student, top_k=2)
    teacher.on_step(student, 0)
    wave = torch.randn(2, 24000)
    got = teacher.targets(wave)
    # by hand, from the module definitions (post-LN): x = LN(x + attn(x)); ffn = FFN(x); x = LN(x + ffn)
    with torch.no_grad():
        feat, _ = student.feature_extractor(wave, None)
        x = student.feature_projection.projection(student.feature_projection.layer_norm(feat))
        t = teacher.transformer
        x = t.layer_norm(x + t.pos_conv(x))
        ffn = []
        for layer in t.layers:
            mid = layer.attention_norm(x + layer.attention(x, None))
            ffn.append(layer.feed_forward(mid))
            x = layer.ffn_norm(mid + ffn[-1])
        want = sum(F.instance_norm(f.transpose(1, 2)).transpose(1, 2) for f in ffn[-2:]) / 2
    assert got.shape == (2, student.num_frames(24000), student.embed_dim) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert teacher.target_spec().dim == student.embed_dim


def test_passes_the_plugin_conformance_checks(registry):
    teacher = check_teacher(lambda geometry: registry.build("teacher", "ema", {"top_k": 8}, geometry=geometry))
    assert teacher.top_k == 2  # capped at the tiny student's depth
    assert set(teacher.training_state()) >= {"last_step"}


def test_has_no_targets_outside_training(registry):
    teacher = registry.build("teacher", "ema", {})
    with pytest.raises(ValueError, match="only inside `mert train`"):
        teacher.target_spec()


def _config(out, data, steps):
    return api.make_train_config(teachers=["ema"], preset="tiny", data=[data], out_dir=out, max_steps=steps,
                                 overrides=[*TINY, "checkpoint_every=2", "keep_checkpoints=10", "teacher.ema.top_k=2"])


def test_trains_and_resumes_exactly_with_its_weights_in_the_checkpoint(tmp_path, music_dir):
    out = tmp_path / "run"
    api.train(_config(out, music_dir, 4), progress=False)
    ref = load_checkpoint(out)
    ema = ref["teacher_states"]["ema"]
    assert int(ema["last_step"]) == 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "loss/ema" in records[-1] and "r2/ema" in records[-1]
    # the EMA copy moved towards the student but is not the student
    assert [k for k in ema if k.startswith("transformer.") and not torch.equal(ref["student"][k], ema[k])]

    # the folder as a run killed after its step-2 checkpoint leaves it, then resumed
    shutil.copyfile(out / "checkpoints" / "step_00000002.pt", out / "last.pt")
    (out / "checkpoints" / "step_00000004.pt").unlink()
    api.train(_config(out, music_dir, 4), resume=True, progress=False)
    run = load_checkpoint(out)
    assert run["step"] == 4
    # bitwise: the same computation on the same machine and threads; the checkpoint holds every state it depends on
    for part in ("student", "heads"):
        for k in ref[part]:
            assert torch.equal(ref[part][k], run[part][k]), (part, k)
    for k in ema:
        assert torch.equal(ema[k], run["teacher_states"]["ema"][k]), k


def test_music2vec_recipe_trains_on_the_demo_settings(tmp_path, music_dir):
    config = api.make_train_config(recipe="music2vec", preset="tiny", data=[music_dir], out_dir=tmp_path / "m2v", max_steps=2,
                                   overrides=TINY)
    assert [t.name for t in config.teachers] == ["ema"]
    assert (config.mask.prob, config.mask.length, config.loss.feature_penalty) == (0.65, 10, 0.0)
    api.train(config, progress=False)
    assert int(load_checkpoint(tmp_path / "m2v")["teacher_states"]["ema"]["last_step"]) == 2
