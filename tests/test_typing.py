"""Plugin authors get completion and type checking: the packages ship
``py.typed`` and the public API and plugin contracts are fully annotated,
with annotations that resolve."""

import inspect
import typing
from pathlib import Path

import pytest

import mert_cli
import mert_core
import mert_plugins
from mert_core import api, augment, hookspecs, recipes, tasks, teacher
from mert_core.evaluation import api as eval_api


@pytest.mark.parametrize("package", [mert_core, mert_plugins, mert_cli])
def test_packages_ship_py_typed(package):
    assert (Path(package.__file__).parent / "py.typed").is_file()


def _public_functions():
    exported = [(name, getattr(api, name)) for name in api.__all__]  # api re-exports from the core
    exported += [(name, obj) for name, obj in vars(eval_api).items() if getattr(obj, "__module__", "") == eval_api.__name__]
    for name, obj in exported:
        if inspect.isfunction(obj) and not name.startswith("_"):
            yield f"{obj.__module__}.{name}", obj
    for name in ("register_teachers", "register_augmentations", "register_tasks", "register_recipes"):
        yield f"hookspecs.{name}", getattr(hookspecs, name)
    for cls in (teacher.Teacher, teacher.TargetSpec, augment.Augmentation, tasks.Task, tasks.Example, recipes.Recipe):
        for name, obj in vars(cls).items():
            if name in getattr(cls, "__dataclass_fields__", {}):  # a field's default value, not a method
                continue
            obj = inspect.unwrap(obj.fget if isinstance(obj, property) else obj)  # through @torch.no_grad()
            if inspect.isfunction(obj) and (not name.startswith("_") or name in ("__init__", "__post_init__")):
                yield f"{cls.__module__}.{cls.__name__}.{name}", obj


# hookspecs names the contract classes only for type checkers (no torch import at runtime)
_CONTRACTS = {"Teacher": teacher.Teacher, "Augmentation": augment.Augmentation, "Task": tasks.Task, "Recipe": recipes.Recipe}


@pytest.mark.parametrize("qualname, fn", list(_public_functions()), ids=lambda v: v if isinstance(v, str) else "")
def test_public_api_and_contracts_are_annotated(qualname, fn):
    params = [p for p in inspect.signature(fn).parameters.values() if p.name not in ("self", "cls")]
    missing = [p.name for p in params if p.annotation is inspect.Parameter.empty]
    assert not missing, f"{qualname}: parameters without a type: {missing}"
    assert inspect.signature(fn).return_annotation is not inspect.Signature.empty, f"{qualname}: no return type"
    typing.get_type_hints(fn, globalns={**fn.__globals__, **_CONTRACTS})  # every annotation resolves
