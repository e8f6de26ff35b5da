"""Loading plugins: the pluggy manager, entry points, allowlist and tracing.

Environment variables:
    MERT_PLUGINS: comma-separated entry-point names to load (allowlist); unset
        loads all. ``MERT_PLUGINS=""`` loads none.
    MERT_TRACE_HOOKS: when set, every hook call is printed to stderr.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass
from importlib import metadata

import pluggy

from mert_core import hookspecs

ENTRY_POINT_GROUP = "mert"


@dataclass
class LoadedPlugin:
    """One plugin module as loaded from an entry point (or given directly)."""

    name: str
    plugin: object | None
    distribution: str
    version: str
    error: str | None = None  # one line: why it could not be imported


def new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if os.environ.get("MERT_TRACE_HOOKS"):
        pm.trace.root.setwriter(lambda msg: print(msg, end="", file=sys.stderr))
        pm.enable_tracing()
    return pm


def _allowlist() -> set[str] | None:
    raw = os.environ.get("MERT_PLUGINS")
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def load_entry_points(pm: pluggy.PluginManager) -> list[LoadedPlugin]:
    """Import every ``mert`` entry point and register it with ``pm``.

    A plugin that fails to import is returned with its error and is not
    registered; it never stops the others from loading.
    """
    allow = _allowlist()
    loaded = []
    seen = set()
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if allow is not None and ep.name not in allow:
            continue
        dist = ep.dist.name if ep.dist is not None else "?"
        version = ep.dist.version if ep.dist is not None else "?"
        key = (ep.name, ep.value)
        if key in seen:  # the same distribution visible twice on sys.path
            continue
        seen.add(key)
        try:
            module = ep.load()
        except Exception as exc:  # noqa: BLE001 - any import failure marks the plugin broken
            last = traceback.format_exception_only(type(exc), exc)[-1].strip()
            loaded.append(LoadedPlugin(ep.name, None, dist, version, error=last))
            continue
        plugin_name = f"{dist}:{ep.name}"
        if pm.is_registered(module):
            continue
        try:
            pm.register(module, name=plugin_name)
            # a hook implementation that matches no spec is a typo (register_teacher)
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            if pm.is_registered(module):
                pm.unregister(module)
            loaded.append(LoadedPlugin(ep.name, None, dist, version, error=str(exc).splitlines()[0]))
            continue
        loaded.append(LoadedPlugin(ep.name, module, dist, version))
    return loaded
