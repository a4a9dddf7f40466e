"""`evotool analyze`: the three-level knowledge-evolution analysis."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from evotool.analysis.config import AnalyzeConfig as C
from evotool.cli.options import ConfigFile, SetPairs, option, overrides


def command(
    model: Annotated[Optional[str], option(C, "model")] = None,
    data: Annotated[Optional[str], option(C, "data")] = None,
    split: Annotated[Optional[str], option(C, "split")] = None,
    columns: Annotated[Optional[str], option(C, "columns")] = None,
    prompt: Annotated[Optional[str], option(C, "prompt")] = None,
    max_new_tokens: Annotated[Optional[int], option(C, "max_new_tokens")] = None,
    lens: Annotated[Optional[str], option(C, "lens")] = None,
    out: Annotated[Optional[str], option(C, "out")] = None,
    wandb: Annotated[Optional[bool], option(C, "wandb", "--wandb/--no-wandb")] = None,
    figures: Annotated[Optional[bool], option(C, "figures", "--figures/--no-figures")] = None,
    patch_lens: Annotated[Optional[bool], option(C, "patch_lens", "--patch-lens/--no-patch-lens")] = None,
    on_error: Annotated[Optional[str], option(C, "on_error")] = None,
    restart: Annotated[Optional[bool], option(C, "restart", "--restart/--no-restart")] = None,
    batch_size: Annotated[Optional[int], option(C, "batch_size")] = None,
    limit: Annotated[Optional[int], option(C, "limit")] = None,
    js_unit: Annotated[Optional[str], option(C, "js_unit")] = None,
    dtype: Annotated[Optional[str], option(C, "load.dtype")] = None,
    device: Annotated[Optional[str], option(C, "load.device")] = None,
    device_map: Annotated[Optional[str], option(C, "load.device_map")] = None,
    quantization: Annotated[Optional[str], option(C, "load.quantization")] = None,
    gpus_per_process: Annotated[Optional[int], option(C, "load.gpus_per_process")] = None,
    trust_remote_code: Annotated[Optional[bool], option(C, "load.trust_remote_code", "--trust-remote-code/--no-trust-remote-code")] = None,
    world_samples: Annotated[Optional[int], option(C, "world_samples")] = None,
    critical_rule: Annotated[Optional[str], option(C, "stages.critical_rule")] = None,
    depth_share: Annotated[Optional[float], option(C, "stages.depth_share")] = None,
    object_share: Annotated[Optional[float], option(C, "stages.object_share")] = None,
    rise_fraction: Annotated[Optional[float], option(C, "stages.rise_fraction")] = None,
    mutation_signal: Annotated[Optional[str], option(C, "stages.mutation_signal")] = None,
    mutation_ratio: Annotated[Optional[float], option(C, "stages.mutation_ratio")] = None,
    config: ConfigFile = None,
    set_: SetPairs = None,
) -> None:
    """Trace every layer of a VLM while it generates; find the critical and mutation layers."""
    from evotool.analysis.run import run_analysis
    from evotool.config import load_config, parse_set
    from evotool.stages import StageFile

    flags = {"model": model, "data": data, "split": split, "columns": parse_set(columns.split(",")) if columns else None,
             "prompt": prompt, "max_new_tokens": max_new_tokens, "lens": lens, "out": out, "wandb": wandb,
             "figures": figures, "patch_lens": patch_lens, "on_error": on_error, "restart": restart, "batch_size": batch_size, "limit": limit, "js_unit": js_unit,
             "load.dtype": dtype, "load.device": device, "load.device_map": device_map, "load.quantization": quantization,
             "load.gpus_per_process": gpus_per_process,
             "load.trust_remote_code": trust_remote_code, "world_samples": world_samples,
             "stages.critical_rule": critical_rule, "stages.depth_share": depth_share,
             "stages.object_share": object_share,
             "stages.rise_fraction": rise_fraction, "stages.mutation_signal": mutation_signal,
             "stages.mutation_ratio": mutation_ratio}
    path = run_analysis(load_config(C, config, overrides(flags, set_)))
    if path.is_file():
        st = StageFile.read(path)
        interval = st.payload.get("interval", {})
        typer.echo(f"critical layer {st.critical_layer} (interval {interval.get('critical')}), mutation layers "
                   f"{st.mutation_layers} (interval {interval.get('mutation')}), stages {st.boundaries()['stages']}")
        st.warn_flags()
        typer.echo(f"wrote {path}, {path.parent / 'report.md'} and {path.parent / 'report.html'}")
