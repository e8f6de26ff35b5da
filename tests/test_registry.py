"""Plugin discovery through real entry points: built-ins, third parties,
broken plugins, duplicate names, the allowlist and `mert list-plugins`."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import mert_core
from mert_cli.main import cli
from mert_core import hookspecs
from mert_core.registry import PluginError, load_registry

TEACHER_MODULE = '''
from mert_core.hookspecs import hookimpl
from mert_core.teacher import Teacher, TargetSpec

class {cls}(Teacher):
    name = "{name}"
    description = "a test teacher"
    def target_spec(self):
        return TargetSpec(kind="continuous", dim=2, frame_rate_hz=self.frame_rate_hz)

@hookimpl
def register_teachers(register):
    register({cls})
'''


def test_builtin_plugins_load_through_entry_points():
    registry = load_registry()
    assert not registry.broken, registry.broken
    assert "cqt" in registry.names("teacher")
    entry = registry.get("teacher", "cqt")
    assert entry.distribution == "mert-toolkit" and entry.description


def test_third_party_plugin_is_found_with_its_distribution(make_dist):
    make_dist("acme-teachers", "1.2.3", {"acme": "acme_teacher"}, {"acme_teacher": TEACHER_MODULE.format(cls="Acme", name="acme")})
    entry = load_registry().get("teacher", "acme")
    assert (entry.distribution, entry.version) == ("acme-teachers", "1.2.3")


def test_broken_plugin_is_listed_and_does_not_stop_others(make_dist):
    make_dist("broken-dist", "0.1", {"broken": "broken_mod"}, {"broken_mod": "raise ImportError('needs libfoo')\n"})
    registry = load_registry()
    assert [b.name for b in registry.broken] == ["broken"]
    assert "needs libfoo" in registry.broken[0].error
    assert "cqt" in registry.names("teacher")
    result = CliRunner().invoke(cli, ["list-plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert {"name": "broken", "status": "broken"}.items() <= next(r for r in rows if r["name"] == "broken").items()
    with pytest.raises(PluginError, match="failed to import: ImportError: needs libfoo"):
        registry.get("teacher", "broken")


def test_duplicate_names_name_both_distributions(make_dist):
    make_dist("first-dist", "1.0", {"one": "dup_one"}, {"dup_one": TEACHER_MODULE.format(cls="One", name="same")})
    make_dist("second-dist", "2.0", {"two": "dup_two"}, {"dup_two": TEACHER_MODULE.format(cls="Two", name="same")})
    with pytest.raises(PluginError) as info:
        load_registry()
    assert "first-dist" in str(info.value) and "second-dist" in str(info.value) and "'same'" in str(info.value)
    result = CliRunner().invoke(cli, ["list-plugins"])
    assert result.exit_code == 2 and "first-dist" in result.output and "Traceback" not in result.output


def test_allowlist_limits_loaded_plugins(monkeypatch):
    monkeypatch.setenv("MERT_PLUGINS", "cqt")
    registry = load_registry()
    assert registry.names("teacher") == ["cqt"]
    assert registry.names("recipe") == []


def test_misspelled_hook_is_caught(make_dist):
    make_dist("typo-dist", "1.0", {"typo": "typo_mod"}, {"typo_mod": "from mert_core.hookspecs import hookimpl\n@hookimpl\ndef register_teacher(register):\n    pass\n"})
    registry = load_registry()
    assert [b.name for b in registry.broken] == ["typo"]
    assert "register_teacher" in registry.broken[0].error


def test_options_are_validated_with_the_field_named():
    registry = load_registry()
    with pytest.raises(PluginError, match="'no_such_option'"):
        registry.options("teacher", "cqt", {"no_such_option": 1})


def test_unknown_name_lists_what_exists():
    with pytest.raises(PluginError, match="available: .*cqt"):
        load_registry().get("teacher", "cqtt")


def test_every_hook_is_documented():
    specs = [name for name in dir(hookspecs) if name.startswith("register_")]
    assert len(specs) == 4
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name in specs:
        doc = getattr(hookspecs, name).__doc__
        assert doc and "register(" in doc, name
        assert f"`{name}`" in readme, f"{name} is not documented in the README"


def test_list_plugins_table_shows_kind_distribution_and_version():
    result = CliRunner().invoke(cli, ["list-plugins", "--kind", "teacher"])
    assert result.exit_code == 0, result.output
    assert "cqt" in result.output and f"[mert-toolkit {mert_core.__version__}]" in result.output
