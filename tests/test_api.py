"""Everything the CLI does is scriptable: each command is a thin layer over a
function of :mod:`mert_core.api`, and the one KEY=VALUE parser reads values
the same way for every command."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from mert_cli.main import cli
from mert_core import api


def _record(monkeypatch, name, returns=None):
    """Replace ``api.<name>`` by a stub recording its calls; the CLI must go through it."""
    calls = []

    def stub(*args, **kwargs):
        calls.append((args, kwargs))
        return returns

    monkeypatch.setattr(api, name, stub)
    return calls


def test_teacher_fit_and_label_call_the_api(monkeypatch, tmp_path):
    fit = _record(monkeypatch, "fit_teacher", returns=tmp_path / "t.safetensors")
    result = CliRunner().invoke(cli, ["teacher", "fit", "kmeans-mfcc", "--data", str(tmp_path), "--out", str(tmp_path / "t.safetensors"),
                                      "--set", "n_clusters=8", "--set", "init=off", "--quiet"])
    assert result.exit_code == 0, result.output
    (args, kwargs), = fit
    assert args[0] == "kmeans-mfcc" and args[3] == {"n_clusters": 8, "init": "off"}  # `off` stays a string, as in `mert train`

    summary = SimpleNamespace(num_files=1, num_windows=2, num_frames=3, num_codebooks=1, dtype="uint16", labels_bytes=6,
                              out_dir=tmp_path / "store", skipped={})
    label = _record(monkeypatch, "label_data", returns=summary)
    result = CliRunner().invoke(cli, ["teacher", "label", "kmeans-mfcc", "--data", str(tmp_path), "--out", str(tmp_path / "store"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert label[0][0][0] == "kmeans-mfcc" and "labelled 1 files" in result.output


def test_eval_probe_extract_call_the_api(monkeypatch, tmp_path):
    task = SimpleNamespace(name="t", examples=lambda split: [])
    monkeypatch.setattr(api, "build_task", lambda name, options=None, registry=None: task)
    monkeypatch.setattr(api, "build_upstreams", lambda *a, **k: [SimpleNamespace(name="u")])
    evaluate = _record(monkeypatch, "evaluate", returns=SimpleNamespace(table="the report's table", files=[]))
    result = CliRunner().invoke(cli, ["eval", "--baseline", "handcrafted", "--task", "t", "--set", "max_epochs=2", "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
    assert evaluate and "the report's table" in result.output
    extract = _record(monkeypatch, "extract_task", returns={})
    assert CliRunner().invoke(cli, ["extract", "--baseline", "handcrafted", "--task", "t", "--quiet"]).exit_code == 0
    assert extract
    probe = _record(monkeypatch, "probe_task")
    monkeypatch.setattr("mert_core.evaluation.report.format_layer_table", lambda r: "layer table")
    result = CliRunner().invoke(cli, ["probe", "--baseline", "handcrafted", "--task", "t", "--quiet"])
    assert result.exit_code == 0, result.output
    assert probe and "layer table" in result.output


def test_ablate_and_export_call_the_api(monkeypatch, tmp_path):
    ablate = _record(monkeypatch, "ablate", returns=SimpleNamespace(files=[tmp_path / "ablation.md"], out_dir=tmp_path))
    result = CliRunner().invoke(cli, ["ablate", "--data", str(tmp_path), "--arm", "cqt=cqt", "--task", "demo-key", "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
    (args, kwargs), = ablate
    assert [a.name for a in args[0]] == ["cqt"] and kwargs["tasks"] == ["demo-key"]
    export = _record(monkeypatch, "export_hf", returns=[tmp_path / "config.json"])
    result = CliRunner().invoke(cli, ["export", str(tmp_path), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    assert export


@pytest.mark.parametrize("argv", [["teacher", "fit", "cqt", "--out", "x.safetensors", "--set", "bad"],
                                  ["eval", "--baseline", "handcrafted", "--task", "t", "--set", "bad"],
                                  ["train", "--set", "bad", "--dry-run"]])
def test_one_parser_one_error_for_every_command(argv, tmp_path):
    if argv[0] == "teacher":
        argv = [*argv[:3], "--data", str(tmp_path), *argv[3:]]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 2, result.output
    assert "--set 'bad': not a key=value pair; expected KEY=VALUE" in result.output and "Traceback" not in result.output
