"""`evotool analyze`: the three-level knowledge-evolution analysis."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from evotool.cli.options import Device, Model, NoWandb


def parse_mapping(text: str | None) -> dict[str, str]:
    """``"a=b,c=d"`` -> ``{"a": "b", "c": "d"}``."""
    from evotool.errors import ConfigError

    if not text:
        return {}
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if any(len(p) != 2 for p in pairs):
        raise ConfigError(f"--columns expects field=column pairs separated by commas, got {text!r}")
    return {k.strip(): v.strip() for k, v in pairs}


def command(
    model: Model = None,
    data: Annotated[Optional[str], typer.Option(help="Folder of images, JSONL manifest or dataset (default: synthetic world sample).")] = None,
    split: Annotated[str, typer.Option(help="Dataset split when --data is a datasets dataset.")] = "train",
    columns: Annotated[Optional[str], typer.Option(help="Dataset column mapping, e.g. image=img,prompt=question,objects=labels.")] = None,
    prompt: Annotated[str, typer.Option(help="Prompt for images without their own.")] = "Please describe this image in detail.",
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens per sample.")] = 256,
    lens: Annotated[str, typer.Option(help="normed (final norm at every layer) or reference (the paper's raw readout).")] = "normed",
    out: Annotated[Path, typer.Option(help="Run directory (re-running resumes).")] = Path("runs/analyze"),
    no_wandb: NoWandb = False,
    no_figures: Annotated[bool, typer.Option("--no-figures", help="Skip the PNG figures.")] = False,
    patch_lens: Annotated[bool, typer.Option("--patch-lens", help="Also read the lens at every image patch and layer at step 0.")] = False,
    on_error: Annotated[str, typer.Option(help="skip: report a bad sample and go on; fail: stop.")] = "skip",
    batch_size: Annotated[int, typer.Option(help="Samples per generation batch.")] = 4,
    limit: Annotated[Optional[int], typer.Option(help="Analyse at most this many samples.")] = None,
    js_unit: Annotated[str, typer.Option(help="nats or bits.")] = "nats",
    dtype: Annotated[str, typer.Option(help="auto, float32, float16 or bfloat16.")] = "auto",
    device: Device = None,
    device_map: Annotated[Optional[str], typer.Option(help="e.g. auto, to shard a model over GPUs.")] = None,
    quantization: Annotated[Optional[str], typer.Option(help="4bit or 8bit (bitsandbytes).")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the model repo's own code.")] = False,
    world_samples: Annotated[int, typer.Option(help="Synthetic samples when --data is not given.")] = 16,
    stable_fraction: Annotated[float, typer.Option(help="Quiet step: JS below this fraction of the token's peak.")] = 0.1,
    mutation_ratio: Annotated[float, typer.Option(help="Mutation spike / median JS after the critical layer.")] = 4.0,
) -> None:
    """Trace every layer of a VLM while it generates; find the critical and mutation layers."""
    from evotool.analysis.run import AnalyzeConfig, run_analysis
    from evotool.models.loading import LoadOptions
    from evotool.stages import StageConfig

    cfg = AnalyzeConfig(
        model=model, data=data, split=split, columns=parse_mapping(columns), prompt=prompt, max_new_tokens=max_new_tokens, lens=lens, out=out,
        batch_size=batch_size, limit=limit, js_unit=js_unit, figures=not no_figures, patch_lens=patch_lens, on_error=on_error, wandb=not no_wandb,
        world_samples=world_samples,
        load=LoadOptions(dtype=dtype, device=device, device_map=device_map, quantization=quantization,
                         trust_remote_code=trust_remote_code),
        stages=StageConfig(stable_fraction=stable_fraction, mutation_ratio=mutation_ratio),
    )
    path = run_analysis(cfg)
    if path.is_file():
        from evotool.stages import StageFile

        st = StageFile.read(path)
        typer.echo(f"critical layer {st.critical_layer}, mutation layers {st.mutation_layers}, "
                   f"stages {st.boundaries()['stages']}")
        typer.echo(f"wrote {path}, {path.parent / 'report.md'} and {path.parent / 'report.html'}")
