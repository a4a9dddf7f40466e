"""`evotool zoo build`: train the model zoo (cached checkpoints), its manifests, analyses and ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from evotool.cli.options import NoWandb

app = typer.Typer(help="The model zoo: many small world VLMs with behavioural ground truth.", no_args_is_help=True)


@app.command("build")
def build(
    out: Annotated[Path, typer.Option(help="Zoo folder (one sub-folder per member).")] = Path("runs/zoo"),
    members: Annotated[Optional[str], typer.Option(help="Comma-separated members (default: all).")] = None,
    steps: Annotated[str, typer.Option(help="Comma-separated steps: train,manifests,analyze,truth.")] = "train,manifests,analyze,truth",
    jobs: Annotated[int, typer.Option(help="Members built at once (one worker process each).")] = 1,
    configs: Annotated[Optional[Path], typer.Option(help="Folder of member YAMLs (default: configs/zoo).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="ZooConfig override a.b=value (repeatable).")] = None,
    no_wandb: NoWandb = False,
) -> None:
    """Build every zoo member: train (skipped when the checkpoint's config hash matches), manifests, analyses, truth."""
    from evotool.config import load_config, merge, parse_set
    from evotool.zoo.build import ZooConfig, build_zoo

    data = {"out": str(out), "steps": steps, "jobs": jobs, "wandb": not no_wandb,
            "members": members or [], "configs": str(configs) if configs else None}
    cfg = load_config(ZooConfig, None, merge(data, parse_set(set_ or [])))
    status = build_zoo(cfg, set_ or [])
    failed = [name for name, code in status.items() if code]
    if failed:
        typer.echo(f"failed members: {', '.join(failed)} (see {cfg.out}/<member>/build.log)", err=True)
        raise typer.Exit(1)
    typer.echo(f"zoo in {cfg.out}: {', '.join(status)}")


@app.command("status")
def status(
    out: Annotated[Path, typer.Option(help="Zoo folder.")] = Path("runs/zoo"),
    configs: Annotated[Optional[Path], typer.Option(help="Folder of member YAMLs (default: configs/zoo).")] = None,
) -> None:
    """Print the member table: config, held-out metrics, behavioural boundaries, detector output."""
    from evotool.zoo.build import load_members
    from evotool.zoo.report import zoo_table

    typer.echo(zoo_table(load_members(configs), out))
