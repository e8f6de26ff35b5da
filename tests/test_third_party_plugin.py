"""A real third-party plugin package (tests/plugins/mert-loudness-teacher),
installed with pip the way a user would, shows up in `mert list-plugins` and
trains with `mert train --teacher loudness`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent / "plugins" / "mert-loudness-teacher"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    # --no-deps: mert and torch are already installed; --no-build-isolation: no network needed
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(PACKAGE)],
        check=True, cwd=build, capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    return env


def mert(*args, env):
    return subprocess.run([sys.executable, "-m", "mert_cli.main", *args], env=env, capture_output=True, text=True, timeout=600)


def test_listed_with_its_distribution_and_version(installed):
    result = mert("list-plugins", "--kind", "teacher", "--json", env=installed)
    assert result.returncode == 0, result.stderr
    row = next(r for r in json.loads(result.stdout) if r["name"] == "loudness")
    assert (row["distribution"], row["version"], row["status"]) == ("mert-loudness-teacher", "0.2.0", "ok")


def test_not_there_without_the_install():
    result = subprocess.run([sys.executable, "-m", "mert_cli.main", "list-plugins", "--json"], capture_output=True, text=True)
    assert "loudness" not in {r["name"] for r in json.loads(result.stdout)}


def test_trains_with_the_third_party_teacher(installed, tmp_path, music_dir):
    out = tmp_path / "run"
    result = mert("train", "--teacher", "loudness", "--teacher", "cqt", "--preset", "tiny", "--data", str(music_dir),
                  "--out", str(out), "--max-steps", "2", "--quiet", "--set", "data.batch_size=2",
                  "--set", "data.num_workers=0", "--set", "log_every=1", "--set", "teacher.loudness.floor_db=-60", env=installed)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "loss/loudness" in rows[-1] and "loss/cqt" in rows[-1]
    import torch

    state = torch.load(out / "last.pt", weights_only=True)
    assert state["plugin_versions"]["mert-loudness-teacher"] == "0.2.0"
