"""Checks every command runs on its inputs before any expensive work (model loading, generation, training).

Each check raises a :class:`~evotool.errors.ConfigError` / :class:`~evotool.errors.ModelError` /
:class:`~evotool.errors.InputError` whose message names the offending flag, path or key, so that a bad
``--out`` or ``--device`` costs a second, not an evaluation.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from evotool.errors import ConfigError, InputError, ModelError


def _existing_ancestor(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path("/")


def output_dir(path: str | Path, flag: str = "--out", source: str | Path | None = None) -> Path:
    """``path`` as a Path, refused if it is a file, lies below a file, cannot be written, or (with ``source``,
    a model folder) equals, contains or lies inside ``source``."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out} is a file, not a directory")
    base = _existing_ancestor(out.absolute())
    if not base.is_dir():
        raise ConfigError(f"{flag} {out}: {base} is a file, not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {out}: {base} is not writable")
    if source is not None and Path(source).expanduser().is_dir():
        src, dst = Path(source).expanduser().resolve(), out.resolve()
        if dst == src or src in dst.parents or dst in src.parents:
            raise ConfigError(f"{flag} {out} overlaps the source model {source}; write to another folder")
    return out


def output_file(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as a Path for a file to be written: not a directory, its folder writable (or creatable)."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise ConfigError(f"{flag} {out} is a directory; give a file name")
    output_dir(out.parent, flag)
    return out


def device(name: str | None) -> None:
    """ModelError unless ``name`` (None = automatic) is a device torch knows and this machine has."""
    if name is None:
        return
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise ModelError(f"--device {name!r} is not a device (cpu, cuda, cuda:1 ...)") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"--device {name}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ModelError(f"--device {name}: unsupported device type {dev.type!r}")


def at_least(minimum: int, **values: int | None) -> None:
    """ConfigError naming the flag (``batch_size`` -> ``--batch-size``) of the first given value below ``minimum``."""
    for name, value in values.items():
        if value is not None and value < minimum:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def unique_ids(ids: Iterable[str], source: object) -> None:
    """InputError naming the first id that occurs twice in ``source`` (results are keyed by sample id)."""
    seen: set[str] = set()
    for sample_id in ids:
        if sample_id in seen:
            raise InputError(f"{source}: sample id {sample_id!r} occurs more than once (ids must be unique)")
        seen.add(sample_id)
