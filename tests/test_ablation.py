"""``mert ablate`` end to end at a tiny size: arms x seeds pretrained, a shared
k-means fit, probes beside the baselines, the table, and reuse on a rerun."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from mert_cli.main import cli
from mert_core.ablation import parse_arm, summarise
from mert_core.demo import DemoSize, ensure_demo_data
from mert_core.runconfig import ConfigError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_arm_syntax():
    assert parse_arm("lmc+cqt=kmeans-logmel-chroma+cqt").teachers == ("kmeans-logmel-chroma", "cqt")
    assert parse_arm("v1=recipe:mert-v1").recipe == "mert-v1"
    arm = parse_arm("mfcc100=kmeans-mfcc;teacher.kmeans-mfcc.n_clusters=100")
    assert arm.teachers == ("kmeans-mfcc",) and arm.overrides == ("teacher.kmeans-mfcc.n_clusters=100",)
    for bad in ("cqt", "=cqt", "a/b=cqt", "x=cqt;nokey"):
        with pytest.raises(ConfigError, match="--arm"):
            parse_arm(bad)


class _Result:
    def __init__(self, upstream, task, score):
        self.upstream, self.task, self.metric, self.test_score = upstream, task, "accuracy", score


def test_summary_groups_seeds_by_arm():
    rows = summarise([_Result("cqt@s0", "t", 0.5), _Result("cqt@s1", "t", 0.7), _Result("random@s0", "t", 0.2),
                      _Result("random@s1", "t", 0.2), _Result("handcrafted", "t", 0.4)])
    by_arm = {r["arm"]: r for r in rows}
    assert by_arm["cqt"]["mean"] == pytest.approx(0.6) and by_arm["cqt"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert by_arm["random"]["std"] == 0.0 and by_arm["handcrafted"]["scores"] == [0.4]


def test_tiny_ablation_end_to_end_shares_fits_and_resumes(tmp_path, music_dir):
    demo = ensure_demo_data(tmp_path / "demo", size=DemoSize(
        pieces_per_key=1, piece_seconds=2.0, keys=("C major",), note_pitches=(48, 55, 60, 67), timbres=("flute", "organ", "bell"),
        note_seconds=0.5), progress=False)
    out = tmp_path / "ablation"
    args = [
        "ablate", "--data", str(music_dir), "--seeds", "2", "--max-steps", "2", "--out", str(out), "--quiet",
        "--arm", "cqt=cqt", "--arm", "mfcc=kmeans-mfcc;teacher.kmeans-mfcc.n_clusters=8",
        "--arm", "mfcc+cqt=kmeans-mfcc+cqt;teacher.kmeans-mfcc.n_clusters=8", "--arm", "m2v=recipe:music2vec",
        "--task", "demo-pitch", "--task-set", f"demo-pitch.data_dir={demo}",
        "--train-set", "data.batch_size=2", "--train-set", "data.num_workers=0", "--train-set", "data.crop_seconds=2.0",
        "--train-set", "data.min_seconds=1.0", "--train-set", "teacher.cqt.stats_hours=0.01",
        "--set", "max_epochs=2", "--set", "lrs=[0.001]", "--set", "hidden_units=8", "--device", "cpu",
    ]
    first = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["cqt-s0", "cqt-s1", "m2v-s0", "m2v-s1", "mfcc+cqt-s0", "mfcc+cqt-s1", "mfcc-s0", "mfcc-s1"]
    # a recipe arm trains the same student size as the teacher arms (the base recipe's), not its recipe's 95m
    m2v = json.loads((out / "runs" / "m2v-s0" / "config.json").read_text())
    assert m2v["model"]["preset"] == "cpu" and [t["name"] for t in m2v["teachers"]] == ["ema"]
    # one k-means fit for the four runs that use it, one CQT statistics file for the four with cqt
    fitted = sorted(p.name.split("-")[0] for p in (out / "teachers").glob("*.safetensors"))
    assert fitted == ["cqt", "kmeans"]
    configs = [json.loads((out / "runs" / r / "config.json").read_text()) for r in runs if r.startswith("mfcc")]
    assert len({c["teachers"][0]["options"]["teacher_file"] for c in configs}) == 1
    assert {json.loads((out / "runs" / r / "config.json").read_text())["seed"] for r in runs} == {0, 1}
    rows = json.loads((out / "ablation.json").read_text())["rows"]
    arms = {r["arm"]: r for r in rows}
    assert set(arms) == {"cqt", "mfcc", "mfcc+cqt", "m2v", "random", "handcrafted"}
    assert all(len(arms[a]["scores"]) == 2 for a in ("cqt", "mfcc", "mfcc+cqt", "random"))
    assert all(0.0 <= s <= 1.0 for r in rows for s in r["scores"])
    for name in ("ablation.txt", "ablation.csv", "ablation.png"):
        assert (out / name).stat().st_size > 0
    table = (out / "ablation.txt").read_text()
    assert "mfcc+cqt" in table and "+-" in table

    # a second run reuses every pretraining and feature set
    before = {r: (out / "runs" / r / "student.safetensors").stat().st_mtime_ns for r in runs}
    second = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert second.exit_code == 0, second.output
    assert second.output.count("reusing the finished run") == 8  # every arm x seed
    assert before == {r: (out / "runs" / r / "student.safetensors").stat().st_mtime_ns for r in runs}
    assert json.loads((out / "ablation.json").read_text())["rows"] == rows


def test_bad_arm_is_a_usage_error(tmp_path, music_dir):
    result = CliRunner().invoke(cli, ["ablate", "--data", str(music_dir), "--arm", "x=no-such-teacher", "--task", "demo-pitch",
                                      "--out", str(tmp_path / "a")])
    assert result.exit_code == 2
    assert "no-such-teacher" in result.output
