"""`evotool mitigate`: tune a hallucination-mitigation method for one model and record it in a run directory."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from evotool.cli.options import option, overrides
from evotool.mitigate.config import MitigateConfig as C


def command(
    method: Annotated[str, option(C, "method")],
    model: Annotated[Optional[str], option(C, "model")] = None,
    stages: Annotated[Optional[str], option(C, "stages")] = None,
    set_: Annotated[Optional[list[str]], option(C, "options", "--set")] = None,
    grid: Annotated[Optional[list[str]], option(C, "grid", "--grid")] = None,
    tune: Annotated[Optional[bool], option(C, "tune", "--tune/--no-tune")] = None,
    n: Annotated[Optional[int], option(C, "n", "--n", "--records")] = None,
    seed: Annotated[Optional[int], option(C, "seed")] = None,
    batch_size: Annotated[Optional[int], option(C, "batch_size")] = None,
    lora_steps: Annotated[Optional[int], option(C, "lora.steps", "--lora-steps")] = None,
    out: Annotated[Optional[str], option(C, "out")] = None,
    wandb: Annotated[Optional[bool], option(C, "wandb", "--wandb/--no-wandb")] = None,
    push_to_hub: Annotated[Optional[str], option(C, "push_to_hub")] = None,
) -> None:
    """Tune and record a mitigation method; `evotool eval ... --method RUN_DIR` then decodes with it."""
    from evotool.config import load_config, parse_set
    from evotool.mitigate.run import run_mitigate

    flags = {"method": method, "model": model, "stages": stages, "options": parse_set(set_ or []) or None,
             "grid": parse_set(grid or []) or None, "tune": tune, "n": n, "seed": seed, "batch_size": batch_size,
             "lora.steps": lora_steps, "out": out, "wandb": wandb, "push_to_hub": push_to_hub}
    path = run_mitigate(load_config(C, None, overrides(flags)))
    typer.echo(f"wrote {path}")
