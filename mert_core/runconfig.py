"""Assembling a :class:`TrainConfig` from a recipe, a config file, flags and
``key=value`` overrides: the one code path shared by the CLI and the Python API.

Precedence, lowest first: defaults < recipe < config file < flags < ``--set``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import ValidationError

from mert_core.config import TrainConfig, format_validation_error
from mert_core.errors import ConfigError  # noqa: F401 - re-exported: raised here, imported from here
from mert_core.registry import Registry, default_registry
from mert_core.shards import is_remote_or_pattern, is_shard_source


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it ({exc.strerror})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of config fields at the top, got {type(data).__name__}")
    return data


def parse_value(text: str) -> Any:
    """A ``--set`` value as a YAML scalar/list: ``3`` -> 3, ``[0,7]`` -> [0, 7], ``off`` stays a string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 turns on/off/yes/no into booleans; accept only true/false as booleans
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        return text
    return value


def parse_assignment(item: str, flag: str = "--set", example: str = "optim.lr=1e-4") -> tuple[str, Any]:
    """``"optim.lr=1e-4"`` -> ``("optim.lr", 1e-4)``: the one ``KEY=VALUE`` parser
    of every command (values as in :func:`parse_value`).

    Raises:
        ConfigError: no ``=`` or no key; the message names ``flag`` and shows ``example``.
    """
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{flag} {item!r}: not a key=value pair; expected KEY=VALUE, e.g. {example}")
    return key.strip(), parse_value(raw)


def apply_overrides(data: dict[str, Any], assignments: Iterable[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides to plain config data.

    Keys are dotted paths (``optim.lr=1e-4``, ``teachers.0.weight=0.5``). Two
    shorthands address plugins by name: ``teacher.NAME.OPTION=value`` and
    ``augment.NAME.OPTION=value`` (the plugin must be in the config);
    ``teacher.NAME.weight`` and ``teacher.NAME.label_store`` set the run's
    loss weight and offline label store for that teacher.
    """
    data = copy.deepcopy(data)
    for item in assignments:
        key, value = parse_assignment(item)
        parts = key.split(".")
        if parts[0] in ("teacher", "augment") and len(parts) == 3:
            section = "teachers" if parts[0] == "teacher" else "augment"
            entries = data.setdefault(section, [])
            match = [e for e in entries if e.get("name") == parts[1]]
            if not match:
                have = ", ".join(e.get("name", "?") for e in entries) or "none"
                raise ConfigError(f"--set {key}: no {parts[0]} {parts[1]!r} in this run (have: {have}); add it with --{parts[0]} {parts[1]}")
            if parts[0] == "teacher" and parts[2] in ("weight", "label_store"):
                match[0][parts[2]] = value  # fields of the run's TeacherConfig, not teacher options
            else:
                match[0].setdefault("options", {})[parts[2]] = value
            continue
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = parts[i + 1]
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} has {len(node)} entries, no index {part!r}")
                node = node[int(part)]
            else:
                node = node.setdefault(part, [] if nxt.isdigit() else {})
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"--set {key}: no index {last!r} in a list of {len(node)}")
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"--set {key}: {'.'.join(parts[:-1])} is a value, not a section")
    return data


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "options":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def make_train_config(
    *,
    recipe: str | None = None,
    preset: str | None = None,
    config_file: str | Path | None = None,
    teachers: Iterable[str] = (),
    augment: Iterable[str] = (),
    data: Iterable[str | Path] = (),
    out_dir: str | Path | None = None,
    max_steps: int | None = None,
    init_from: str | Path | None = None,
    overrides: Iterable[str] = (),
    registry: Registry | None = None,
) -> TrainConfig:
    """Build and validate a run's config; check every plugin name and option.

    ``teachers``/``augment`` given here replace the recipe's or the file's
    lists (options of a plugin that stays in the list are kept).
    """
    registry = registry or default_registry()
    file_data = load_config_file(config_file) if config_file else {}
    preset = preset or file_data.get("model", {}).get("preset")
    recipe = recipe or file_data.get("recipe")
    merged: dict[str, Any] = {}
    if recipe:
        entry = registry.get("recipe", recipe)
        merged = copy.deepcopy(entry.obj.config(preset or entry.obj.default_preset))
        merged["recipe"] = recipe
    merged = _deep_merge(merged, file_data)
    if preset:
        merged.setdefault("model", {})["preset"] = preset
    if teachers:
        old = {t.get("name"): t for t in merged.get("teachers", [])}
        merged["teachers"] = [old.get(name, {"name": name}) for name in teachers]
    if augment:
        old = {a.get("name"): a for a in merged.get("augment", [])}
        merged["augment"] = [old.get(name, {"name": name}) for name in augment]
    if data:
        merged.setdefault("data", {})["paths"] = [str(p) for p in data]
    if out_dir is not None:
        merged["out_dir"] = str(out_dir)
    if max_steps is not None:
        merged.setdefault("optim", {})["max_steps"] = max_steps
    if init_from is not None:
        merged.setdefault("model", {})["init_from"] = str(init_from)
    merged = apply_overrides(merged, overrides)
    try:
        config = TrainConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    for t in config.teachers:
        registry.options("teacher", t.name, t.options)
    for a in config.augment:
        registry.options("augment", a.name, a.options)
    for p in config.data.paths:
        if not is_remote_or_pattern(p) and not Path(p).exists():
            raise ConfigError(f"config field 'data.paths': {p} does not exist; give audio folders, .tsv/.csv manifests or shards")
    if len({is_shard_source(p) for p in config.data.paths}) > 1:
        raise ConfigError(f"config field 'data.paths': {', '.join(config.data.paths)} mixes shards with folders or manifests; "
                          f"train on one kind (pack the folders with `mert data pack`)")
    if config.model.init_from is not None and not config.model.init_from.exists():
        raise ConfigError(f"config field 'model.init_from': {config.model.init_from} does not exist; give a Hugging Face "
                          f"HuBERT/MERT folder, a mert run folder, a .pt or a student.safetensors")
    return config


def with_data_paths(config: TrainConfig) -> TrainConfig:
    """``config`` with its data paths resolved: no paths means the built-in demo
    pieces (generated once into the cache), written into the config so that the
    saved config records the audio the run really read. For a run about to read
    its data; reading a saved config uses :func:`with_named_data_paths`."""
    if not config.data.paths:
        from mert_core.demo import ensure_demo_data

        ensure_demo_data()
    return with_named_data_paths(config)


def with_named_data_paths(config: TrainConfig) -> TrainConfig:
    """``config`` with no data paths naming the built-in demo pieces, as :func:`with_data_paths`
    does, without generating them: reading a checkpoint never writes data."""
    if config.data.paths:
        return config
    from mert_core.demo import demo_root

    # the demo's single notes (1.5 s) are for downstream tasks, not pretraining
    config.data.paths = [demo_root() / "pieces"]
    return config
