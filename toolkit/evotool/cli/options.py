"""Command-line options shared by several subcommands (typer ``Annotated`` aliases)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

Model = Annotated[Optional[str], typer.Option(help="Hub id or local path (default: the shipped demo model).")]
Device = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda if present).")]
NoWandb = Annotated[bool, typer.Option("--no-wandb", help="Do not log to Weights & Biases.")]
