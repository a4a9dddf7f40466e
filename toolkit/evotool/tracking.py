"""Weights & Biases tracking that never costs local results.

Offline (syncable later with ``wandb sync``) unless an API key is configured; any W&B failure is
reported once as a warning and tracking is switched off for the rest of the run.

Artifacts carry the lineage analysis ``stages.json`` -> checkpoint -> eval results: every run logs what
it wrote (:meth:`Tracker.log_artifact`) and declares what it read (:meth:`Tracker.use_artifact`) as an
:class:`ArtifactRef` whose name says what it is and of which model (``stages-<fingerprint>``,
``model-<fingerprint>``, ``method-<name>-<fingerprint>``, ``results-<task>-<fingerprint>``), so the
producing and the consuming run name the same artifact and W&B draws the graph.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ArtifactRef:
    """A local file (uploaded) or folder (its top-level files by reference: checkpoints are not copied) as a
    W&B artifact."""

    name: str
    kind: str
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def stages(cls, path: str | Path, fingerprint: str, **metadata: Any) -> ArtifactRef:
        """A ``stages.json`` (or the analyze run directory holding it) of the model with ``fingerprint``."""
        path = Path(path)
        return cls(f"stages-{fingerprint}", "stages", path / "stages.json" if path.is_dir() else path, metadata)

    @classmethod
    def model(cls, path: str | Path, fingerprint: str, **metadata: Any) -> ArtifactRef:
        """A checkpoint folder (``save_pretrained`` layout) whose weights have ``fingerprint``."""
        return cls(f"model-{fingerprint}", "model", Path(path), metadata)

    @classmethod
    def method(cls, path: str | Path, name: str, fingerprint: str, **metadata: Any) -> ArtifactRef:
        """An ``evotool mitigate`` run's ``method.json`` (or its run directory) for the model with ``fingerprint``."""
        path = Path(path)
        return cls(f"method-{name}-{fingerprint}", "method", path / "method.json" if path.is_dir() else path, metadata)

    @classmethod
    def results(cls, path: str | Path, task: str, fingerprint: str, **metadata: Any) -> ArtifactRef:
        """An eval's ``results.json`` of ``task`` on the model with ``fingerprint``."""
        return cls(f"results-{task}-{fingerprint}", "results", Path(path), metadata)


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

    def log_artifact(self, ref: ArtifactRef) -> None:
        """``ref`` as an output of this run."""
        self._artifact(ref, use=False)

    def use_artifact(self, ref: ArtifactRef) -> None:
        """``ref`` as an input of this run (name and content equal to where it was logged: one lineage graph).

        W&B refuses ``use_artifact`` offline; there the run records the artifact with ``use_after_commit``,
        the record ``use_artifact`` itself writes for an artifact built locally, which ``wandb sync`` replays.
        """
        self._artifact(ref, use=True)

    def _artifact(self, ref: ArtifactRef, use: bool) -> None:
        if self.run is None:
            return
        try:
            import wandb

            artifact = wandb.Artifact(ref.name, type=ref.kind, metadata=ref.metadata)
            path = Path(ref.path).resolve()
            if path.is_dir():  # the checkpoint's own files, by reference (not its wandb/ or adapter/ subfolders)
                for item in sorted(p for p in path.iterdir() if p.is_file()):
                    artifact.add_reference(item.as_uri(), name=item.name, checksum=False)
            else:
                artifact.add_file(str(path))
            if not use:
                self.run.log_artifact(artifact)
            elif self.run.offline:
                self.run._log_artifact(artifact, is_user_created=True, use_after_commit=True)
            else:
                self.run.use_artifact(artifact)
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
