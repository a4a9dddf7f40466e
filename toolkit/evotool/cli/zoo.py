"""`evotool zoo build | status`: the model zoo (cached checkpoints), its manifests, analyses and ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from evotool.cli.options import ConfigFile, SetPairs, option, overrides
from evotool.zoo.config import ZooConfig as C

SEALED_HELP = ("Comma-separated splits to leave unread (a holdout being built or not yet due to be read): their members "
               "are neither loaded nor shown.")


def _splits(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


app = typer.Typer(help="The model zoo: many small world VLMs with behavioural ground truth.", no_args_is_help=True)


@app.command("build")
def build(
    out: Annotated[Optional[Path], option(C, "out")] = None,
    members: Annotated[Optional[list[str]], option(C, "members")] = None,
    steps: Annotated[Optional[list[str]], option(C, "steps")] = None,
    jobs: Annotated[Optional[int], option(C, "jobs")] = None,
    configs: Annotated[Optional[Path], option(C, "configs")] = None,
    wandb: Annotated[Optional[bool], option(C, "wandb", "--wandb/--no-wandb")] = None,
    config: ConfigFile = None,
    set_: SetPairs = None,
) -> None:
    """Build zoo members: train (skipped when the checkpoint's config hash matches), manifests, analyses, truth."""
    from evotool.config import load_config
    from evotool.zoo.build import build_zoo

    flags = {"out": out, "members": members and ",".join(members), "steps": steps and ",".join(steps), "jobs": jobs,
             "configs": configs, "wandb": wandb}  # repeated or comma-separated
    cfg = load_config(C, config, overrides(flags, set_))
    status = build_zoo(cfg)
    failed = [name for name, code in status.items() if code]
    if failed:
        typer.echo(f"failed members: {', '.join(failed)} (see {cfg.out}/<member>/build.log)", err=True)
        raise typer.Exit(1)
    typer.echo(f"zoo in {cfg.out}: {', '.join(status)}")


@app.command("status")
def status(
    out: Annotated[Optional[Path], option(C, "out")] = None,
    configs: Annotated[Optional[Path], option(C, "configs")] = None,
    refresh: Annotated[bool, typer.Option(help="Rewrite behaviour.json files whose stored boundaries are stale "
                                               "(re-derived from their curves under the current rules).")] = False,
    sealed: Annotated[str, typer.Option(help=SEALED_HELP)] = "",
    config: ConfigFile = None,
    set_: SetPairs = None,
) -> None:
    """Print the member table: config, held-out metrics, behavioural boundaries (current rules), detector output.
    ``--config`` / ``--set``: the build's settings (a truth measured otherwise is marked)."""
    from evotool.config import load_config
    from evotool.errors import InputError
    from evotool.zoo.build import refresh_truth
    from evotool.zoo.config import load_members
    from evotool.zoo.report import zoo_table

    cfg = load_config(C, config, overrides({"out": out, "configs": configs}, set_))
    if not cfg.out.is_dir():
        raise InputError(f"--out {cfg.out}: no zoo there (not a folder); build one with "
                         f"`evotool zoo build --out {cfg.out}`")
    members = load_members(cfg.configs, sealed=_splits(sealed))
    if refresh:
        rewritten = refresh_truth(list(members), cfg.out, cfg.behaviour.rules)
        typer.echo(f"refreshed boundaries of {len(rewritten)} member(s): {', '.join(rewritten) or '-'}", err=True)
    typer.echo(zoo_table(members, cfg.out, cfg.behaviour))


@app.command("tune")
def tune(
    grid: Annotated[list[str], typer.Option(help="Stage option and the values to try, name=v1,v2,... (repeatable; "
                                                 "every combination is tried), e.g. object_share=0.8,0.9.")],
    out: Annotated[Path, option(C, "out")] = C.out,
    configs: Annotated[Optional[Path], option(C, "configs")] = None,
    choose_on: Annotated[str, typer.Option(help="Comma-separated splits the choice may read; the others are "
                                                "reported as held out.")] = "tune",
    sealed: Annotated[str, typer.Option(help=SEALED_HELP)] = "",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the sweep (every point's counts and "
                                                                     "misses) to this JSON file.")] = None,
    by_split: Annotated[bool, typer.Option("--by-split",
                                           help="Also print every point's counts split by split.")] = False,
) -> None:
    """Sweep detector thresholds over the built members' saved analyses: choose on some splits, report the rest."""
    from evotool.errors import InputError
    from evotool.io import write_json
    from evotool.zoo.config import load_members
    from evotool.zoo.tune import SCHEMA_VERSION, SweepSpec, load_runs, parse_grid, sweep, sweep_table

    if not out.is_dir():
        raise InputError(f"--out {out}: no zoo there (not a folder); build one with `evotool zoo build --out {out}`")
    spec = SweepSpec(parse_grid(grid), _splits(choose_on), _splits(sealed))
    runs, skipped = load_runs(load_members(configs, sealed=spec.sealed), out)
    if skipped:
        typer.echo(f"skipped {len(skipped)} member(s) without both analyses and a ground truth: {', '.join(skipped)}",
                   err=True)
    payload = sweep(runs, spec)
    if json_out:
        write_json(json_out, payload, SCHEMA_VERSION)
    typer.echo(sweep_table(payload, by_split))
