"""`evotool world`: write a split of the synthetic world as images + a JSONL manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from evotool.errors import ConfigError
from evotool.validate import at_least, output_dir
from evotool.world.generator import SPLITS, TASKS, WorldConfig, make_records, write_manifest


def command(
    out: Annotated[Path, typer.Option("--out", help="output folder (images/ and manifest.jsonl)")],
    task: Annotated[str, typer.Option(help=f"one of {', '.join(TASKS)}, or 'all'")] = "caption",
    split: Annotated[str, typer.Option(help=f"one of {', '.join(SPLITS)} (train captions carry phantom mentions)")] = "test",
    n: Annotated[int, typer.Option("--n", help="records per task")] = 100,
    seed: Annotated[int, typer.Option(help="world seed")] = 0,
    cooccurrence: Annotated[float, typer.Option(help="P(square | circle) in train/test scenes")] = 0.8,
) -> None:
    """Write a synthetic-world split (images + manifest.jsonl readable by --data)."""
    tasks = TASKS if task == "all" else (task,)
    if task != "all" and task not in TASKS:
        raise ConfigError(f"unknown task {task!r} (choose from {', '.join(TASKS)}, all)")
    at_least(1, n=n)
    output_dir(out)
    world = WorldConfig(seed=seed, cooccurrence=cooccurrence)
    records = [r for t in tasks for r in make_records(t, split, n, world)]
    manifest = write_manifest(records, out, world)
    typer.echo(f"wrote {len(records)} records to {manifest}")
