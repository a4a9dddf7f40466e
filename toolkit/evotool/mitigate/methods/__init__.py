"""The decoding methods, one module each: the module name is the method name, and the module's ``METHOD``
is its :class:`~evotool.mitigate.base.Method` subclass, with its config dataclass beside it.

Adding a method is adding one file here. :func:`method_names` lists the modules without importing them
(no torch), so configs and the CLI can name every method at startup.
"""

from __future__ import annotations

import importlib
import itertools
import pkgutil
import sys
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


def build_method(name: str, model: nn.Module | None, options: Mapping[str, Any] | None = None,
                 stages: StageFile | None = None) -> Method:
    """Method ``name`` bound to ``model``; ``stages`` is the model's validated stage file (:meth:`StageFile.for_model`).
    A stage-aware method resolves its layers here, so a stage file it cannot use (e.g. no layer after the critical
    one) is a :class:`StageFileError` before anything is generated; with ``model`` None that check is all it does."""
    method = method_class(name)(model, make_config(name, options), stages)
    if method.needs_stages:
        method.layers_used()
    return method


def grid(options: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of option values: ``{"a": [1, 2]}`` -> ``[{"a": 1}, {"a": 2}]``."""
    keys = list(options)
    return [dict(zip(keys, values)) for values in itertools.product(*(options[k] for k in keys))]


def candidates(name: str, model: nn.Module, stages: StageFile | None, option_grid: Mapping[str, Sequence[Any]],
               shifts: Sequence[int] = (0,), fixed: Mapping[str, Any] | None = None
               ) -> list[tuple[dict[str, Any], Method]]:
    """The tuning candidates of method ``name``, built (:func:`build_method`): each set of ``grid(option_grid)`` over
    the ``fixed`` options, with the layers it derives from the stage file as given and moved by each of ``shifts``
    (:meth:`Method.shifted`; moves out of range, or of a layer ``fixed`` sets, are left out). A set that does not apply
    to the stage file (e.g. ``premature=last_stable`` where the stabilization stage ends at the output; its moves may)
    is left out with one stderr line; none left is a StageFileError with the first reason. A set that decodes as an
    earlier one (:meth:`Method.decodes_as`, e.g. two stage layers moved onto the same layer) is left out silently.
    Pairs (tuned options without ``fixed``, method)."""
    fixed = dict(fixed or {})
    sets: list[dict[str, Any]] = []
    for opts in grid(option_grid):
        method = method_class(name)(model, make_config(name, {**fixed, **opts}), stages)  # unbuilt: its moves may apply
        for shift in shifts:
            extra = method.shifted(shift) if shift else {}
            if extra is not None and not extra.keys() & fixed.keys():
                sets.append({**opts, **extra})
    out: dict[str, tuple[dict[str, Any], Method]] = {}
    reasons: list[str] = []
    for opts in sets:
        try:
            method = build_method(name, model, {**fixed, **opts}, stages)
        except (ConfigError, StageFileError) as err:
            reasons.append(f"{opts}: {err}")
            continue
        out.setdefault(method.decodes_as(), (opts, method))
    if not out:
        why = reasons[0] if reasons else "every move of its stage layers leaves the model"
        raise StageFileError(f"no tuning candidate of {name} applies: {why}")
    for reason in reasons:
        print(f"skipped {name} candidate {reason}", file=sys.stderr)
    return list(out.values())


def default_grid(name: str) -> dict[str, list[Any]]:
    """The validation grid (option -> values) a method is tuned over by default; empty for untuned methods."""
    return dict(getattr(method_class(name).config_cls, "TUNE_GRID", {}))
