"""`mert new-plugin` writes packages that install with pip and pass their own
tests: each loads its plugin through the `mert` entry point and runs it."""

import importlib
import os
import subprocess
import sys
import sysconfig
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from mert_cli.main import cli
from mert_core.scaffold import KINDS, plugin_names


def run(*args):
    return CliRunner().invoke(cli, list(args))


@pytest.mark.parametrize("kind", KINDS)
def test_writes_a_package_whose_options_are_all_described(kind, tmp_path, monkeypatch):
    out = tmp_path / "pkg"
    result = run("new-plugin", kind, "band-energy2", "--out", str(out))
    assert result.exit_code == 0, result.output
    names = plugin_names(kind, "band-energy2")
    pyproject = (out / "pyproject.toml").read_text()
    assert f'name = "{names.distribution}"' in pyproject and '"mert-toolkit>=' in pyproject
    assert f'band-energy2 = "{names.package}"' in pyproject
    monkeypatch.syspath_prepend(str(out))
    module = importlib.import_module(names.package)
    try:
        plugin = next(obj for obj in vars(module).values() if getattr(obj, "name", None) == "band-energy2")
        assert plugin.Options.model_fields
        for field_name, field in plugin.Options.model_fields.items():
            assert field.description, f"{kind} option {field_name!r} has no description"
    finally:
        sys.modules.pop(names.package, None)


@pytest.mark.parametrize(
    "args, says",
    [
        (["teacher", "Loud_ness"], "Loud_ness"),
        (["teacher", "cqt"], "already registered by mert-toolkit"),
        (["augment", "inbatch-mixup"], "already registered"),
        (["recipe", "mine"], "recipe"),
    ],
)
def test_bad_names_are_one_line_errors_exit_2(args, says):
    result = run("new-plugin", *args, "--out", "never-written")
    assert result.exit_code == 2 and says in result.output, result.output
    assert not os.path.exists("never-written")


def test_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = run("new-plugin", "teacher", "loudness2", "--out", str(tmp_path))
    assert result.exit_code == 2 and str(tmp_path) in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def _fresh_venv(path):
    """A virtual environment that installs into its own site-packages but sees
    this interpreter's packages (torch, the project as installed here)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(path)], check=True)
    python = path / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # addsitedir, not a plain path line, so that the .pth files there run too (an editable install of mert)
    Path(site, "parent-env.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    return python


@pytest.mark.slow
def test_generated_packages_install_with_pip_and_pass_their_own_tests(tmp_path):
    packages = {kind: tmp_path / kind for kind in KINDS}
    for kind, name in (("teacher", "loudness2"), ("augment", "gain2"), ("task", "folder-class")):
        result = run("new-plugin", kind, name, "--out", str(packages[kind]))
        assert result.exit_code == 0, result.output
    python = _fresh_venv(tmp_path / "venv")
    for folder in packages.values():
        # --no-deps: mert and torch are already there; --no-build-isolation --no-index: no network needed
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", "-e", str(folder)],
                       check=True, cwd=tmp_path, capture_output=True)
    report = tmp_path / "report.xml"
    result = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *map(str, packages.values())],
                            cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    cases = ET.parse(report).getroot().iter("testcase")
    ran = {kind: 0 for kind in KINDS}
    for case in cases:
        assert case.find("skipped") is None, case.get("name")
        ran[next(k for k in KINDS if f"_{k}" in case.get("classname"))] += 1
    assert all(n >= 3 for n in ran.values()), ran
