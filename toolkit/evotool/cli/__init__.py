"""The `evotool` command line: one module per subcommand, registered here.

Every subcommand turns an :class:`evotool.errors.EvotoolError` into one line on stderr
and a non-zero exit status.
"""

from __future__ import annotations

import importlib
import sys

import typer

from evotool.errors import EvotoolError

app = typer.Typer(
    name="evotool",
    help="Layer-wise knowledge evolution in vision-language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)



@app.callback()
def _root() -> None:
    """evotool: layer-wise knowledge evolution in vision-language models."""


# (module in evotool.cli, command name). Each module exposes `command` (a plain function)
# or `app` (a typer sub-application, for commands with sub-commands such as `eval`).
SUBCOMMANDS: tuple[tuple[str, str], ...] = (
    ("analyze", "analyze"),
    ("world", "world"),
    ("train_demo", "train-demo"),
    ("prune", "prune"),
    ("mitigate", "mitigate"),
    ("eval", "eval"),
    ("report", "report"),
    ("atlas", "atlas"),
    ("generate", "generate"),
    ("zoo", "zoo"),
    ("export", "export-generate"),
)

for _module_name, _command_name in SUBCOMMANDS:
    _module = importlib.import_module(f"evotool.cli.{_module_name}")
    if hasattr(_module, "app"):
        app.add_typer(_module.app, name=_command_name)
    else:
        app.command(_command_name, help=_module.command.__doc__)(_module.command)


def main() -> None:
    """Entry point: run the typer app, reporting user errors on one line."""
    try:
        app()
    except EvotoolError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
