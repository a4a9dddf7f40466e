"""Command-line options built from the config dataclasses, so that help texts and defaults have one source.

A command declares ``Annotated[Optional[T], option(Config, "key")] = None`` for each flag; flags that are
not given stay None and leave the config's YAML or default value alone (:func:`overrides`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from evotool.config import field_default, field_help, merge, nest, parse_set
from evotool.options import LoadOptions


def option(cls: type, key: str, *param_decls: str, **kwargs: Any) -> Any:
    """A typer option documented by field ``key`` (dotted for nested configs) of dataclass ``cls``: its help
    text, and its default shown as the option's default."""
    default = field_default(cls, key)
    shown = default not in (None, dataclasses.MISSING) and not isinstance(default, (dict, list))
    return typer.Option(*param_decls, help=field_help(cls, key), show_default=str(default) if shown else False, **kwargs)


def overrides(flags: Mapping[str, Any], sets: Sequence[str] | None = None) -> dict[str, Any]:
    """Nested config overrides from the given flags (dotted key -> value; None = not given) and ``--set`` pairs
    (which win)."""
    return merge(nest(flags, skip_none=True), parse_set(sets or []))


ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="YAML config file (keys: the fields of the run's config).")]
SetPairs = Annotated[Optional[list[str]], typer.Option("--set", help="Config override a.b=value (repeatable; YAML value).")]

# Options of the commands without a config dataclass (eval, train-demo).
Model = Annotated[Optional[str], typer.Option(help="Hub id or local path (default: the shipped demo model).")]
Device = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda if present).")]
GpusPerProcess = Annotated[int, option(LoadOptions, "gpus_per_process")]
NoWandb = Annotated[bool, typer.Option("--no-wandb", help="Do not log to Weights & Biases.")]


def load_command_model(model: str | None, dtype: str = "auto", device: str | None = None,
                       gpus_per_process: int = 1) -> tuple[Any, Any, str]:
    """(model, processor, model id) for the commands that decode (eval, generate): ``model`` or the shipped demo
    model; ``dtype="auto"`` means bfloat16 on a GPU; several GPUs per process set up the process group first."""
    import torch

    from evotool.analysis.run import resolve_model_id
    from evotool.models.loading import load_model, process_state

    model_id = resolve_model_id(model)
    if dtype == "auto" and (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        dtype = "bfloat16"
    load = LoadOptions(dtype=dtype, device=device, gpus_per_process=gpus_per_process)
    process_state(load)  # before any other use fixes it
    m, p = load_model(model_id, load)
    return m, p, model_id
