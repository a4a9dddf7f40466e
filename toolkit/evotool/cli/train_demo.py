"""`evotool train-demo`: retrain the shipped demo model (or any world VLM) on the synthetic world."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from evotool.cli.options import NoWandb


def command(
    config: Annotated[Optional[Path], typer.Option(help="YAML TrainConfig (default: the packaged train_demo.yaml)")] = None,
    out: Annotated[Path, typer.Option(help="output folder for the checkpoint and model card")] = Path("runs/train-demo"),
    max_steps: Annotated[Optional[int], typer.Option(help="cap on every stage's steps (quick runs)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="config override a.b=value (repeatable)")] = None,
    no_wandb: NoWandb = False,
) -> None:
    """Train the demo VLM on the synthetic world (staged, as LLaVA) and save it with a model card."""
    from evotool.world.train import load_train_config, train

    overrides = list(set_ or []) + ([f"max_steps={max_steps}"] if max_steps is not None else [])
    path = train(load_train_config(config, overrides), out, wandb=not no_wandb)
    typer.echo(f"saved the demo model to {path}")
