"""`evotool train-demo`: retrain the shipped demo model (or any world VLM) on the synthetic world."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from evotool.cli.options import ConfigFile, NoWandb, SetPairs, option, overrides
from evotool.world.config import TrainConfig as C


def command(
    out: Annotated[Path, typer.Option(help="Output folder for the checkpoint and model card.")] = Path("runs/train-demo"),
    max_steps: Annotated[Optional[int], option(C, "max_steps")] = None,
    seed: Annotated[Optional[int], option(C, "seed")] = None,
    config: ConfigFile = None,
    set_: SetPairs = None,
    no_wandb: NoWandb = False,
) -> None:
    """Train the demo VLM on the synthetic world (staged, as LLaVA) and save it with a model card.

    Without --config the packaged train_demo.yaml (the shipped model's config) is used."""
    from evotool.validate import output_dir
    from evotool.world.config import load_train_config
    from evotool.world.train import train

    output_dir(out)
    cfg = load_train_config(config, overrides({"max_steps": max_steps, "seed": seed}, set_))
    typer.echo(f"saved the demo model to {train(cfg, out, wandb=not no_wandb)}")
