"""A new plugin package from a template (``mert new-plugin``).

The package is ready to install and test: a ``pyproject.toml`` with the
``mert`` entry point and a dependency on this distribution, a module that
implements the contract (every option described), and tests that load it
through the entry point and run it::

    from mert_core.scaffold import new_plugin
    folder = new_plugin("teacher", "loudness2")   # ./mert-loudness2-teacher
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

from mert_core import DISTRIBUTION, __version__
from mert_core.errors import ScaffoldError  # noqa: F401 - re-exported: raised here, imported from here
from mert_core.registry import Registry, default_registry

KINDS = ("teacher", "augment", "task")
_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
_CONTRACTS = {"teacher": "mert_core/teacher.py", "augment": "mert_core/augment.py", "task": "mert_core/tasks.py"}
_USAGE = {
    "teacher": "mert train --teacher {name} --teacher cqt --preset tiny --max-steps 20",
    "augment": "mert train --teacher cqt --augment {name} --preset tiny --max-steps 20",
    "task": "mert eval --baseline handcrafted --task {name} --task-set {name}.data_dir=/path/to/data",
}


@dataclass(frozen=True)
class PluginNames:
    """Every name a new plugin package uses, derived from its kind and name.

    Attributes:
        kind: ``"teacher"``, ``"augment"`` or ``"task"``.
        name: what users type (``--teacher loudness2``) and the entry point's name.
        distribution: the package's name for pip (``mert-loudness2-teacher``).
        package: its import name (``mert_loudness2_teacher``).
        classname: the prefix of its classes (``Loudness2``).
    """

    kind: str
    name: str
    distribution: str
    package: str
    classname: str


def plugin_names(kind: str, name: str) -> PluginNames:
    """Check ``kind`` and ``name`` and derive the package's names from them.

    Raises:
        ScaffoldError: unknown kind, or a name that is not lowercase words
            joined by hyphens.
    """
    if kind not in KINDS:
        raise ScaffoldError(f"plugin kind {kind!r}: expected one of {', '.join(KINDS)}")
    if not _NAME.fullmatch(name):
        raise ScaffoldError(f"plugin name {name!r}: use lowercase letters and digits, words joined by single hyphens, "
                            f"starting with a letter (e.g. loudness2 or band-energy)")
    words = name.split("-")
    return PluginNames(kind, name, f"mert-{name}-{kind}", f"mert_{'_'.join(words)}_{kind}", "".join(w.capitalize() for w in words))


def new_plugin(kind: str, name: str, out_dir: str | Path | None = None, registry: Registry | None = None) -> Path:
    """Write a ready-to-install plugin package.

    Args:
        kind: ``"teacher"``, ``"augment"`` or ``"task"``.
        name: the plugin's name, e.g. ``"loudness2"``.
        out_dir: the package's folder (created; must not exist or be empty).
            Default: ``./mert-<name>-<kind>``.
        registry: installed plugins, to refuse a name already taken
            (default: every installed plugin).

    Returns:
        The package's folder. ``pip install -e FOLDER && pytest FOLDER`` passes.

    Raises:
        ScaffoldError: bad kind or name, a name already registered, or an
            output folder that is not empty.
    """
    names = plugin_names(kind, name)
    taken = (registry or default_registry()).entries[kind].get(name)
    if taken is not None:
        raise ScaffoldError(f"{kind} {name!r} is already registered by {taken.distribution} {taken.version}; choose another name")
    out = Path(out_dir) if out_dir is not None else Path.cwd() / names.distribution
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ScaffoldError(f"--out {out}: exists and is not an empty folder; choose a new folder")
    values = {
        **vars(names),
        "mert_distribution": DISTRIBUTION,
        "mert_version": __version__,
        "contract": _CONTRACTS[kind],
        "usage": "```bash\n" + _USAGE[kind].format(name=name) + "\n```",
    }
    templates = resources.files("mert_core") / "scaffold_templates"
    files = {
        "pyproject.toml": templates / "pyproject.toml.tmpl",
        "README.md": templates / "README.md.tmpl",
        f"{names.package}/__init__.py": templates / kind / "module.py.tmpl",
        f"tests/test_{names.package}.py": templates / kind / "test.py.tmpl",
    }
    for relative, template in files.items():
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(Template(template.read_text()).substitute(values))
    return out
