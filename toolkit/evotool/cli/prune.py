"""`evotool prune`: stage-guided layer removal into a new checkpoint (optionally healed with LoRA)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from evotool.cli.options import Device, Model, NoWandb


def command(
    model: Model = None,
    stages: Annotated[Optional[Path], typer.Option(help="stages.json of this model (default: run the analysis into OUT/analysis).")] = None,
    keep_critical: Annotated[bool, typer.Option("--keep-critical/--no-keep-critical", help="Never remove the critical layer.")] = True,
    keep_mutation: Annotated[bool, typer.Option("--keep-mutation/--no-keep-mutation", help="Stage selector: never remove mutation-stage layers.")] = True,
    drop: Annotated[Optional[int], typer.Option(help="Remove N layers.")] = None,
    ratio: Annotated[Optional[float], typer.Option(help="Remove this fraction of the decoder layers.")] = None,
    speedup: Annotated[Optional[float], typer.Option(help="Remove enough layers for this ideal speedup L/(L-k).")] = None,
    layers: Annotated[Optional[str], typer.Option(help="Remove exactly these layers, e.g. 9,10 (numbered 1..L as in the analysis).")] = None,
    selector: Annotated[Optional[str], typer.Option(help="stage, block-influence, angular, last or random.")] = None,
    redundancy: Annotated[Optional[str], typer.Option(help="Stage selector ranking: influence, js or cosine.")] = None,
    heal: Annotated[bool, typer.Option("--heal", help="LoRA-heal the pruned model on the synthetic world (adapter in OUT/adapter, merged model in OUT).")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Output checkpoint folder.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML config (default: the packaged configs/prune.yaml).")] = None,
    eval_n: Annotated[Optional[int], typer.Option(help="World eval records per task and group (0: skip).")] = None,
    speed: Annotated[bool, typer.Option("--speed", help="Also measure prefill / decode speed of full vs pruned.")] = False,
    no_wandb: NoWandb = False,
    dtype: Annotated[Optional[str], typer.Option(help="auto, float32, float16 or bfloat16.")] = None,
    device: Device = None,
) -> None:
    """Remove redundant stable-stage decoder layers (keeping the critical layer) into a new checkpoint."""
    from evotool.errors import ConfigError
    from evotool.models.loading import LoadOptions
    from evotool.recipes.prune_pipeline import load_config, run

    overrides: dict = {"keep_critical": keep_critical, "keep_mutation": keep_mutation}
    if any(x is not None for x in (drop, ratio, speedup, layers)):
        try:
            explicit = [int(x) for x in layers.split(",") if x.strip()] if layers else None
        except ValueError as err:
            raise ConfigError(f"--layers expects comma-separated integers, got {layers!r}") from err
        overrides.update(drop=drop, ratio=ratio, speedup=speedup, layers=explicit)
    for key, value in {"model": model, "stages": stages, "selector": selector, "redundancy": redundancy, "out": out,
                       "eval_n": eval_n}.items():
        if value is not None:
            overrides[key] = value
    if heal:
        overrides["heal"] = True
    if speed:
        overrides["speed"] = True
    if no_wandb:
        overrides["wandb"] = False
    if dtype is not None or device is not None:
        overrides["load"] = LoadOptions(dtype=dtype or "auto", device=device)
    cfg = load_config(config, overrides)
    record = run(cfg)
    typer.echo(f"removed layers {record['removed_layers']} ({record['selector']}), kept {record['kept_layers']}")
    for name, row in (record.get("metrics") or {}).items():
        typer.echo(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)))
    typer.echo(f"wrote {cfg.out} ({cfg.out / 'prune.json'}, {cfg.out / 'README.md'})")
