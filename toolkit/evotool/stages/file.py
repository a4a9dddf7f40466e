"""``stages.json``: the versioned stage file that ``prune`` and ``mitigate`` consume, as one typed object.

Required keys (extend, never rename): ``schema_version``, ``model``, ``fingerprint``, ``num_layers``,
``critical_layer`` (int, or null when no stable stage exists), ``mutation_layers`` (list of ints,
may be empty), ``stages`` (``rapid_evolution`` / ``stabilization`` / ``mutation`` -> inclusive
``[first, last]`` or null). Schema 1.1 adds ``flags`` (detector warnings such as ``too_few_tokens``,
``no_stable_stage``; read as ``[]`` from 1.0 files); 1.2 adds ``mutation_check`` (the bypass check's calls, confirmed
layers and per-layer effects; null when it did not run); 1.3 adds ``added`` (layers the check called) and ``full``
(the full model's object scores) to ``mutation_check``. Also written by ``evotool analyze``: ``lens``,
``critical_spread``, ``mutation_stats``, ``curves`` (per-layer median / quartiles of each metric),
``hallucination``, ``object_vocab`` (the words counted as object names), ``config``, ``environment``,
``created``; they stay in :attr:`StageFile.payload`.

Layer numbering: 0 = embedding output, 1..L = decoder layers (``num_layers`` = L).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evotool.errors import StageFileError
from evotool.io import read_json, write_json
from evotool.stages.detect import FirstMutation

SCHEMA_VERSION = "1.3"
# What each detector flag means for the user (evotool.stages.detect sets them).
FLAGS = {
    "too_few_tokens": "too few generated tokens to place the boundaries; they are null (analyse more samples or tokens)",
    "no_direct_effect": "the run holds no direct-effect metrics (traced before evotool 0.2 without features); "
                        "mutation layers were not searched (re-run the analysis into a new directory)",
    "no_stable_stage": "no stabilization stage: the emitted tokens settle only at the output",
    "short_stable_stage": "the stabilization stage is a single layer; stable-stage pruning and readouts have little room",
    "wide_interval": "the critical layer's bootstrap interval reaches beyond the flag tolerance (one layer) around it: another "
                     "sample set may place it elsewhere (see stages.json 'interval'; analyse more samples)",
    "mutation_unconfirmed": "a mutation call was dropped: bypassing the layer on the run's own samples barely changed the "
                            "text or the hallucinations (see stages.json 'mutation_check')",
    "mutation_added": "the bypass check called a mutation layer the direct-effect rule did not: bypassing it on the run's "
                      "own samples cuts their object hallucinations (see stages.json 'mutation_check')",
    "uncertain_mutation": "the mutation stage is uncertain: its presence or its first layer changes across bootstrap resamples "
                          "(see stages.json 'interval'; analyse more samples before acting on it)",
}
STAGES_FILE = "stages.json"
STAGE_NAMES = ("rapid_evolution", "stabilization", "mutation")
REQUIRED = ("model", "fingerprint", "num_layers", "critical_layer", "mutation_layers", "stages")

Range = tuple[int, int]


@dataclass(frozen=True)
class StageFile(FirstMutation):
    """The boundaries of one model's analysis, validated; ``payload`` is the whole JSON object."""

    model: str
    fingerprint: str
    num_layers: int
    critical_layer: int | None
    mutation_layers: list[int]
    stages: dict[str, Range | None]
    flags: list[str] = field(default_factory=list)
    payload: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    source: str = field(default="stages.json", compare=False)

    @classmethod
    def read(cls, path_or_run_dir: str | Path, fingerprint: str | None = None) -> StageFile:
        """Load and validate a stage file (or the ``stages.json`` of a run directory); with ``fingerprint``,
        refuse one computed on another model."""
        path = Path(path_or_run_dir)
        if path.is_dir():
            path = path / STAGES_FILE
        payload = read_json(path, StageFileError, "stage file")
        stage_file = cls.from_payload(payload, str(path))
        if fingerprint is not None and stage_file.fingerprint != fingerprint:
            raise StageFileError(
                f"{path} belongs to another model (fingerprint {stage_file.fingerprint}, this model {fingerprint}); "
                "re-run `evotool analyze` on this model"
            )
        return stage_file

    @classmethod
    def for_model(cls, path_or_run_dir: str | Path, model: Any) -> StageFile:
        """:meth:`read` checked against a loaded ``model`` (:meth:`check_model`), its flags printed."""
        stage_file = cls.read(path_or_run_dir).check_model(model)
        stage_file.warn_flags()
        return stage_file

    def check_model(self, model: Any, remedy: str = "re-run `evotool analyze` on this model") -> StageFile:
        """This stage file, refused (:class:`StageFileError`) unless it was computed on ``model``: the same weight
        fingerprint and the same number of decoder layers; ``remedy`` ends the fingerprint message."""
        from evotool.models.loading import fingerprint
        from evotool.models.registry import decoder_parts

        own = fingerprint(model)
        if self.fingerprint != own:
            raise StageFileError(f"{self.source} belongs to another model (fingerprint {self.fingerprint}, this model "
                                 f"{own}); {remedy}")
        depth = decoder_parts(model).num_layers
        if self.num_layers != depth:
            raise StageFileError(f"{self.source} describes {self.num_layers} layers, the model has {depth}")
        return self

    @classmethod
    def from_payload(cls, payload: Any, source: str = STAGES_FILE) -> StageFile:
        """Validate a stage-file object (schema 1.x, types, layer ranges); :class:`StageFileError` naming ``source``."""

        def bad(what: str) -> StageFileError:
            return StageFileError(f"{source}: {what}")

        if not isinstance(payload, dict):
            raise bad(f"expected a JSON object, got {type(payload).__name__}")
        missing = [k for k in ("schema_version", *REQUIRED) if k not in payload]
        if missing:
            raise bad(f"missing keys {missing}")
        version = str(payload["schema_version"])
        if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
            raise bad(f"schema version {version} is not supported (expected {SCHEMA_VERSION})")
        n = payload["num_layers"]
        if not _is_int(n) or n < 1:
            raise bad(f"num_layers must be a positive integer, got {n!r}")

        def layer(value: Any, what: str) -> int:
            if not _is_int(value) or not 0 <= value <= n:
                raise bad(f"{what} must be a layer index in 0..{n}, got {value!r}")
            return value

        critical = payload["critical_layer"]
        critical = None if critical is None else layer(critical, "critical_layer")
        mutation = payload["mutation_layers"]
        if not isinstance(mutation, list):
            raise bad(f"mutation_layers must be a list, got {mutation!r}")
        ranges = payload["stages"]
        if not isinstance(ranges, dict) or set(ranges) != set(STAGE_NAMES):
            raise bad(f"stages must be exactly {STAGE_NAMES}")
        stages: dict[str, Range | None] = {}
        for name in STAGE_NAMES:
            rng = ranges[name]
            if rng is None:
                stages[name] = None
                continue
            if not isinstance(rng, (list, tuple)) or len(rng) != 2:
                raise bad(f"stage {name} must be [first, last] or null, got {rng!r}")
            first, last = layer(rng[0], f"stage {name}"), layer(rng[1], f"stage {name}")
            if first > last:
                raise bad(f"stage {name} {list(rng)} is empty")
            stages[name] = (first, last)
        flags = payload.get("flags", [])
        if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
            raise bad(f"flags must be a list of strings, got {flags!r}")
        for key in ("model", "fingerprint"):
            if not isinstance(payload[key], str):
                raise bad(f"{key} must be a string, got {payload[key]!r}")
        return cls(model=payload["model"], fingerprint=payload["fingerprint"], num_layers=n, critical_layer=critical,
                   mutation_layers=[layer(m, "mutation_layers") for m in mutation], stages=stages, flags=list(flags),
                   payload=payload, source=source)

    def warn_flags(self) -> None:
        """One ``warning:`` line on stderr per detector flag, so commands that act on these boundaries say so."""
        for flag in self.flags:
            print(f"warning: {self.source}: {flag_message(flag)}", file=sys.stderr)

    def boundaries(self) -> dict[str, Any]:
        """``critical_layer``, ``mutation_layers`` and ``stages`` (ranges as lists), as stored in downstream records."""
        return {"critical_layer": self.critical_layer, "mutation_layers": list(self.mutation_layers),
                "stages": {k: list(v) if v is not None else None for k, v in self.stages.items()}}

    @property
    def critical(self) -> int:
        """The critical layer; :class:`StageFileError` when the analysis found none (no stable stage)."""
        if self.critical_layer is None:
            raise StageFileError(f"{self.source} has no critical layer (no stable stage was found)")
        return self.critical_layer

    @property
    def stable_range(self) -> Range:
        """(first, last) layer of the stabilization stage; :class:`StageFileError` when there is none."""
        rng = self.stages["stabilization"]
        if rng is None:
            why = "no critical layer was found" if self.critical_layer is None else "mutation follows the critical layer"
            raise StageFileError(f"{self.source} has no stabilization stage ({why})")
        return rng

    @property
    def last_stable(self) -> int:
        """End of the stabilization stage; the critical layer when that stage is empty."""
        rng = self.stages["stabilization"]
        return rng[1] if rng is not None else self.critical

    def stage_layers(self, name: str) -> list[int]:
        """The layers of stage ``name`` (empty when the stage does not exist)."""
        rng = self.stages[name]
        return list(range(rng[0], rng[1] + 1)) if rng is not None else []


def write_stages(path: str | Path, payload: dict[str, Any]) -> StageFile:
    """Validate ``payload`` and write it atomically as ``path`` at the current schema version (``flags`` default ``[]``)."""
    payload = {"schema_version": SCHEMA_VERSION, "flags": [], **payload}
    payload["schema_version"] = SCHEMA_VERSION
    stage_file = StageFile.from_payload(payload, str(path))
    write_json(Path(path), payload, schema=SCHEMA_VERSION)
    return stage_file


def flag_message(flag: str) -> str:
    """The explanation of a detector flag (unknown flags from newer versions are shown as they are)."""
    return f"{flag}: {FLAGS[flag]}" if flag in FLAGS else flag


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
