"""The CLI's contract: --help everywhere, one-line errors with exit code 2 for
bad options and config fields, the Python API and the CLI agree."""

import pytest
from click.testing import CliRunner

from mert_cli.main import cli
from mert_core import api


def run(*args):
    return CliRunner().invoke(cli, list(args))


@pytest.mark.parametrize("command", [[], ["train"], ["list-plugins"], ["teacher"], ["eval"], ["extract"], ["probe"], ["new-plugin"]])
def test_help_on_every_command(command):
    result = run(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


@pytest.mark.parametrize(
    "args, names",
    [
        (["--set", "optim.lr=fast"], "optim.lr"),
        (["--set", "optim.nope=1"], "optim.nope"),
        (["--set", "data.batch_size=0"], "data.batch_size"),
        (["--set", "teacher.cqt.no_such_option=1"], "no_such_option"),
        (["--set", "teacher.rvq-vae.codebooks=1"], "rvq-vae"),
        (["--teacher", "nonexistent"], "nonexistent"),
        (["--augment", "nonexistent"], "nonexistent"),
        (["--recipe", "nonexistent"], "nonexistent"),
        (["--data", "/no/such/folder"], "/no/such/folder"),
        (["--set", "lr"], "key=value"),
    ],
)
def test_bad_input_is_one_line_exit_2_naming_the_field(args, names):
    result = run("train", "--teacher", "cqt", *args, "--dry-run") if "--teacher" not in args else run("train", *args, "--dry-run")
    assert result.exit_code == 2, result.output
    assert names in result.output
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1


def test_bad_config_file_names_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  warmup_steps: -5\n")
    result = run("train", "--config", str(bad), "--dry-run")
    assert result.exit_code == 2 and "optim.warmup_steps" in result.output
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [unclosed\n")
    result = run("train", "--config", str(broken), "--dry-run")
    assert result.exit_code == 2 and str(broken) in result.output


def test_precedence_recipe_then_file_then_flags_then_set(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  lr: 0.001\n  max_steps: 50\ndata:\n  batch_size: 3\n")
    config = api.make_train_config(recipe="cqt-only", config_file=cfg, max_steps=20, overrides=["optim.lr=0.002"])
    assert config.optim.lr == 0.002 and config.optim.max_steps == 20 and config.data.batch_size == 3
    assert [t.name for t in config.teachers] == ["cqt"] and config.recipe == "cqt-only"
    result = run("train", "--recipe", "cqt-only", "--config", str(cfg), "--max-steps", "20", "--set", "optim.lr=0.002", "--dry-run")
    assert result.exit_code == 0, result.output
    assert api.TrainConfig.model_validate_json(result.output) == config


def test_recipe_values_follow_the_preset():
    large = api.make_train_config(recipe="mert-v1", preset="330m")
    base = api.make_train_config(recipe="mert-v1", preset="95m")
    assert (large.optim.lr, large.optim.grad_clip, large.loss.final_dim) == (1.5e-3, 1.0, 128)
    assert (base.optim.lr, base.optim.grad_clip, base.loss.final_dim) == (5e-4, 10.0, 64)
    assert large.data.crop_seconds == 5.12 and [t.name for t in large.teachers] == ["rvq-vae", "cqt"]
    assert [a.name for a in large.augment] == ["inbatch-mixup"]


def test_teacher_shorthand_sets_options_weight_and_label_store(tmp_path):
    config = api.make_train_config(teachers=["cqt"], overrides=["teacher.cqt.n_bins=84", "teacher.cqt.weight=0.5", f"teacher.cqt.label_store={tmp_path}"])
    t = config.teachers[0]
    assert (t.options, t.weight, t.label_store) == ({"n_bins": 84}, 0.5, tmp_path)


def test_version_names_the_distribution_torch_and_torchaudio():
    from importlib import metadata

    import torch
    import torchaudio

    import mert_core

    assert metadata.version("mert-toolkit") == mert_core.__version__  # pyproject reads the version from mert_core
    result = run("--version")
    assert result.exit_code == 0, result.output
    line = result.output.strip()
    assert line.startswith(f"mert-toolkit {metadata.version('mert-toolkit')} (")
    # metadata gives "2.4.1" where torch.__version__ may say "2.4.1+cpu"
    assert f"torch {torch.__version__.split('+')[0]}" in line and f"torchaudio {torchaudio.__version__.split('+')[0]}" in line


def test_every_user_facing_error_is_one_line_with_its_exit_code_and_a_bug_is_not():
    import inspect

    from mert_cli.errors import one_line
    from mert_core import errors

    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.MertError)]
    assert {"AudioError", "ExportError", "TrainingError", "ConfigError", "CheckpointError"} <= {c.__name__ for c in classes}
    for cls in classes:
        error = one_line(cls("file x.wav: what to do"))
        assert error is not None and error.exit_code == cls.exit_code == (2 if issubclass(cls, errors.BadInputError) else 1), cls
        assert error.format_message() == "file x.wav: what to do"
    for bug in (ValueError("x"), KeyError("x"), RuntimeError("x"), TypeError("x"), AttributeError("x")):
        assert one_line(bug) is None, bug  # a bug keeps its traceback


BUGGY_TEACHER = '''
from mert_core.fitting import FittedTeacherOptions
from mert_core.hookspecs import hookimpl
from mert_core.teacher import Teacher, TargetSpec

class BuggyOptions(FittedTeacherOptions):
    pass

class Buggy(Teacher):
    name = "buggy"
    description = "a teacher whose fit has a bug"
    fittable = True
    Options = BuggyOptions
    def target_spec(self):
        return TargetSpec(kind="continuous", dim=2, frame_rate_hz=self.frame_rate_hz)
    def needs_fit(self):
        return True
    def fit(self, files, out_file, *, seed=0, device=None, progress=True):
        return {}["centroids"]  # a bug inside the plugin

@hookimpl
def register_teachers(register):
    register(Buggy)
'''


def test_a_bug_inside_a_plugin_keeps_its_traceback_and_a_user_error_is_one_line(make_dist, music_dir, tmp_path, monkeypatch):
    import mert_core.registry

    make_dist("buggy-teacher", "0.1", {"buggy": "buggy_teacher"}, {"buggy_teacher": BUGGY_TEACHER})
    monkeypatch.setattr(mert_core.registry, "_DEFAULT", None)  # load the fake distribution too
    result = run("teacher", "fit", "buggy", "--data", str(music_dir), "--out", str(tmp_path / "t.safetensors"))
    assert isinstance(result.exception, KeyError) and "centroids" in str(result.exception), result.output  # not turned into SystemExit
    assert result.exc_info[2] is not None and "Error:" not in result.output
    user = run("teacher", "fit", "buggy", "--data", str(tmp_path / "no-such-folder"), "--out", str(tmp_path / "t.safetensors"))
    assert user.exit_code == 2 and "Traceback" not in user.output, user.output
    assert len([line for line in user.output.splitlines() if line.startswith("Error:")]) == 1
