"""Small file helpers shared by every writer and reader: atomic writes, versioned JSON, JSONL reading.

Every JSON artifact (stages.json, results.json, prune.json, method.json, tuning.json, summary.json,
compare.json, run.json ...) is written by :func:`write_json`: a ``schema_version`` first, then the
payload, replaced atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from evotool.errors import EvotoolError, InputError


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` so that readers see the old file or the whole new one, never a part."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: Mapping[str, Any], schema: str) -> Path:
    """Atomically write ``{"schema_version": schema, **payload}`` as indented JSON; returns ``path``.

    NumPy scalars / arrays, paths and dataclasses are stored as plain numbers, lists, strings and objects.
    """
    body = {"schema_version": schema, **{k: v for k, v in payload.items() if k != "schema_version"}}
    atomic_write_text(Path(path), json.dumps(body, indent=2, default=_plain) + "\n")
    return Path(path)


def _plain(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` (readers see the old or the whole new
    folder), on failure it is removed and ``path`` is left untouched."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        tmp.chmod(0o755)
        if path.exists():
            old = path.parent / f".{path.name}.{os.getpid()}.old"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; :class:`InputError` naming the line if it is not JSON."""
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err


def read_json(path: Path, error: type[EvotoolError] = InputError, what: str = "file", schema: str | None = None) -> Any:
    """A JSON file's content; ``error`` naming the file (as ``what``) if it is missing or malformed.

    With ``schema`` (e.g. ``"1.0"``) the content must be an object whose ``schema_version`` has the same
    major version.
    """
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON ({err.msg})") from err
    if schema is not None:
        if not isinstance(payload, dict):
            raise error(f"{path}: not a {what} (expected a JSON object)")
        version = payload.get("schema_version")
        if str(version).split(".")[0] != schema.split(".")[0]:
            raise error(f"{path}: {what} schema version {version!r}, this evotool reads {schema!r}")
    return payload
