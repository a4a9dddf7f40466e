"""The decoding methods, one module each: the module name is the method name, and the module's ``METHOD``
is its :class:`~evotool.mitigate.base.Method` subclass, with its config dataclass beside it.

Adding a method is adding one file here. :func:`method_names` lists the modules without importing them
(no torch), so configs and the CLI can name every method at startup.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from evotool.config import from_dict
from evotool.errors import ConfigError, StageFileError

if TYPE_CHECKING:
    from torch import nn

    from evotool.mitigate.base import Method
    from evotool.stages import StageFile


BASELINE = "greedy"  # the method every other one is compared with (latency ratio, recall loss)


def method_names() -> tuple[str, ...]:
    """Every registered method name, sorted."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))


def method_class(name: str) -> type[Method]:
    """The method class registered as ``name``; ConfigError listing the methods otherwise."""
    if name not in method_names():
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(method_names())}")
    return importlib.import_module(f"{__name__}.{name}").METHOD


def make_config(name: str, options: Mapping[str, Any] | None = None) -> Any:
    """The config of method ``name`` with ``options`` applied (values coerced to the fields' types)."""
    return from_dict(method_class(name).config_cls, options or {}, f"method {name!r} options")


def build_method(name: str, model: nn.Module, options: Mapping[str, Any] | None = None,
                 stages: StageFile | None = None) -> Method:
    """Method ``name`` bound to ``model``; ``stages`` is the model's validated stage file (:meth:`StageFile.for_model`).
    A stage-aware method resolves its layers here, so a stage file it cannot use (e.g. no layer after the critical
    one) is a :class:`StageFileError` before anything is generated."""
    method = method_class(name)(model, make_config(name, options), stages)
    if method.needs_stages:
        method.layers_used()
    return method


def applicable(name: str, model: nn.Module, option_sets: Sequence[Mapping[str, Any]],
               stages: StageFile | None = None) -> tuple[dict[int, Method], list[str]]:
    """Method ``name`` built (:func:`build_method`) with each of ``option_sets`` that applies to this model and stage
    file, by position in ``option_sets``, and one reason per set that does not (e.g. ``premature=last_stable`` where
    the stabilization stage ends at the output)."""
    built: dict[int, Method] = {}
    reasons: list[str] = []
    for i, options in enumerate(option_sets):
        try:
            built[i] = build_method(name, model, options, stages)
        except (ConfigError, StageFileError) as err:
            reasons.append(f"{dict(options)}: {err}")
    return built, reasons


def default_grid(name: str) -> dict[str, list[Any]]:
    """The validation grid (option -> values) a method is tuned over by default; empty for untuned methods."""
    return dict(getattr(method_class(name).config_cls, "TUNE_GRID", {}))
