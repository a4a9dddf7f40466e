"""The one config layer: a run's dataclass is the single source of its keys, types, defaults, help and checks.

Every run (analyze, prune, mitigate, train, zoo, ...) is described by a dataclass whose fields carry
``metadata={"help": ...}`` and whose ``__post_init__`` validates values (raising
:class:`~evotool.errors.ConfigError`). This module builds such dataclasses from YAML files and
``--set a.b=value`` overrides, with one syntax and one set of errors:

>>> cfg = load_config(PruneConfig, "configs/prune.yaml", ["drop=3", "lora.r=4"])

* Unknown keys, wrong types and failed checks raise one ``ConfigError`` naming the key and the file.
* Values are coerced to the annotated type (``int``, ``float``, ``bool``, ``str``, ``Path``, ``Literal``,
  ``X | None``, ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]`` and nested dataclasses); a comma
  separated string fills a list (``--set layers=9,10``).
* Override values are read as YAML scalars (``0.5``, ``true``, ``null``, ``[1, 2]``); a number written
  as text (``1e9``, which YAML 1.1 reads as a string) fills a numeric field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from evotool.errors import ConfigError

T = TypeVar("T")


def parse_set(pairs: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values read as YAML scalars)."""
    flat: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"expected key=value, got {pair!r}")
        try:
            flat[key] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            flat[key] = text.strip()
    return nest(flat)


def nest(flat: Mapping[str, Any], skip_none: bool = False) -> dict[str, Any]:
    """``{"a.b": 1, "c": 2}`` -> ``{"a": {"b": 1}, "c": 2}``; with ``skip_none``, keys whose value is None are left out
    (command-line flags that were not given)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if skip_none and value is None:
            continue
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is set to a value and cannot also have sub-keys")
            node = child
        node[leaf] = value
    return out


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: ``update``'s values win; nested mappings are merged key by key."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file holding one mapping (empty file: ``{}``); ``ConfigError`` naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config not found: {path}")
    return _parse_yaml(path.read_text(), str(path))


def packaged_yaml(name: str) -> dict[str, Any]:
    """The mapping of a YAML file shipped in ``evotool.configs`` (e.g. ``"prune.yaml"``)."""
    return _parse_yaml(resources.files("evotool.configs").joinpath(name).read_text(), f"evotool.configs/{name}")


def _parse_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{source}: not valid YAML{where}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] | Mapping[str, Any] = (),
                default: str | None = None) -> T:
    """``cls`` from a YAML file (or the packaged ``default`` file, or the dataclass defaults) plus overrides.

    ``overrides`` are ``--set`` strings (``"a.b=1"``) or an already nested mapping. Errors name the key and
    the file they came from.
    """
    if path is not None:
        data, source = read_yaml(path), str(path)
    elif default is not None:
        data, source = packaged_yaml(default), f"evotool.configs/{default}"
    else:
        data, source = {}, cls.__name__
    extra = dict(overrides) if isinstance(overrides, Mapping) else parse_set(overrides)
    if extra:
        data = merge(data, extra)
        source = f"{source} (with --set overrides)"
    return from_dict(cls, data, source)


def from_dict(cls: type[T], data: Mapping[str, Any], source: str = "config", prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested mapping, coercing every value to its field's type."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"{source}: unknown key '{prefix}{unknown[0]}' (known keys: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(value, hints[name], source, f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err
    except TypeError as err:  # a required field without a value
        raise ConfigError(f"{source}: {prefix.rstrip('.') or cls.__name__}: {err}") from err


def _coerce(value: Any, tp: Any, source: str, key: str) -> Any:
    """``value`` as type ``tp``; ``ConfigError`` naming ``key`` when it does not fit."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, source, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, source, f"{key}.")
    if origin in (list, tuple, Sequence):
        items = _as_list(value, source, key)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise ConfigError(f"{source}: {key} needs {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, source, f"{key}[{i}]") for i, (v, a) in enumerate(zip(items, args)))
        inner = args[0] if args else Any
        coerced = [_coerce(v, inner, source, f"{key}[{i}]") for i, v in enumerate(items)]
        return tuple(coerced) if origin is tuple else coerced
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        inner = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, inner, source, f"{key}.{k}") for k, v in value.items()}
    return _scalar(value, tp, source, key)


def _as_list(value: Any, source: str, key: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        return [yaml.safe_load(part) for part in value.split(",") if part.strip()]
    if isinstance(value, (int, float)):  # one number or flag: a one-item list (``--grid dynamic=false``)
        return [value]
    raise ConfigError(f"{source}: {key} must be a list, got {value!r}")


def _scalar(value: Any, tp: Any, source: str, key: str) -> Any:
    def bad(kind: str) -> ConfigError:
        return ConfigError(f"{source}: {key} must be {kind}, got {value!r}")

    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if tp in (int, float) and isinstance(value, str):
        try:
            value = float(value) if tp is float else int(value)
        except ValueError:
            raise bad("an integer" if tp is int else "a number") from None
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad("a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad("a string")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise bad("a path")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise bad(f"of type {tp.__name__}")
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON/YAML-ready data (paths as strings, tuples as lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(obj))


def _field(cls: type, name: str) -> dataclasses.Field:
    """Field ``name`` of dataclass ``cls``; ``a.b`` reaches into nested configs."""
    head, _, rest = name.partition(".")
    field = {f.name: f for f in dataclasses.fields(cls)}.get(head)
    if field is None:
        raise KeyError(f"{cls.__name__} has no field {head!r}")
    return _field(typing.get_type_hints(cls)[head], rest) if rest else field


def field_help(cls: type, name: str) -> str:
    """The ``help`` metadata of field ``name`` of dataclass ``cls`` (``a.b`` reaches into nested configs)."""
    return str(_field(cls, name).metadata.get("help", ""))


def field_default(cls: type, name: str) -> Any:
    """The default of field ``name`` (``a.b`` reaches into nested configs); ``dataclasses.MISSING`` if required."""
    field = _field(cls, name)
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def config_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of dataclass ``cls``, nested configs expanded (for docs and config tests)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += config_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys
