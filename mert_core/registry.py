"""The registry: every teacher, augmentation, task and recipe by name.

Collection, duplicate detection and option validation happen here and only
here. Plugins hand classes to a ``register`` callback (see
:mod:`mert_core.hookspecs`); the registry records which distribution each one
came from, so that ``mert list-plugins`` and checkpoints can name versions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from mert_core import plugin_loader
from mert_core.augment import Augmentation
from mert_core.errors import PluginError  # noqa: F401 - re-exported: raised here, imported from here
from mert_core.recipes import Recipe
from mert_core.tasks import Task
from mert_core.teacher import Teacher

KINDS = ("teacher", "augment", "task", "recipe")
_HOOKS = {
    "teacher": "register_teachers",
    "augment": "register_augmentations",
    "task": "register_tasks",
    "recipe": "register_recipes",
}
_BASES = {"teacher": Teacher, "augment": Augmentation, "task": Task, "recipe": Recipe}


@dataclass
class Entry:
    kind: str
    name: str
    obj: Any
    description: str
    distribution: str
    version: str
    plugin: str  # entry-point name


@dataclass
class BrokenPlugin:
    name: str
    distribution: str
    version: str
    error: str


@dataclass
class Registry:
    entries: dict[str, dict[str, Entry]] = field(default_factory=lambda: {k: {} for k in KINDS})
    broken: list[BrokenPlugin] = field(default_factory=list)

    # -- lookup ----------------------------------------------------------------

    def get(self, kind: str, name: str) -> Entry:
        try:
            return self.entries[kind][name]
        except KeyError:
            known = ", ".join(sorted(self.entries[kind])) or "none"
            hint = ""
            broken = [b for b in self.broken if b.name == name]
            if broken:
                hint = f" (plugin {name!r} failed to import: {broken[0].error})"
            raise PluginError(
                f"unknown {kind} {name!r}{hint}; available: {known}. "
                f"Run `mert list-plugins --kind {kind}` to see them."
            ) from None

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def versions(self) -> dict[str, str]:
        """distribution -> version for every loaded plugin (saved in checkpoints)."""
        return {e.distribution: e.version for kind in KINDS for e in self.entries[kind].values()}

    def options(self, kind: str, name: str, options: dict[str, Any] | None) -> BaseModel:
        """Validate ``options`` against the plugin's ``Options`` model."""
        cls = self.get(kind, name).obj
        try:
            return cls.Options(**(options or {}))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "options"
            fields = ", ".join(cls.Options.model_fields) or "none"
            raise PluginError(
                f"{kind} {name!r}: option {where!r}: {err['msg']} (its options: {fields})"
            ) from None

    def build(self, kind: str, name: str, options: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """Instantiate a teacher/augmentation/task with validated options."""
        cls = self.get(kind, name).obj
        return cls(self.options(kind, name, options), **kwargs)

    # -- collection ------------------------------------------------------------

    def add(self, kind: str, obj: Any, distribution: str, version: str, plugin: str) -> None:
        name = getattr(obj, "name", "")
        if not name:
            raise PluginError(f"{kind} {obj!r} from {distribution} has no name")
        base = _BASES[kind]
        ok = isinstance(obj, base) if kind == "recipe" else isinstance(obj, type) and issubclass(obj, base)
        if not ok:
            raise PluginError(
                f"{distribution} registered {obj!r} as a {kind}, but it is not a {base.__module__}.{base.__name__}"
            )
        old = self.entries[kind].get(name)
        if old is not None and old.obj is not obj:
            raise PluginError(
                f"two plugins register the {kind} {name!r}: {old.distribution} {old.version} "
                f"(entry point {old.plugin!r}) and {distribution} {version} (entry point {plugin!r}); "
                f"uninstall one, or pick plugins with MERT_PLUGINS=name,name"
            )
        desc = (getattr(obj, "description", "") or (obj.__doc__ or "")).strip().splitlines()
        self.entries[kind][name] = Entry(kind, name, obj, desc[0] if desc else "", distribution, version, plugin)


def load_registry(extra_plugins: list[object] = (), entry_points: bool = True) -> Registry:
    """Load every installed plugin (and ``extra_plugins``, e.g. from tests).

    Args:
        extra_plugins: modules or objects with ``@hookimpl`` functions,
            registered as if installed by the distribution ``"<local>"``.
        entry_points: load the ``mert`` entry-point group.
    """
    pm = plugin_loader.new_manager()
    loaded = plugin_loader.load_entry_points(pm) if entry_points else []
    for i, extra in enumerate(extra_plugins):
        name = getattr(extra, "__name__", f"extra{i}")
        pm.register(extra, name=f"<local>:{name}")
        loaded.append(plugin_loader.LoadedPlugin(name, extra, "<local>", "0"))
    registry = Registry()
    for lp in loaded:
        if lp.error is not None:
            registry.broken.append(BrokenPlugin(lp.name, lp.distribution, lp.version, lp.error))
            continue
        others = [p for p in pm.get_plugins() if p is not lp.plugin]
        for kind, hook in _HOOKS.items():
            # Call one plugin at a time so each registration is traced to its distribution.
            caller = pm.subset_hook_caller(hook, remove_plugins=others)
            try:
                caller(register=lambda obj, _k=kind, _lp=lp: registry.add(_k, obj, _lp.distribution, _lp.version, _lp.name))
            except PluginError:
                raise
            except Exception as exc:  # noqa: BLE001 - a hook that crashes marks its plugin broken
                registry.broken.append(BrokenPlugin(lp.name, lp.distribution, lp.version, f"{hook} failed: {exc}"))
    return registry


_DEFAULT: Registry | None = None


def default_registry() -> Registry:
    """The registry of installed plugins, loaded once per process."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = load_registry()
    return _DEFAULT
