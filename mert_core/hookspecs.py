"""Hook specifications: the whole plugin surface of mert.

Every hook has the form ``register_<things>(register)``: mert hands the plugin a
callback and the plugin calls ``register(Thing)`` once per thing it provides.
Collection, naming, duplicate detection and option validation happen in one
place, :mod:`mert_core.registry`. None of these hooks is ``firstresult``: every
plugin's implementation is called.

A plugin is a module (or object) holding functions decorated with
:data:`hookimpl`, exposed through the ``mert`` entry-point group::

    [project.entry-points.mert]
    my-teacher = "my_package.teacher"
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:  # the contracts import torch; hookspecs stays importable without it
    from mert_core.augment import Augmentation
    from mert_core.recipes import Recipe
    from mert_core.tasks import Task
    from mert_core.teacher import Teacher

PROJECT = "mert"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- phase 1: what a run can be made of (called once, when plugins load) -------

@hookspec
def register_teachers(register: Callable[[type[Teacher]], None]) -> None:
    """Register teacher classes that make training targets: ``register(TeacherSubclass)``."""


@hookspec
def register_augmentations(register: Callable[[type[Augmentation]], None]) -> None:
    """Register augmentations, applied after the targets are made: ``register(AugmentationSubclass)``."""


@hookspec
def register_tasks(register: Callable[[type[Task]], None]) -> None:
    """Register downstream tasks for extract/probe/eval: ``register(TaskSubclass)``."""


@hookspec
def register_recipes(register: Callable[[Recipe], None]) -> None:
    """Register named bundles of teachers, augmentations and hyperparameters: ``register(Recipe(...))``."""
