"""The environment recorded with every result (package versions, git hash, hardware) and the CPU threads a step runs
with."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PACKAGES = ("evotool", "torch", "transformers", "peft", "datasets", "accelerate", "bitsandbytes", "optimum", "wandb")


def git_hash(path: Path | None = None) -> str | None:
    """The commit of the evotool checkout (``-dirty`` when modified), or None outside git."""
    cwd = path or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")


def cpu_name() -> str | None:
    """The CPU model (Linux ``/proc/cpuinfo``, else ``platform.processor()``): CPU training is bitwise reproducible
    only on the same kind of CPU (docs/stages.md), so results record it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment() -> dict[str, Any]:
    """Versions of the relevant packages, python, platform, git hash, CPU and accelerator."""
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "packages": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git": git_hash(),
        "cpu": cpu_name(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
    }


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads, then give the caller its own count back (a recipe's ``threads``
    holds for its step only, not for the steps of the same process after it)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
