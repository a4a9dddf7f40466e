"""Recipe: build the model zoo (cached), export the compact test curves of chosen members, print the member table.

``python -m evotool.recipes.zoo [--config zoo.yaml] [--set out=/work/zoo --set jobs=2] [--export a,b --export-to tests/data/zoo]``
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from evotool.cli.options import ConfigFile, SetPairs
from evotool.config import load_config
from evotool.zoo.build import build_zoo
from evotool.zoo.config import ZooConfig, load_members
from evotool.zoo.curves import export_curves
from evotool.zoo.report import zoo_table


def main(
    config: ConfigFile = None,
    set_: SetPairs = None,
    export: Annotated[Optional[str], typer.Option(help="Members whose analysis_a curves are exported.")] = None,
    export_to: Annotated[Path, typer.Option(help="Folder of the exported .npz curves.")] = Path("tests/data/zoo"),
    max_tokens: Annotated[int, typer.Option(help="Tokens kept per exported member.")] = 300,
) -> None:
    """Build the members of the ZooConfig (cached), export curves of the chosen members, print the table."""
    cfg = load_config(ZooConfig, config, set_ or [])
    status = build_zoo(cfg)
    for name in (export or "").split(","):
        if name.strip():
            path = export_curves(cfg.out / name / "analysis_a", export_to / f"{name}.npz", name, max_tokens)
            typer.echo(f"exported {path}")
    typer.echo(zoo_table(load_members(cfg.configs, cfg.members or None), cfg.out))
    if any(status.values()):
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
