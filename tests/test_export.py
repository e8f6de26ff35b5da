"""`mert export --format hf`: folders that plain transformers loads with equal
outputs, a lossless round trip back into mert, the model card, and refusals."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from test_model import assert_hidden_states_match

from mert_cli.main import cli
from mert_core import api
from mert_core.checkpoint import load_student, save_student
from mert_core.convert import load_hf_hubert
from mert_core.export import HF_FILES, ExportError, write_hf_folder
from mert_core.model import student_args, mert_student

transformers = pytest.importorskip("transformers")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def check_export(student, folder, seconds: float = 0.5):
    """Write ``student`` to ``folder``; compare every layer with HubertModel and the round trip."""
    student = student.eval()
    assert write_hf_folder(student, folder) == [folder / name for name in HF_FILES]
    theirs = transformers.HubertModel.from_pretrained(folder).eval()
    wave = torch.randn(2, int(seconds * 24000), generator=torch.Generator().manual_seed(0))
    stable = student.args["layer_norm_first"]
    with torch.no_grad():
        b = theirs(wave, output_hidden_states=True)
        # conv1d layout (the GPU path): the same arithmetic as transformers
        student.feature_extractor.channels_last = False
        assert_hidden_states_match(student(wave, output_hidden_states=True), b, stable, atol=1e-5)
    # mert -> HF folder -> mert: the very same tensors
    back = load_hf_hubert(folder)
    ours = student.state_dict()
    assert set(back.state_dict()) == set(ours)
    for key, tensor in back.state_dict().items():
        assert torch.equal(tensor, ours[key]), key
    assert back.args["attention_relax"] == student.args["attention_relax"]
    assert back.args["layer_norm_first"] == stable
    return theirs, wave, b


@pytest.mark.parametrize("stable", [False, True], ids=["post-LN", "pre-LN-relax"])
def test_tiny_export_loads_with_plain_transformers_and_matches_every_layer(tmp_path, stable):
    torch.manual_seed(0)
    student = mert_student(**student_args("tiny", layer_norm_first=stable, attention_relax=32.0 if stable else 0.0))
    theirs, wave, b = check_export(student, tmp_path / "hf")
    auto = transformers.AutoModel.from_pretrained(tmp_path / "hf")  # no trust_remote_code
    assert type(auto) is transformers.HubertModel
    with torch.no_grad():
        # the default CPU layout (GEMM convs) rounds differently: same values to 1e-5 relative
        student.feature_extractor.channels_last = True
        a = student(wave, output_hidden_states=True)
        torch.testing.assert_close(a.last_hidden, auto.eval()(wave).last_hidden_state, atol=1e-5, rtol=1e-5)
    for x, y in zip(a.hidden_states[:-1], b.hidden_states[:-1]):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_card_says_how_to_align_a_long_receptive_field_like_mert_extract(tmp_path):
    import re

    import numpy as np
    import transformers

    from mert_core.evaluation.upstreams import StudentUpstream

    torch.manual_seed(0)
    student = mert_student(**student_args("cpu")).eval()
    write_hf_folder(student, tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    lead = int(re.search(r"pad\(wave, \((\d+), 0\)\)", card).group(1))
    assert lead == 640  # 2 frames of hop 320 for the 1840-sample receptive field
    wave = np.random.default_rng(0).standard_normal(24000 * 3).astype(np.float32) * 0.1
    ours = StudentUpstream(student, id="x", name="x").frame_features([wave])[0]  # T, L, D
    hf = transformers.HubertModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs = hf(torch.nn.functional.pad(torch.from_numpy(wave)[None], (lead, 0)), output_hidden_states=True).hidden_states
    theirs = torch.stack(theirs, dim=2)[0].numpy()  # T, L, D
    np.testing.assert_allclose(ours, theirs[: len(ours)], atol=1e-4, rtol=1e-4)
    write_hf_folder(mert_student(**student_args("tiny")), tmp_path / "tiny")
    assert "pad(wave" not in (tmp_path / "tiny" / "README.md").read_text()  # the paper's grid needs nothing


@pytest.mark.slow  # 95M random weights, built twice: ~20 s on 2 cores
def test_95m_export_matches_every_layer(tmp_path):
    torch.manual_seed(1)
    check_export(mert_student(**student_args("95m")), tmp_path / "hf", seconds=0.4)


@pytest.mark.slow
def test_330m_export_matches_every_layer(tmp_path):
    torch.manual_seed(2)
    check_export(mert_student(**student_args("330m")), tmp_path / "hf", seconds=0.4)


def test_preprocessor_passes_the_raw_wave_at_24_khz(tmp_path):
    write_hf_folder(mert_student(**student_args("tiny")), tmp_path)
    processor = transformers.Wav2Vec2FeatureExtractor.from_pretrained(tmp_path)
    assert processor.sampling_rate == 24000 and processor.do_normalize is False
    wave = 0.1 * torch.randn(9000, generator=torch.Generator().manual_seed(3))
    inputs = processor(wave.numpy(), sampling_rate=24000, return_tensors="pt")
    assert torch.equal(inputs["input_values"][0], wave)  # what the student was trained on


def test_run_folder_exports_through_the_cli_with_a_model_card(tmp_path, music_dir):
    out = tmp_path / "run"
    config = api.make_train_config(
        teachers=["cqt"], preset="tiny", data=[music_dir], out_dir=out, max_steps=2,
        overrides=["data.batch_size=2", "data.num_workers=0", "data.crop_seconds=2.0", "data.min_seconds=1.0"],
    )
    api.train(config, progress=False)
    student, info = load_student(out)
    results = tmp_path / "results.json"
    rows = [{"task": "demo-key", "upstream": "run", "upstream_id": info["checkpoint_id"], "metric": "key_score",
             "test": 0.625, "valid": 0.5, "layer": "2", "lr": 1e-3},
            {"task": "demo-key", "upstream": "random", "upstream_id": "random-0", "metric": "key_score",
             "test": 0.125, "valid": 0.1, "layer": "1", "lr": 1e-3}]
    results.write_text(json.dumps({"table": rows, "results": []}))

    result = run("export", out, "--format", "hf", "--out", tmp_path / "hf", "--results", results)
    assert result.exit_code == 0, result.output
    hf = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    wave = torch.randn(1, 12000)
    with torch.no_grad():
        torch.testing.assert_close(student(wave).last_hidden, hf(wave).last_hidden_state, atol=1e-5, rtol=1e-5)
    card = (tmp_path / "hf" / "README.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert "library_name: transformers" in card
    assert "| cqt | default |" in card
    assert "optimizer updates: 2" in card and f"{summary['audio_hours_seen']:.3f} hours" in card
    assert f"{sum(p.numel() for p in student.parameters()) / 1e6:.2f} M" in card
    assert "| demo-key | key_score | 0.6250 |" in card and "0.1250" not in card  # only this checkpoint's rows

    # the .pt checkpoint knows its own step and audio
    pt_card = tmp_path / "hf-pt"
    assert run("export", out / "last.pt", "--out", pt_card).exit_code == 0
    assert "optimizer updates: 2" in (pt_card / "README.md").read_text()


def test_what_hubert_model_cannot_hold_is_refused_in_one_line(tmp_path):
    student = mert_student(**student_args("tiny", layer_norm_eps=1e-6))
    save_student(student, tmp_path / "student.safetensors")
    result = run("export", tmp_path / "student.safetensors", "--out", tmp_path / "hf")
    assert result.exit_code == 2, result.output
    assert "layer_norm_eps=1e-06" in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error:")]) == 1
    assert not (tmp_path / "hf").exists()  # refused before anything was written
    with pytest.raises(ExportError, match="layer_norm_eps"):
        write_hf_folder(student, tmp_path / "hf")


def test_bad_sources_and_results_are_usage_errors(tmp_path):
    result = run("export", tmp_path / "nothing", "--out", tmp_path / "hf")
    assert result.exit_code == 2 and "does not exist" in result.output
    save_student(mert_student(**student_args("tiny")), tmp_path / "student.safetensors")
    (tmp_path / "results.json").write_text(json.dumps({"table": [{"upstream_id": "someone-else"}]}))
    result = run("export", tmp_path / "student.safetensors", "--out", tmp_path / "hf", "--results", tmp_path / "results.json")
    assert result.exit_code == 2 and "no rows for this checkpoint" in result.output and "someone-else" in result.output
    result = run("export", tmp_path / "student.safetensors", "--format", "onnx", "--out", tmp_path / "hf")
    assert result.exit_code == 2 and "onnx" in result.output
    assert run("export", "--help").exit_code == 0
