"""`evotool report`: rebuild the interactive HTML report of one analysis run, or an atlas of several."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from evotool.analysis.config import ReportConfig as C
from evotool.cli.options import option, overrides


def command(
    runs: Annotated[list[Path], typer.Argument(help="Analysis run directories (each holding stages.json).")],
    out: Annotated[Optional[Path], typer.Option(help="The HTML file (default with one run: RUN_DIR/report.html).")] = None,
    samples: Annotated[Optional[int], option(C, "samples")] = None,
    tokens: Annotated[Optional[int], option(C, "tokens")] = None,
    figures: Annotated[Optional[bool], option(C, "figures", "--figures/--no-figures")] = None,
) -> None:
    """Write a self-contained report.html (works offline); several runs give a side-by-side stage atlas."""
    from evotool.analysis.html import write_html_report
    from evotool.config import load_config
    from evotool.errors import ConfigError
    from evotool.validate import output_file

    if out is None:
        if len(runs) > 1:
            raise ConfigError("--out FILE.html is required with several run directories")
        out = runs[0] / "report.html"
    output_file(out)
    cfg = load_config(C, None, overrides({"samples": samples, "tokens": tokens, "figures": figures}))
    path = write_html_report(out, runs, cfg)
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
