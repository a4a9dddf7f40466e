"""`evotool mitigate`: tune a hallucination-mitigation method for one model (``--method``, on the synthetic world),
or choose one among all methods on a validation manifest (``--data``), and record it in a run directory."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from evotool.cli.options import option, overrides
from evotool.mitigate.config import MitigateConfig as C


def command(
    method: Annotated[Optional[str], option(C, "method")] = None,
    data: Annotated[Optional[str], option(C, "data")] = None,
    methods: Annotated[Optional[str], option(C, "methods")] = None,
    objective: Annotated[Optional[str], option(C, "choice.objective")] = None,
    max_recall_loss: Annotated[Optional[float], option(C, "choice.max_recall_loss")] = None,
    max_latency_ratio: Annotated[Optional[float], option(C, "choice.max_latency_ratio")] = None,
    guard: Annotated[Optional[list[str]], option(C, "choice.guards", "--guard")] = None,
    min_win_rate: Annotated[Optional[float], option(C, "choice.min_win_rate")] = None,
    vocab: Annotated[Optional[str], option(C, "vocab")] = None,
    limit: Annotated[Optional[int], option(C, "limit")] = None,
    model: Annotated[Optional[str], option(C, "model")] = None,
    gpus_per_process: Annotated[Optional[int], option(C, "load.gpus_per_process")] = None,
    stages: Annotated[Optional[str], option(C, "stages")] = None,
    set_: Annotated[Optional[list[str]], option(C, "options", "--set")] = None,
    grid: Annotated[Optional[list[str]], option(C, "grid", "--grid")] = None,
    tune: Annotated[Optional[bool], option(C, "tune", "--tune/--no-tune")] = None,
    n: Annotated[Optional[int], option(C, "n", "--n", "--records")] = None,
    seed: Annotated[Optional[int], option(C, "seed")] = None,
    batch_size: Annotated[Optional[int], option(C, "batch_size")] = None,
    lora_steps: Annotated[Optional[int], option(C, "lora.steps", "--lora-steps")] = None,
    out: Annotated[Optional[str], option(C, "out")] = None,
    wandb: Annotated[Optional[bool], option(C, "wandb", "--wandb/--no-wandb")] = None,
    push_to_hub: Annotated[Optional[str], option(C, "push_to_hub")] = None,
) -> None:
    """Tune and record a mitigation method (or choose one on --data); `evotool eval ... --method RUN_DIR` then decodes with it."""
    from evotool.config import load_config, parse_set
    from evotool.mitigate.choose import run_choice
    from evotool.mitigate.run import run_mitigate

    flags = {"method": method, "data": data, "methods": methods, "choice.objective": objective,
             "choice.max_recall_loss": max_recall_loss, "choice.max_latency_ratio": max_latency_ratio,
             "choice.guards": parse_set(guard or []) or None, "choice.min_win_rate": min_win_rate, "vocab": vocab,
             "limit": limit, "model": model, "load.gpus_per_process": gpus_per_process, "stages": stages,
             "options": parse_set(set_ or []) or None,
             "grids" if data else "grid": parse_set(grid or []) or None, "tune": tune, "n": n, "seed": seed,
             "batch_size": batch_size, "lora.steps": lora_steps, "out": out, "wandb": wandb,
             "push_to_hub": push_to_hub}
    cfg = load_config(C, None, overrides(flags))
    path = run_choice(cfg) if cfg.data is not None else run_mitigate(cfg)
    typer.echo(f"wrote {path}")
