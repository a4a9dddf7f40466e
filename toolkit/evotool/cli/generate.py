"""`evotool generate`: generations for a manifest (or the synthetic world) with any decoding method.

Prints ``id<TAB>text`` per sample; with ``--out DIR`` also writes ``DIR/generations.jsonl`` (one record per
sample: ``id``, ``prompt``, ``text``, ``tokens``) and ``DIR/generate.json`` (``schema_version``, model,
method description, sample and token counts, seconds, tokens/s; for ``stage_speculative`` the draft
plan, acceptance and, with ``--skip auto``, the calibration table).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from evotool.cli.options import Device, Model, load_command_model

SCHEMA_VERSION = "1.0"


def command(
    model: Model = None,
    data: Annotated[Optional[str], typer.Option(help="JSONL manifest, image folder or dataset (default: held-out synthetic-world captions).")] = None,
    prompt: Annotated[str, typer.Option(help="Prompt for records without their own.")] = "Please describe this image in detail.",
    limit: Annotated[Optional[int], typer.Option(help="At most this many samples (default: all; world: 8).")] = None,
    method: Annotated[str, typer.Option(help="A decoding method (greedy, stage_speculative, dola, ...) or a mitigate run dir.")] = "greedy",
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Method option key=value (repeatable).")] = None,
    stages: Annotated[Optional[str], typer.Option(help="stages.json (or analyze run dir) of this model.")] = None,
    skip: Annotated[Optional[str], typer.Option(help="stage_speculative: N (the N most redundant stable-stage layers) or auto (calibrated on the first samples of --data).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="New tokens per sample.")] = 64,
    batch_size: Annotated[int, typer.Option(help="Samples per generation batch.")] = 8,
    out: Annotated[Optional[Path], typer.Option(help="Also write generations.jsonl and generate.json here.")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, float16 or bfloat16.")] = "auto",
    device: Device = None,
) -> None:
    """Generate for every sample with one decoding method (e.g. lossless stage_speculative) and print the texts."""
    from evotool.config import parse_set
    from evotool.data.inputs import load_samples
    from evotool.errors import ConfigError
    from evotool.generation import batches, load_images
    from evotool.io import atomic_write_text, write_json
    from evotool.mitigate.methods import make_config
    from evotool.mitigate.run import method_for, resolve_spec
    from evotool.world import default_samples

    from evotool.validate import at_least, device as check_device, output_dir

    at_least(1, max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit)
    check_device(device)
    if out is not None:
        output_dir(out)
    options = parse_set(set_ or [])
    spec = resolve_spec(method, options, stages)
    if skip is not None:
        if spec.method != "stage_speculative":
            raise ConfigError("--skip applies to --method stage_speculative")
        spec.options["skip"] = skip
    make_config(spec.method, spec.options)  # option errors before the model loads
    samples = load_samples(data, prompt, limit=limit) if data else default_samples(limit or 8)
    m, p, model_id = load_command_model(model or spec.model, dtype, device)
    chosen = method_for(m, spec)
    calibrated_on = None
    if spec.method == "stage_speculative" and chosen.plan is None:  # auto (or influence ranking): needs data
        chosen.processor = p
        own = samples[: chosen.config.calibration_samples] if data and chosen.config.calibration_data is None else None
        chosen.resolve(batch_size, own)
        if chosen.calibration is not None:
            calibrated_on = (f"the first {len(own)} samples of {data}" if own else
                             chosen.config.calibration_data or "synthetic-world training samples")
            plan = f"skip {chosen.plan.skip}, max_draft {chosen.plan.max_draft}" if chosen.plan.skip else "plain greedy"
            typer.echo(f"calibrated on {calibrated_on}: {plan} (fastest candidate re-measured at "
                       f"{chosen.calibration.confirmed_speedup:.3f}x greedy)", err=True)
    records, seconds = [], 0.0
    for chunk in batches(samples, batch_size):
        _, images = load_images(chunk)
        tick = time.perf_counter()
        ids, texts = chosen.generate(m, p, images, [s.prompt for s in chunk], max_new_tokens)
        seconds += time.perf_counter() - tick
        for sample, row, text in zip(chunk, ids, texts):
            records.append({"id": sample.id, "prompt": sample.prompt, "text": text, "tokens": len(row)})
            typer.echo(f"{sample.id}\t{text}")
    tokens = sum(r["tokens"] for r in records)
    summary = {"model": model_id, "data": data or "synthetic world (held-out captions)",
               "method": chosen.describe(), "samples": len(records), "new_tokens": tokens, "seconds": seconds,
               "tokens_per_s": tokens / seconds if seconds else None, "max_new_tokens": max_new_tokens,
               "batch_size": batch_size, "calibrated_on": calibrated_on}
    typer.echo(f"{len(records)} samples, {tokens} tokens in {seconds:.2f} s ({summary['tokens_per_s']:.1f} tokens/s)", err=True)
    if out is not None:
        atomic_write_text(out / "generations.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        write_json(out / "generate.json", summary, schema=SCHEMA_VERSION)
        typer.echo(f"wrote {out / 'generations.jsonl'} and {out / 'generate.json'}", err=True)
