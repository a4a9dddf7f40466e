"""The prune recipe: analysis -> prune -> heal -> eval, or (``--compare``) every selector and runtime mode at equal k.

Composition of :func:`evotool.prune.run.run_prune` / :func:`evotool.prune.run.compare` with the packaged
``configs/prune.yaml``:

    python -m evotool.recipes.prune_pipeline --compare --out runs/prune-compare [--config FILE] [--set key=value]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from evotool.cli.options import ConfigFile, SetPairs, option, overrides
from evotool.config import load_config
from evotool.prune.config import PruneConfig
from evotool.prune.run import compare, run_prune


def main(
    out: Annotated[Path, typer.Option(help="Output folder (checkpoint, or compare.json / compare.md).")],
    compare_all: Annotated[bool, typer.Option("--compare", help="Compare every selector and runtime mode at equal k.")] = False,
    config: ConfigFile = None,
    set_: SetPairs = None,
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 1,
    model: Annotated[Optional[str], option(PruneConfig, "model")] = None,
    stages: Annotated[Optional[str], option(PruneConfig, "stages")] = None,
    drop: Annotated[Optional[int], option(PruneConfig, "drop")] = None,
    eval_n: Annotated[Optional[int], option(PruneConfig, "eval_n")] = None,
) -> None:
    """Prune one model (or compare all selectors) with the packaged prune config."""
    torch.set_num_threads(threads)
    given = overrides({"out": str(out), "model": model, "stages": stages, "drop": drop, "eval_n": eval_n}, set_)
    cfg = load_config(PruneConfig, config, given, default="prune.yaml")
    if compare_all:
        compare(cfg)
        typer.echo((cfg.out / "compare.md").read_text())
    else:
        typer.echo(json.dumps(run_prune(cfg), indent=2, default=str))


if __name__ == "__main__":
    typer.run(main)
