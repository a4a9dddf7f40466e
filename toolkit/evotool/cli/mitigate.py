"""`evotool mitigate`: tune a hallucination-mitigation method for one model and record it in a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from evotool.cli.options import Model, NoWandb


def command(
    method: Annotated[str, typer.Option(help="stable_readout, smoothing, stage_contrast (tuned), dola, vcd, greedy, or lora_mutation / lora_all (fine-tuned).")],
    model: Model = None,
    stages: Annotated[Optional[str], typer.Option(help="stages.json (or analyze run dir) of this model.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Fixed method option key=value (repeatable).")] = None,
    grid: Annotated[Optional[list[str]], typer.Option("--grid", help="Tuning grid key=v1,v2 (repeatable; replaces the default grid).")] = None,
    tune: Annotated[bool, typer.Option(help="Pick the stage-aware options on the world validation split.")] = True,
    n: Annotated[int, typer.Option("--n", help="Validation records per world task and group.")] = 100,
    seed: Annotated[int, typer.Option(help="World seed of the validation split (test uses 0).")] = 1,
    batch_size: Annotated[int, typer.Option(help="Samples per generation batch.")] = 50,
    lora_steps: Annotated[int, typer.Option(help="LoRA optimizer steps (trained methods; equal for both).")] = 100,
    out: Annotated[Path, typer.Option(help="Run directory (method.json, tuning.json).")] = Path("runs/mitigate"),
    no_wandb: NoWandb = False,
) -> None:
    """Tune and record a mitigation method; `evotool eval ... --method RUN_DIR` then decodes with it."""
    from evotool.finetune import LoraSettings
    from evotool.mitigate.methods import make_config, parse_overrides
    from evotool.mitigate.run import TRAINED, MitigateConfig, run_mitigate

    options = parse_overrides(set_ or [])
    if method not in TRAINED:
        make_config(method, options)
    option_grid = None
    if grid:
        import yaml

        option_grid = {k: [yaml.safe_load(v) for v in values.split(",")] for k, values in parse_overrides(grid).items()}
    cfg = MitigateConfig(method=method, model=model, stages=stages, options=options, grid=option_grid, tune=tune, n=n, seed=seed,
                         batch_size=batch_size, out=out, wandb=not no_wandb,
                         lora=LoraSettings(steps=lora_steps))
    path = run_mitigate(cfg)
    typer.echo(f"wrote {path}")
