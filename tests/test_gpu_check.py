"""benchmarks/gpu_check.py is meant for the first GPU a user lends us: its CPU path must keep
working (issue: the throughput benchmark once broke unseen)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_and_reports_every_section(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    proc = subprocess.run([sys.executable, str(script), "--device", "cpu", "--preset", "tiny", "--minutes", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for heading in ("## 1. Throughput", "## 2. mert train end to end", "## 3. Learning check", "gain over the random twin"):
        assert heading in proc.stdout, heading
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    e2e = report["end_to_end"]
    assert e2e["audio_seconds_per_second"] > 0 and 0 <= e2e["data_wait_fraction"] <= 1
    assert e2e["host_syncs_per_step"] is None  # counted on CUDA only
    assert report["learning"]["steps"] >= 20 and set(report["learning"]["gain_over_twin"]) == {"demo-pitch", "demo-key"}
