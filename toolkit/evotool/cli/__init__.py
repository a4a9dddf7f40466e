"""The `evotool` command line: one module per subcommand, registered here.

Every failure ends as one line ``error: ...`` on stderr and exit status 2 (Ctrl-C: exit 130): a usage error of the
command line (unknown option, a value of the wrong type, a missing argument) with click's message and the command
whose ``--help`` explains it, an :class:`evotool.errors.EvotoolError` with its own message, any other exception
with its type, message and file name (``EVOTOOL_TRACEBACK=1`` re-raises it with the traceback instead).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Annotated, Optional

import typer

from evotool.errors import EvotoolError

try:  # the click typer runs on: its own copy since typer 0.2x, the click package before
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer
    from click import exceptions as click_errors

app = typer.Typer(
    name="evotool",
    help="Layer-wise knowledge evolution in vision-language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
TRACEBACK_ENV = "EVOTOOL_TRACEBACK"


@app.callback()
def _root(
    threads: Annotated[Optional[int], typer.Option(
        "--threads", min=1, help="torch CPU threads for the command (default: torch's own choice; 1 gives stable "
                                 "CPU-time latency ratios on shared cores); training (train-demo, zoo build's train step) "
                                 "runs with its config's own `threads`")] = None,
) -> None:
    """evotool: layer-wise knowledge evolution in vision-language models."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


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


def usage(err: click_errors.ClickException) -> str:
    """One line for a command-line usage error: click's message, and for a :class:`click.UsageError` the command
    whose ``--help`` lists its options (``no such option: --foo (evotool analyze --help)``)."""
    text = err.format_message().rstrip(".")
    if text[1:2].islower():  # "No such option" -> "no such option", "ID ..." stays
        text = text[0].lower() + text[1:]
    ctx = getattr(err, "ctx", None)
    return f"{text} ({ctx.command_path} --help)" if ctx is not None else text


def main() -> None:
    """Entry point: run the typer app, reporting every failure on one line (see the module doc)."""
    try:
        code = app(standalone_mode=False, prog_name="evotool")  # click's errors reach us, not its usage box
    except click_errors.NoArgsIsHelpError as err:  # `evotool eval` alone: the help, as typer shows it
        err.show()
        sys.exit(err.exit_code)
    except click_errors.ClickException as err:
        _exit(usage(err), err.exit_code)
    except typer.Abort:
        _exit("aborted", 1)
    except EvotoolError as err:
        _exit(str(err), err.exit_code)
    except Exception as err:
        if os.environ.get(TRACEBACK_ENV):
            raise
        _exit(describe(err), 2)
    sys.exit(code if isinstance(code, int) else 0)  # typer.Exit(n) and Ctrl-C (130) come back as codes


def _exit(message: str, code: int) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(code)
