"""`evotool export-generate`: a decoding method as a transformers ``custom_generate`` directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from evotool.cli.eval import SetOpt, Stages
from evotool.mitigate.methods import method_names


def command(
    method: Annotated[str, typer.Argument(help=f"{', '.join(method_names())}, or a mitigate run dir.")],
    out: Annotated[Path, typer.Option(help="Folder to write custom_generate/ into (a new folder, or a checkpoint folder).")],
    stages: Stages = None,
    set_: SetOpt = None,
) -> None:
    """Export a decoding method for model.generate(..., custom_generate=OUT, trust_remote_code=True)."""
    from evotool.config import parse_set
    from evotool.integrations.hf import export_generate
    from evotool.validate import output_dir

    output_dir(out)
    folder = export_generate(method, out, stages, parse_set(set_ or []))
    typer.echo(f"wrote {folder}; decode with model.generate(**inputs, custom_generate={str(out)!r}, trust_remote_code=True)")
