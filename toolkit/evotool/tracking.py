"""Weights & Biases tracking that never costs local results.

Offline (syncable later with ``wandb sync``) unless an API key is configured; any W&B failure is
reported once as a warning and tracking is switched off for the rest of the run.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any


class Tracker:
    """A W&B run under ``out_dir/wandb``; ``enabled=False`` (``--no-wandb``) makes every call a no-op."""

    def __init__(
        self,
        job_type: str,
        config: dict[str, Any],
        out_dir: Path,
        enabled: bool = True,
        project: str = "evotool",
        name: str | None = None,
    ) -> None:
        self.run = None
        self.dir: Path | None = None
        if not enabled:
            return
        try:
            import wandb

            mode = os.environ.get("WANDB_MODE") or ("online" if _has_api_key() else "offline")
            out_dir.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", project),
                job_type=job_type,
                name=name or out_dir.name,
                config=config,
                dir=str(out_dir),
                mode=mode,
                reinit="finish_previous",
                settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
            )
            self.dir = Path(self.run.dir).parent
        except Exception as err:  # W&B must never break an analysis
            self._disable(err)

    def _disable(self, err: Exception) -> None:
        warnings.warn(f"W&B tracking disabled: {err}", stacklevel=3)
        self.run = None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log scalars (or W&B objects) at ``step``."""
        if self.run is None:
            return
        try:
            self.run.log(metrics, step=step)
        except Exception as err:
            self._disable(err)

    def log_images(self, figures: dict[str, Path]) -> None:
        """Log PNG files as W&B images under their names."""
        if self.run is None:
            return
        try:
            import wandb

            self.run.log({name: wandb.Image(str(path)) for name, path in figures.items()})
        except Exception as err:
            self._disable(err)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """Log a small table (e.g. method x metric)."""
        if self.run is None:
            return
        try:
            import wandb

            self.run.log({name: wandb.Table(columns=columns, data=rows)})
        except Exception as err:
            self._disable(err)

    def summary(self, values: dict[str, Any]) -> None:
        """Set run-level summary values (boundaries, final metrics)."""
        if self.run is None:
            return
        try:
            for key, value in values.items():
                self.run.summary[key] = value
        except Exception as err:
            self._disable(err)

    def finish(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as err:
            self._disable(err)
        self.run = None


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
