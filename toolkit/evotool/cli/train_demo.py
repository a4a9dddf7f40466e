"""`evotool train-demo`: retrain the shipped demo model on the synthetic world."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from evotool.cli.options import NoWandb


def command(
    config: Annotated[Path | None, typer.Option(help="YAML config (default: the packaged train_demo.yaml)")] = None,
    out: Annotated[Path, typer.Option(help="output folder for the checkpoint and model card")] = Path("runs/train-demo"),
    max_steps: Annotated[int | None, typer.Option(help="cap on every stage's steps (quick runs)")] = None,
    no_wandb: NoWandb = False,
) -> None:
    """Train the demo VLM on the synthetic world (staged, as LLaVA) and save it with a model card."""
    from evotool.recipes.train_demo import run

    overrides = {"max_steps": max_steps} if max_steps is not None else None
    path = run(config, out, overrides=overrides, no_wandb=no_wandb)
    typer.echo(f"saved the demo model to {path}")
