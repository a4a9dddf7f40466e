"""`evotool prune`: stage-guided layer removal into a new checkpoint (optionally healed with LoRA)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from evotool.cli.options import ConfigFile, SetPairs, option, overrides
from evotool.prune.config import PruneConfig as C


def command(
    model: Annotated[Optional[str], option(C, "model")] = None,
    stages: Annotated[Optional[str], option(C, "stages")] = None,
    keep_critical: Annotated[Optional[bool], option(C, "keep_critical", "--keep-critical/--no-keep-critical")] = None,
    keep_mutation: Annotated[Optional[bool], option(C, "keep_mutation", "--keep-mutation/--no-keep-mutation")] = None,
    drop: Annotated[Optional[int], option(C, "drop")] = None,
    ratio: Annotated[Optional[float], option(C, "ratio")] = None,
    speedup: Annotated[Optional[float], option(C, "speedup")] = None,
    layers: Annotated[Optional[str], option(C, "layers")] = None,
    selector: Annotated[Optional[str], option(C, "selector")] = None,
    redundancy: Annotated[Optional[str], option(C, "redundancy")] = None,
    heal: Annotated[Optional[bool], option(C, "heal", "--heal/--no-heal")] = None,
    out: Annotated[Optional[str], option(C, "out")] = None,
    eval_n: Annotated[Optional[int], option(C, "eval_n")] = None,
    speed: Annotated[Optional[bool], option(C, "speed", "--speed/--no-speed")] = None,
    wandb: Annotated[Optional[bool], option(C, "wandb", "--wandb/--no-wandb")] = None,
    push_to_hub: Annotated[Optional[str], option(C, "push_to_hub")] = None,
    compare: Annotated[Optional[bool], option(C, "compare", "--compare/--no-compare")] = None,
    data: Annotated[Optional[str], option(C, "data")] = None,
    search_data: Annotated[Optional[str], option(C, "search_data")] = None,
    vocab: Annotated[Optional[str], option(C, "vocab")] = None,
    limit: Annotated[Optional[int], option(C, "limit")] = None,
    dtype: Annotated[Optional[str], option(C, "load.dtype")] = None,
    device: Annotated[Optional[str], option(C, "load.device")] = None,
    config: ConfigFile = None,
    set_: SetPairs = None,
) -> None:
    """Remove redundant stable-stage decoder layers (keeping the critical layer) into a new checkpoint; with
    --compare --data, compare every selector with the best removal found by search instead."""
    from evotool.config import load_config
    from evotool.prune.evaluate import headline
    from evotool.prune.run import run_prune

    flags = {"model": model, "stages": stages, "keep_critical": keep_critical, "keep_mutation": keep_mutation,
             "selector": selector, "redundancy": redundancy, "heal": heal, "out": out, "eval_n": eval_n, "speed": speed,
             "wandb": wandb, "push_to_hub": push_to_hub, "load.dtype": dtype, "load.device": device, "compare": compare,
             "data": data, "search_data": search_data, "vocab": vocab, "limit": limit}
    budget = {"drop": drop, "ratio": ratio, "speedup": speedup, "layers": layers}
    given = overrides(flags, set_)
    if any(v is not None for v in budget.values()):  # one budget flag replaces the config file's budget
        given = {**budget, **given}
    cfg = load_config(C, config, given, default="prune.yaml")
    if cfg.compare:
        from evotool.prune.oracle import compare_with_oracle

        result = compare_with_oracle(cfg)
        for name, row in result["rows"].items():
            share = f" ({row['of_oracle']:.2f} of the oracle's)" if "of_oracle" in row else ""
            typer.echo(f"{name}: " + (row["note"] if "note" in row else
                                      f"removed {row['removed']}, agreement {row['agreement']:.3f}{share}"))
        typer.echo(f"wrote {cfg.out / 'oracle.json'}, {cfg.out / 'oracle.md'}")
        return
    record = run_prune(cfg)
    typer.echo(f"removed layers {record['removed_layers']} ({record['selector']}), kept {record['kept_layers']}")
    for name, row in (record.get("metrics") or {}).items():
        typer.echo(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in headline(row).items()))
    typer.echo(f"wrote {cfg.out} ({cfg.out / 'prune.json'}, {cfg.out / 'README.md'})")
    if record.get("hub_url"):
        typer.echo(f"pushed to {record['hub_url']}")
