"""Continued pretraining (`mert train --init-from`): from a Hugging Face
HubertModel folder, a run folder, a .pt or a student.safetensors; refusals that
name the tensor; a resume of such a run."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from mert_cli.main import cli
from mert_core import api
from mert_core.checkpoint import file_digest, load_checkpoint, save_student
from mert_core.config import ModelConfig
from mert_core.convert import hf_config_from_args, hf_state_dict_to_mert
from mert_core.heads import TargetHeads
from mert_core.init_from import InitFromError, init_student
from mert_core.model import build_student, student_args

transformers = pytest.importorskip("transformers")

TINY = ["data.batch_size=2", "data.num_workers=0", "data.crop_seconds=2.0", "data.min_seconds=1.0", "log_every=1",
        # lr independent of max_steps during warmup, so a resumed run can be compared with a straight one
        "optim.warmup_steps=100", "optim.lr=5e-4"]


@pytest.fixture
def hf_folder(tmp_path):
    """A tiny random HubertModel written with save_pretrained; returns (folder, its weights in mert names)."""
    torch.manual_seed(123)
    model = transformers.HubertModel(transformers.HubertConfig(**hf_config_from_args(student_args("tiny"))))
    folder = tmp_path / "hf-tiny"
    model.save_pretrained(folder)
    return folder, hf_state_dict_to_mert(model.state_dict(), model.config.to_dict())


def _config(out, data, init_from=None, steps=2, extra=()):
    return api.make_train_config(teachers=["cqt"], preset="tiny", data=[data], out_dir=out, max_steps=steps,
                                 init_from=init_from, overrides=[*TINY, *extra])


def test_hf_folder_continues_from_exactly_its_weights_and_resumes(tmp_path, music_dir, hf_folder):
    folder, hf_weights = hf_folder
    frozen = ["model.overrides.feature_grad_mult=0"]  # the conv extractor gets no update: it must stay bitwise the source's
    run = tmp_path / "run"
    messages = []
    api.train(_config(run, music_dir, folder, steps=2, extra=frozen), progress=False, log=messages.append)
    state = load_checkpoint(run / "last.pt")
    assert state["config"]["model"]["init_from"] == str(folder)
    assert state["config"]["model"]["init_from_hash"] == file_digest(folder / "model.safetensors")
    assert any("initialised from" in m and "heads fresh" in m for m in messages)
    lrs = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    for key, start in hf_weights.items():
        after = state["student"][key]
        if key.startswith("feature_extractor."):
            assert torch.equal(after, start), key
        else:  # two Adam steps move a weight by at most a few lr: a random init would be ~1e-2 away
            assert (after - start).abs().max() <= 5 * sum(lrs), key
    assert any(not torch.equal(state["student"][k], v) for k, v in hf_weights.items())  # it did train

    # a resume takes the checkpoint's weights (not the source's again) and keeps the recorded source
    api.train(_config(run, music_dir, None, steps=3, extra=frozen), resume=True, progress=False)
    straight = tmp_path / "straight"
    api.train(_config(straight, music_dir, folder, steps=3, extra=frozen), progress=False)
    resumed, uninterrupted = load_checkpoint(run / "last.pt"), load_checkpoint(straight / "last.pt")
    assert resumed["step"] == 3 and resumed["config"]["model"]["init_from_hash"] == state["config"]["model"]["init_from_hash"]
    for key, tensor in uninterrupted["student"].items():
        assert torch.equal(resumed["student"][key], tensor), key


def _fresh(teacher_specs, **overrides):
    torch.manual_seed(7)
    student = build_student(ModelConfig(preset="tiny", overrides=overrides))
    return student, TargetHeads(teacher_specs, student.embed_dim, 64)


def test_run_folder_pt_and_safetensors_sources_and_heads(tmp_path, music_dir):
    result = api.train(_config(tmp_path / "run", music_dir, steps=1), progress=False)
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    specs = result.heads.specs

    student, heads = _fresh(specs)
    digest, reused = init_student(tmp_path / "run", student, heads, state["teacher_hashes"])
    assert reused == ["cqt"] and digest == file_digest(tmp_path / "run" / "last.pt")
    for key, tensor in state["student"].items():
        assert torch.equal(student.state_dict()[key], tensor), key
    for key, tensor in state["heads"].items():
        assert torch.equal(heads.state_dict()[key], tensor), key

    # the same teacher with other options: its head stays fresh
    student, heads = _fresh(specs)
    fresh_heads = {k: v.clone() for k, v in heads.state_dict().items()}
    _, reused = init_student(tmp_path / "run" / "last.pt", student, heads, {"cqt": "another-config"})
    assert reused == []
    assert all(torch.equal(heads.state_dict()[k], v) for k, v in fresh_heads.items())

    save_student(result.student, tmp_path / "student.safetensors")
    student, heads = _fresh(specs)
    _, reused = init_student(tmp_path / "student.safetensors", student, heads, state["teacher_hashes"])
    assert reused == []
    for key, tensor in result.student.state_dict().items():
        assert torch.equal(student.state_dict()[key], tensor), key


def test_sources_that_do_not_fit_are_refused_naming_the_tensor(tmp_path, hf_folder):
    folder, _ = hf_folder
    specs = {}
    with pytest.raises(InitFromError, match=r"tensor transformer\.layers\.0\.feed_forward\.intermediate\.weight has shape \(512, 128\), the run's student needs \(256, 128\)"):
        init_student(folder, *_fresh(specs, ffn_dim=256), {})
    with pytest.raises(InitFromError, match=r"has no tensor 'transformer\.layers\.2\.attention\.qkv\.weight'"):
        init_student(folder, *_fresh(specs, num_layers=3), {})
    with pytest.raises(InitFromError, match=r"'transformer\.layers\.1\.attention\.qkv\.weight' has no place"):
        init_student(folder, *_fresh(specs, num_layers=1), {})
    with pytest.raises(InitFromError, match=r"layer_norm_first=False, the run's student True"):
        init_student(folder, *_fresh(specs, layer_norm_first=True), {})
    with pytest.raises(InitFromError, match="the source changed"):
        init_student(folder, *_fresh(specs), {}, expected_hash="0" * 16)
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(InitFromError, match="pass its folder"):
        init_student(tmp_path / "model.safetensors", *_fresh(specs), {})


def test_cli_refusals_are_one_line_usage_errors(tmp_path, music_dir, hf_folder):
    folder, _ = hf_folder
    base = ["train", "--teacher", "cqt", "--preset", "tiny", "--data", str(music_dir), "--out", str(tmp_path / "run"),
            "--max-steps", "1", "--quiet", *[a for s in TINY for a in ("--set", s)]]
    result = CliRunner().invoke(cli, [*base, "--init-from", str(folder), "--set", "model.overrides.ffn_dim=256"])
    assert result.exit_code == 2, result.output
    assert "transformer.layers.0.feed_forward.intermediate.weight" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli, [*base, "--init-from", str(tmp_path / "missing"), "--dry-run"])
    assert result.exit_code == 2 and "model.init_from" in result.output
