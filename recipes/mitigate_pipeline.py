"""analyze -> mitigate -> eval on the synthetic world, W&B-tracked (config: ``configs/mitigate.yaml``).

Composition of :func:`evotool.mitigate.pipeline.run_pipeline` with the packaged config; see that module
for the steps.

Run: ``python -m evotool.recipes.mitigate_pipeline --out runs/mitigate-pipeline [--config FILE] [--set key=value]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from evotool.cli.options import ConfigFile, SetPairs
from evotool.config import load_config
from evotool.mitigate.config import PipelineConfig
from evotool.mitigate.pipeline import run_pipeline


def main(
    out: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/mitigate-pipeline"),
    config: ConfigFile = None,
    set_: SetPairs = None,
    no_wandb: Annotated[bool, typer.Option("--no-wandb", help="No W&B tracking.")] = False,
) -> None:
    """analyze -> mitigate -> eval on the synthetic world; prints the method table."""
    cfg = load_config(PipelineConfig, config, set_ or [], default="mitigate.yaml")
    path = run_pipeline(cfg, out, wandb=not no_wandb)
    typer.echo((path.parent / "table.md").read_text())
    typer.echo(json.dumps(json.loads(path.read_text())["target"], indent=2))


if __name__ == "__main__":
    typer.run(main)
