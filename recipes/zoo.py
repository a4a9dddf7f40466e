"""Recipe: build the whole model zoo, then export the compact test curves and print the member table.

``python -m evotool.recipes.zoo --out /work/zoo --jobs 2 [--export-to tests/data/zoo --export a,b,c]``
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from evotool.zoo.build import build_zoo
from evotool.zoo.config import ZooConfig, load_members
from evotool.zoo.curves import export_curves
from evotool.zoo.report import zoo_table


def main(
    out: Annotated[Path, typer.Option(help="Zoo folder.")] = Path("runs/zoo"),
    jobs: Annotated[int, typer.Option(help="Members built at once.")] = 2,
    export: Annotated[Optional[str], typer.Option(help="Members whose analysis_a curves are exported.")] = None,
    export_to: Annotated[Path, typer.Option(help="Folder of the exported .npz curves.")] = Path("tests/data/zoo"),
    max_tokens: Annotated[int, typer.Option(help="Tokens kept per exported member.")] = 300,
) -> None:
    """Build every member (cached), export curves of the chosen members, print the table."""
    cfg = ZooConfig(out=out, jobs=jobs)
    status = build_zoo(cfg)
    for name in (export or "").split(","):
        if name.strip():
            path = export_curves(out / name / "analysis_a", export_to / f"{name}.npz", name, max_tokens)
            typer.echo(f"exported {path}")
    typer.echo(zoo_table(load_members(), out))
    if any(status.values()):
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
