"""`evotool report`: rebuild the interactive HTML report of one analysis run, or an atlas of several."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def command(
    runs: Annotated[list[Path], typer.Argument(help="Analysis run directories (each holding stages.json).")],
    out: Annotated[Optional[Path], typer.Option(help="The HTML file (default with one run: RUN_DIR/report.html).")] = None,
    samples: Annotated[int, typer.Option(help="Samples embedded in the page, split evenly over the runs.")] = 8,
    tokens: Annotated[int, typer.Option(help="Generated tokens per sample in the heatmap and trajectories.")] = 48,
    no_figures: Annotated[bool, typer.Option("--no-figures", help="Leave the runs' static PNG figures out.")] = False,
) -> None:
    """Write a self-contained report.html (works offline); several runs give a side-by-side stage atlas."""
    from evotool.analysis.html import ReportConfig, write_html_report
    from evotool.errors import ConfigError

    if out is None:
        if len(runs) > 1:
            raise ConfigError("--out FILE.html is required with several run directories")
        out = runs[0] / "report.html"
    path = write_html_report(out, runs, ReportConfig(samples=samples, tokens=tokens, figures=not no_figures))
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
