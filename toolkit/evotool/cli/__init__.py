"""The `evotool` command line: one module per subcommand, registered here.

Every failure of a subcommand ends as one line ``error: ...`` on stderr and exit status 2 (Ctrl-C: typer's exit 130):
an :class:`evotool.errors.EvotoolError` with its own message, any other exception with its type, message and
file name (``EVOTOOL_TRACEBACK=1`` re-raises it with the traceback instead).
"""

from __future__ import annotations

import importlib
import os
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
TRACEBACK_ENV = "EVOTOOL_TRACEBACK"


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


def describe(err: BaseException) -> str:
    """One line for an exception no check anticipated: its type, message and the file it concerns."""
    if isinstance(err, OSError) and err.strerror:
        where = f": {err.filename}" if err.filename else ""
        return f"{err.strerror}{where}"
    text = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {text} (unexpected; rerun with {TRACEBACK_ENV}=1 for the traceback)"


def main() -> None:
    """Entry point: run the typer app, reporting every failure on one line (see the module doc)."""
    try:
        app()
    except EvotoolError as err:
        _exit(str(err), err.exit_code)
    except Exception as err:
        if os.environ.get(TRACEBACK_ENV):
            raise
        _exit(describe(err), 2)


def _exit(message: str, code: int) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(code)
