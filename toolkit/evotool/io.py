"""Small file helpers shared by every writer and reader: atomic writes, versioned JSON, JSONL reading.

Every JSON artifact (stages.json, results.json, prune.json, method.json, tuning.json, summary.json,
compare.json, run.json ...) is written by :func:`write_json`: a ``schema_version`` first, then the
payload, replaced atomically.
"""

from __future__ import annotations

import dataclasses
import fcntl
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


def file_mode(directory: bool = False) -> int:
    """The mode a plain ``open()`` (``mkdir``) gives new files (folders): 0644 (0755) under the usual umask 022;
    every artifact gets it, also those made by ``mkstemp`` / ``mkdtemp`` (0600 / 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, file_mode())  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_jsonl(path: Path, records: Iterator[Mapping[str, Any]] | list[Mapping[str, Any]]) -> None:
    """Atomically write one JSON object per line."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


class DirLock:
    """An exclusive lock on an output folder against a second writer: ``flock`` on a lock file (see ``__init__``).

    The kernel drops the lock when the holder exits, however it ends (kill -9 included), so a lock is never
    stale; the pid stored in the file only names the holder in the error message.
    """

    def __init__(self, out: Path, beside: bool = False) -> None:
        """``beside``: the lock file is ``.OUT.lock`` next to ``out`` (for folders replaced as a whole), else
        ``OUT/.lock``."""
        out = Path(out)
        self.out = out
        self.path = out.parent / f".{out.name}.lock" if beside else out / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> DirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise InputError(f"{self.out} is in use by another evotool process (pid {holder}); "
                             "wait for it or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None


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
def atomic_dir(path: Path, keep: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a new staging folder beside ``path`` (``.PATH.partial-*``); on success it replaces ``path`` by renames,
    so readers see the old or the whole new folder, and entries ``keep`` of the old folder (e.g. a resumable
    analysis) move into the new one; on an exception it is removed and ``path`` is left untouched. What a
    killed run leaves (a staging folder, ``.PATH.old`` during the swap) is cleaned up or restored by the next
    ``atomic_dir(path)``: callers writing one ``path`` from several processes must hold its :class:`DirLock`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} exists and is not a folder")
    _settle_swap(path, keep)
    for partial in path.parent.glob(f".{path.name}.partial-*"):  # staging folders of killed runs
        shutil.rmtree(partial)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.chmod(file_mode(directory=True))  # mkdtemp creates 0700
    if not path.exists():
        tmp.rename(path)
        return
    path.rename(path.with_name(f".{path.name}.old"))
    tmp.rename(path)
    _settle_swap(path, keep)


def _settle_swap(path: Path, keep: tuple[str, ...]) -> None:
    """Finish the swap of :func:`atomic_dir` (move ``keep`` entries from ``.PATH.old`` into ``path``, delete the
    rest), or undo one killed between its two renames (``.PATH.old`` back to ``path``)."""
    old = path.with_name(f".{path.name}.old")
    if not old.exists():
        return
    if not path.exists():
        old.rename(path)
        return
    for name in keep:
        if (old / name).exists() and not (path / name).exists():
            (old / name).rename(path / name)
    shutil.rmtree(old)


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; :class:`InputError` naming the line if it is not JSON."""
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise InputError(f"{path}:{lineno}: expected one JSON object per line, got a {type(record).__name__}")
            yield lineno, record


def read_json(path: Path, error: type[EvotoolError] = InputError, what: str = "file", schema: str | None = None,
              keys: tuple[str, ...] = ()) -> Any:
    """A JSON file's content; ``error`` naming the file (as ``what``) if it is missing or malformed.

    With ``schema`` (e.g. ``"1.0"``) the content must be an object whose ``schema_version`` has the same
    major version and which holds every one of ``keys``.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        payload = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: not valid JSON ({getattr(err, 'msg', err)})") from err
    if schema is not None:
        if not isinstance(payload, dict):
            raise error(f"{path}: not a {what} (expected a JSON object, got {type(payload).__name__})")
        missing = [k for k in keys if k not in payload]
        if missing:
            raise error(f"{path}: {what} lacks {', '.join(missing)}")
        version = payload.get("schema_version")
        if str(version).split(".")[0] != schema.split(".")[0]:
            raise error(f"{path}: {what} schema version {version!r}, this evotool reads {schema!r}")
    return payload
