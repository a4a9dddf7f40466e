"""Recipe: retrain the shipped demo model (``configs/train_demo.yaml``) with ``evotool.world.train``.

``python -m evotool.recipes.train_demo [--config FILE] [--out DIR] [--set key=value ...] [--no-wandb]``
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from evotool.world.config import load_train_config
from evotool.world.train import train


def run(config: Path | None = None, out: Path = Path("runs/train-demo"), overrides: list[str] | None = None,
        no_wandb: bool = False) -> Path:
    """Train the model of ``config`` (default: the packaged train_demo.yaml) into ``out``; returns ``out``."""
    return train(load_train_config(config, overrides or ()), out, wandb=not no_wandb)


def main(
    config: Annotated[Optional[Path], typer.Option(help="YAML config (default: the packaged train_demo.yaml).")] = None,
    out: Annotated[Path, typer.Option(help="Checkpoint folder.")] = Path("runs/train-demo"),
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Config override a.b=value.")] = None,
    no_wandb: Annotated[bool, typer.Option("--no-wandb", help="No W&B tracking.")] = False,
) -> None:
    """Train the demo VLM and save it with a model card."""
    typer.echo(f"saved the demo model to {run(config, out, set_, no_wandb)}")


if __name__ == "__main__":
    typer.run(main)
