"""`evotool atlas`: the stage curves and boundaries of many analysis runs side by side (Markdown, PNG, HTML)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from evotool.analysis.config import AtlasConfig as C
from evotool.cli.options import option, overrides


def command(
    runs: Annotated[list[Path], typer.Argument(help="Analysis run directories (each holding stages.json).")],
    out: Annotated[Optional[Path], option(C, "out")] = None,
    behaviour: Annotated[Optional[list[Path]], option(C, "behaviour")] = None,
    html: Annotated[Optional[bool], option(C, "html", "--html/--no-html")] = None,
    columns: Annotated[Optional[int], option(C, "columns")] = None,
) -> None:
    """Write atlas.md (table), atlas.png (one panel per run, x = layer / L) and atlas.html, with behavioural truth."""
    from evotool.analysis.atlas import write_atlas
    from evotool.config import load_config

    cfg = load_config(C, None, overrides({"out": out, "behaviour": behaviour, "html": html, "columns": columns}))
    for path in write_atlas(runs, cfg):
        typer.echo(f"wrote {path}")
