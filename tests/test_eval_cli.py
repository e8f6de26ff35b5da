"""``mert extract / probe / eval`` end to end on tiny demo data, student
upstreams against references (windowing, padding, Hugging Face HubertModel),
and a third-party task plugin installed through an entry point."""

from __future__ import annotations

import csv
import json
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import threads
from mert_cli.evaluate import eval_cmd, extract_cmd, probe_cmd
from mert_core.checkpoint import save_student
from mert_core.demo import DemoSize, ensure_demo_data
from mert_core.evaluation.upstreams import random_upstream
from mert_core.model import tiny

TINY_PROBE = ["--set", "max_epochs=3", "--set", "lrs=[0.001]", "--set", "hidden_units=16", "--set", "frame_batch_frames=512",
              "--device", "cpu", "--quiet"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: on a shared 2-core machine a second intra-op thread only adds stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(threads(1))
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    size = DemoSize(pieces_per_key=3, piece_seconds=3.0, keys=("C major", "G major", "A minor", "E minor"),
                    note_pitches=(48, 60, 72), timbres=("flute", "bell", "organ"), note_seconds=0.5)
    return ensure_demo_data(tmp_path_factory.mktemp("demo") / "demo", size=size, progress=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("ckpt") / "student.safetensors"
    save_student(tiny(), path)
    return path


def _task_sets(root, *tasks):
    return [a for t in tasks for a in ("--task-set", f"{t}.data_dir={root}")]


def test_eval_puts_checkpoint_random_and_handcrafted_in_one_table_and_reuses_features(demo_root, checkpoint, tmp_path):
    runner = CliRunner()
    cache, out = tmp_path / "cache", tmp_path / "out"
    tasks = ["--task", "demo-key", "--task", "demo-beat"]
    common = ["--checkpoint", str(checkpoint), "--baseline", "random", "--baseline", "handcrafted", *tasks,
              *_task_sets(demo_root, "demo-key", "demo-beat"), "--cache-dir", str(cache), *TINY_PROBE]
    first = runner.invoke(eval_cmd, [*common, "--out", str(out)])
    assert first.exit_code == 0, first.output
    for name in ("results.json", "results.csv", "layers_demo-key.png", "layers_demo-beat.png", "comparison.png"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(out / "results.csv")))
    ckpt_name = f"{checkpoint.parent.name}/student"  # a run's student.safetensors is named after its folder
    assert {(r["task"], r["upstream"]) for r in rows} == {(t, u) for t in ("demo-key", "demo-beat")
                                                          for u in (ckpt_name, "random-student", "handcrafted")}
    assert {r["metric"] for r in rows} == {"key_weighted_score", "beat_f_measure"}
    assert all(r["features_reused"] == "False" for r in rows)
    data = json.loads((out / "results.json").read_text())
    ups = {u["name"]: u for u in data["upstreams"]}
    assert ups["random-student"]["model_args"] == ups[ckpt_name]["model_args"]  # same size as the checkpoint
    assert ups["random-student"]["id"] != ups[ckpt_name]["id"]
    assert "handcrafted" in first.output and "demo-beat" in first.output

    # A second run reuses every feature set, and says so in its log.
    second = runner.invoke(eval_cmd, [*[c for c in common if c != "--quiet"], "--out", str(tmp_path / "out2")])
    assert second.exit_code == 0, second.output
    assert second.output.count("reusing cached features at") == 3 * 2 * 3  # upstreams x tasks x splits
    assert "extracting" not in second.output
    rows2 = list(csv.DictReader(open(tmp_path / "out2" / "results.csv")))
    assert all(r["features_reused"] == "True" for r in rows2)
    assert [r["test"] for r in rows2] == [r["test"] for r in rows]  # seeded: the same numbers


def test_extract_then_probe_single_task(demo_root, checkpoint, tmp_path):
    runner = CliRunner()
    args = ["--checkpoint", str(checkpoint), "--task", "demo-timbre", "--task-set", f"data_dir={demo_root}", "--cache-dir", str(tmp_path)]
    ext = runner.invoke(extract_cmd, [*args, "--split", "train", "--quiet"])
    assert ext.exit_code == 0, ext.output
    assert "demo-timbre/train: 3 items, features (3, 3, 128)" in ext.output
    res = runner.invoke(probe_cmd, [*args, *TINY_PROBE[:-1], "--out", str(tmp_path / "probe.json")])
    assert res.exit_code == 0, res.output
    assert "reusing cached features at" in res.output and "<- selected" in res.output
    saved = json.loads((tmp_path / "probe.json").read_text())
    assert saved[0]["task"] == "demo-timbre" and {m["layer"] for m in saved[0]["per_layer"]} == {"layer0", "layer1", "layer2", "weighted-sum"}


@pytest.mark.parametrize("argv, message", [
    ("--baseline handcrafted --task no-such-task", "unknown task 'no-such-task'"),
    ("--baseline handcrafted --task gtzan-genre", "option 'data_dir' is required"),
    ("--baseline handcrafted --task demo-key --task-set data_dir={demo} --set epochs=3", "--set epochs=...: unknown option"),
    ("--baseline handcrafted --task demo-key --task-set data_dir={demo} --set dropout=2", "dropout"),
    ("--baseline random --task demo-key --task-set data_dir={demo}", "add --preset"),
    ("--checkpoint /no/such/run --task demo-key --task-set data_dir={demo}", "/no/such/run"),
    ("--baseline handcrafted --task demo-key --task demo-beat --task-set data_dir=/x", "TASK.data_dir"),
    ("--baseline handcrafted --task demo-key --task-set data_dir=/no/demo/here", "no metadata.jsonl"),
])
def test_bad_input_is_a_one_line_usage_error(argv, message, demo_root):
    result = CliRunner().invoke(eval_cmd, [*argv.format(demo=demo_root).split(), "--quiet"])
    assert result.exit_code == 2, result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.output


# -- student upstreams against references --------------------------------------------------

def test_student_windows_and_padding_match_single_forward_passes():
    up = random_upstream("tiny", seed=3, window_seconds=1.0, batch_windows=4, pad_batches=True)  # the GPU's padded batches
    rng = np.random.default_rng(0)
    long, short = (0.1 * rng.standard_normal(n).astype(np.float32) for n in (24000 * 3 + 5000, 9000))
    frames = up.frame_features([long, short])
    student = up.student
    assert frames[0].shape[0] == 3 * 75 + student.num_frames(5000 + 80)
    with torch.no_grad():
        ref_short = torch.stack(student(torch.from_numpy(short)[None], output_hidden_states=True).hidden_states, 2)[0]
        window2 = torch.from_numpy(long[24000:48000 + 80])[None]
        ref_w2 = torch.stack(student(window2, output_hidden_states=True).hidden_states, 2)[0]
    torch.testing.assert_close(torch.from_numpy(frames[1]), ref_short, atol=1e-5, rtol=1e-4)  # padded in a batch
    torch.testing.assert_close(torch.from_numpy(frames[0][75:150]), ref_w2, atol=1e-5, rtol=1e-4)
    clip = up.clip_features([long])[0]
    np.testing.assert_allclose(clip, frames[0].mean(axis=0), atol=1e-5)
    # Same seed, same id and weights; the caller's random state is untouched.
    state = torch.random.get_rng_state()
    again = random_upstream("tiny", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert again.id == up.id and random_upstream("tiny", seed=4).id != up.id
    assert all(torch.equal(a, b) for a, b in zip(again.student.state_dict().values(), student.state_dict().values()))


def test_a_long_receptive_field_student_is_fed_so_that_frame_t_is_centred_near_t_hops():
    """The cpu preset sees 1840 samples per frame: the file is led by lead_frames hops of
    silence, so frame t of the features is the student's frame centred near t * hop + hop / 2
    (frame-level tasks read frame t as time t / 75 s) and the windows still tile the file."""
    up = random_upstream("cpu", seed=3, window_seconds=1.0, batch_windows=4)
    student = up.student
    lead = student.geometry.lead_frames * 320
    assert lead == 640 and up.lead_samples == lead
    wave = (0.1 * np.random.default_rng(2).standard_normal(24000 * 2 + 3000)).astype(np.float32)
    frames = up.frame_features([wave])[0]
    led = torch.from_numpy(np.concatenate([np.zeros(lead, np.float32), wave]))
    assert frames.shape[0] == 2 * 75 + student.num_frames(len(led) - 2 * 24000)  # two full windows and the rest
    with torch.no_grad():
        ref = torch.stack(student(led[None, : 24000 + up.extra_samples], output_hidden_states=True).hidden_states, 2)[0]
    torch.testing.assert_close(torch.from_numpy(frames[:75]), ref, atol=1e-5, rtol=1e-4)
    centre = np.arange(75) * 320 - lead + student.geometry.receptive_field / 2  # in the file's samples
    assert np.all(np.abs(centre - (np.arange(75) * 320 + 160)) <= 160)


def test_on_a_cpu_only_windows_of_equal_length_share_a_batch():
    """Padding costs the masked paths and buys nothing on a CPU (benchmarks/bench_extract.py): 0.42x -> 1.09x."""
    up = random_upstream("tiny", seed=3, window_seconds=1.0, batch_windows=2)
    assert not up.pad_batches and random_upstream("tiny", seed=3, pad_batches=True).pad_batches
    # length-sorted windows: three full ones, two of another length, one alone
    assert up._batches([0, 1, 2, 3, 4, 5], [24080, 24080, 24080, 9000, 9000, 500]) == [[0, 1], [2], [3, 4], [5]]
    rng = np.random.default_rng(1)
    waves = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (24000 * 2 + 7000, 9000, 12000)]
    padded = random_upstream("tiny", seed=3, window_seconds=1.0, batch_windows=4, pad_batches=True)
    for a, b in zip(up.clip_features(waves), padded.clip_features(waves)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)  # the same features either way


def test_hugging_face_hubert_folder_gives_the_same_hidden_states_as_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from mert_core.convert import hf_config_from_args
    from mert_core.evaluation.api import build_upstreams
    from mert_core.model import student_args

    torch.manual_seed(0)
    config = transformers.HubertConfig(**{k: v for k, v in hf_config_from_args(student_args("tiny")).items() if k != "model_type"})
    hf = transformers.HubertModel(config).eval()
    hf.save_pretrained(tmp_path / "hf-tiny")
    (up,) = build_upstreams(hf_models=[tmp_path / "hf-tiny"])
    assert up.kind == "hf" and up.name == "hf-tiny" and up.id.startswith("hf-")
    wave = 0.1 * np.random.default_rng(1).standard_normal(24000).astype(np.float32)
    with torch.no_grad():
        ref = torch.stack(hf(torch.from_numpy(wave)[None], output_hidden_states=True).hidden_states, 2)[0]
    torch.testing.assert_close(torch.from_numpy(up.frame_features([wave])[0]), ref, atol=1e-4, rtol=1e-4)


# -- a third-party task, installed like any package --------------------------------------

def test_third_party_task_plugin_runs_through_the_cli(make_dist, monkeypatch, demo_root, tmp_path):
    make_dist("mert-octave-task", "0.3.0", {"octave-task": "octave_task"}, {"octave_task": textwrap.dedent('''
        from pathlib import Path
        from pydantic import Field
        from mert_core.hookspecs import hookimpl
        from mert_core.demo import load_demo_metadata
        from mert_core.tasks import Example, Task, TaskOptions

        class Options(TaskOptions):
            data_dir: Path = Field(description="A demo-schema folder.")

        class OctaveTask(Task):
            name = "note-octave"
            description = "Is the demo note at or above middle C?"
            Options = Options

            def labels(self):
                return ["low", "high"]

            def load_examples(self, split):
                root = self.options.data_dir
                return [Example(root / r["path"], int(r["pitch"] >= 60)) for r in load_demo_metadata(root, "note", split)]

        @hookimpl
        def register_tasks(register):
            register(OctaveTask)
    ''')})
    import mert_core.registry as registry

    monkeypatch.setattr(registry, "_DEFAULT", None)  # load the newly installed distribution
    result = CliRunner().invoke(probe_cmd, ["--baseline", "handcrafted", "--task", "note-octave", "--task-set", f"data_dir={demo_root}",
                                            "--cache-dir", str(tmp_path), *TINY_PROBE])
    assert result.exit_code == 0, result.output
    assert "handcrafted on note-octave (accuracy)" in result.output
