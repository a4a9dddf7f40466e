"""One command that measures evotool's costs on a GPU in minutes; ``--dry-run`` runs the same code on CPU.

On a random-weight LLaVA of LLaVA-1.5-7B's shape (bf16; CLIP-L tower on 336-px images, 576 image tokens; 32 x 4096
decoder, 32k vocabulary) the suite measures, writing ``OUT/gpu_suite.json`` and ``OUT/gpu_suite.md``:

1. analyze overhead: evotool's trace (normed lens at every layer and step) vs plain greedy ``generate``, batch 1
   and 8: time ratio and the extra peak memory (CUDA ``max_memory_allocated``; None on CPU);
2. prune: decode speedup of the model with 25% of its decoder layers removed (the first stable-stage layers of a
   synthetic stage file: critical layer at half depth, mutation stage in the last eighth) vs the ideal L/(L-k);
3. decoding methods: latency ratio vs greedy of DoLa, VCD and the stage-aware stage_contrast and
   stage_speculative (skipping the same layers in its draft), interleaved on the same batches;
4. 4-bit and 8-bit (bitsandbytes) load of the saved pruned checkpoint, one generation each (CUDA only: recorded
   as skipped elsewhere);
5. healing smoke run: QLoRA (4-bit base) for a few steps on CUDA, plain LoRA on the tiny model elsewhere.

    python benchmarks/gpu_suite.py --out runs/gpu_suite             # on a GPU (2 min on an H200 with 3 repeats, 9-token images)
    python benchmarks/gpu_suite.py --dry-run --out /tmp/gpu_suite   # CPU, tiny shapes (tests/test_gpu_suite.py)

Random weights: the timings and memory are those of the shape; no quality number comes from this suite.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

SCHEMA = "1.1"  # 1.1: methods = {latency_ratio, speculative}


@dataclass(frozen=True)
class Shape:
    """Model sizes and workload of one run of the suite."""

    vision_width: int
    vision_layers: int
    width: int
    layers: int
    heads: int
    mlp: int
    vocab: int
    new_tokens: int
    repeats: int
    samples: int  # samples per decoding-method latency measurement
    heal_steps: int
    image_size: int  # world images in px; grid x grid cells, one image token each
    grid: int
    context: int  # the decoder's context in tokens (the world tokenizer's 128 is too short for 576 image tokens)


SHAPES = {
    "7b": Shape(vision_width=1024, vision_layers=24, width=4096, layers=32, heads=32, mlp=11008, vocab=32000,
                new_tokens=32, repeats=9, samples=16, heal_steps=5, image_size=336, grid=24,
                context=4096),  # LLaVA-1.5's 576 image tokens and context
    "dry": Shape(vision_width=32, vision_layers=1, width=32, layers=8, heads=4, mlp=64, vocab=512,
                 new_tokens=4, repeats=1, samples=2, heal_steps=2, image_size=48, grid=3, context=128),
}
BATCHES = (1, 8)
METHODS = ("dola", "vcd", "stage_contrast", "stage_speculative")


def world(shape: Shape) -> Any:
    """The synthetic world of ``shape``'s images (the 7B shape: LLaVA-1.5's 336 px in 14-px patches, 576 tokens)."""
    from evotool.world import WorldConfig

    return WorldConfig(image_size=shape.image_size, grid=shape.grid)


def build(shape: Shape, device: str, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """A random-weight world-LLaVA of ``shape`` (vocabulary padded to ``shape.vocab``, EOS off) and its processor."""
    from evotool.world import ModelConfig, build_model, build_processor

    processor = build_processor(world(shape))
    processor.tokenizer.model_max_length = shape.context  # the model's max_position_embeddings
    sizes = ModelConfig(vision_width=shape.vision_width, vision_layers=shape.vision_layers, width=shape.width,
                        layers=shape.layers, heads=shape.heads, mlp=shape.mlp)
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(processor.tokenizer, world(shape), sizes)
        model.resize_token_embeddings(shape.vocab, mean_resizing=False)  # the LM head's real cost (the lens reads it at every layer)
    model.generation_config.eos_token_id = None  # fixed-length generation
    return model.to(dtype).eval(), processor


def samples_for(shape: Shape, n: int) -> list[Any]:
    """``n`` caption samples of ``shape``'s world."""
    from evotool.world import caption_records, records_to_samples

    return records_to_samples(caption_records(world(shape), n))


def inputs_for(model: nn.Module, processor: Any, shape: Shape, batch: int) -> dict[str, torch.Tensor]:
    from evotool.generation import build_inputs

    samples = samples_for(shape, batch)
    return build_inputs(processor, [s.image for s in samples], [s.prompt for s in samples], model.device, model.dtype)


def timed(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, tuple[float, float | None]]:
    """Per variant: (median seconds, median peak memory in MB above the memory before the call; None off CUDA).

    The variants run interleaved, each once per repeat after one warm-up each, so clock ramps and drift hit all alike.
    """
    from evotool.models.loading import synchronize

    for fn in fns.values():
        fn()  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    peaks: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
            if device.type == "cuda":
                peaks[name].append((torch.cuda.max_memory_allocated(device) - base) / 2**20)
    return {name: (statistics.median(seconds[name]), statistics.median(peaks[name]) if peaks[name] else None)
            for name in fns}


def analyze_overhead(model: nn.Module, processor: Any, shape: Shape) -> list[dict[str, Any]]:
    """Trace vs plain generate per batch size, interleaved: seconds, ratio, peak memory of each and the trace's extra."""
    from evotool.generation import generate_ids
    from evotool.lens import NormedLens
    from evotool.models.registry import decoder_parts
    from evotool.trace import trace_batch

    parts = decoder_parts(model)
    rows = []
    for batch in BATCHES:
        inputs = inputs_for(model, processor, shape, batch)
        res = timed({"generate": lambda: generate_ids(model, dict(inputs), shape.new_tokens),
                     "trace": lambda: trace_batch(model, parts, NormedLens(parts), dict(inputs), shape.new_tokens)},
                    model.device, shape.repeats)
        (plain_s, plain_mb), (trace_s, trace_mb) = res["generate"], res["trace"]
        rows.append({"batch": batch, "generate_s": plain_s, "trace_s": trace_s, "ratio": trace_s / plain_s,
                     "generate_peak_mb": plain_mb, "trace_peak_mb": trace_mb,
                     "extra_mb": trace_mb - plain_mb if trace_mb is not None and plain_mb is not None else None})
    return rows


def synthetic_stages(num_layers: int) -> Any:
    """A stage file for the random model: critical layer at half depth, mutation stage in the last eighth."""
    from evotool.stages import StageFile, stage_ranges

    critical, mutation = num_layers // 2, [num_layers - max(1, num_layers // 8) + 1]
    return StageFile.from_payload({"schema_version": "1.1", "model": "gpu_suite", "fingerprint": "0" * 16,
                                   "num_layers": num_layers, "critical_layer": critical, "mutation_layers": mutation,
                                   "stages": stage_ranges(num_layers, critical, mutation)})


def quarter(stages: Any) -> list[int]:
    """25% of the decoder layers (at least one): the first stable-stage layers after the critical layer."""
    first, last = stages.stable_range
    return list(range(first, last + 1))[: max(1, round(stages.num_layers / 4))]


def pruned_copy(model: nn.Module, shape: Shape) -> nn.Module:
    """A copy of ``model`` with 25% of its decoder layers removed (``quarter`` of the synthetic stage file)."""
    from evotool.prune.static import remove_layers

    pruned = copy.deepcopy(model)
    remove_layers(pruned, quarter(synthetic_stages(shape.layers)))
    return pruned


def prune_speed(model: nn.Module, pruned: nn.Module, processor: Any, shape: Shape) -> list[dict[str, Any]]:
    """Per batch size, the decode speedup of ``pruned`` over the full ``model`` vs the ideal L / (L - k)."""
    from evotool.prune.speed import measure, ratios

    removed = quarter(synthetic_stages(shape.layers))
    rows = []
    for batch in BATCHES:
        res = measure({"full": model, "pruned": pruned}, inputs_for(model, processor, shape, batch), shape.new_tokens,
                      shape.repeats)
        rows.append({"batch": batch, "removed": removed, **ratios(res["full"], res["pruned"], shape.layers, len(removed)),
                     "full_decode_tok_s": res["full"].decode_tok_s, "pruned_decode_tok_s": res["pruned"].decode_tok_s})
    return rows


def method_latency(model: nn.Module, processor: Any, shape: Shape) -> dict[str, Any]:
    """Latency ratio vs greedy of each decoding method, interleaved on the same batches (``latency_ratio``), and the
    speculative draft's counters (``speculative``: acceptance rate, tokens per verify step, forwards per token)."""
    from evotool.evals.harness import run_methods
    from evotool.mitigate.methods import BASELINE, build_method

    stages = synthetic_stages(shape.layers)
    options = {"stage_speculative": {"layers": quarter(stages)}}  # the pruned layers as the draft's skip set
    methods = {BASELINE: build_method(BASELINE, model)}
    methods.update({name: build_method(name, model, options.get(name, {}), stages) for name in METHODS})
    runner = run_methods(model, processor, methods, samples_for(shape, shape.samples), max(BATCHES), shape.new_tokens)
    return {"latency_ratio": {name: row["latency_ratio"] for name, row in runner.latency().items() if name != BASELINE},
            "speculative": methods["stage_speculative"].stats.summary()}


def quantized_loads(pruned: nn.Module, processor: Any, shape: Shape, folder: Path) -> dict[str, dict[str, Any]]:
    """Save the pruned checkpoint, load it in 4 and 8 bit and generate once (CUDA + bitsandbytes only)."""
    from evotool.generation import generate_ids
    from evotool.models.loading import load_model
    from evotool.options import LoadOptions

    pruned.save_pretrained(folder)
    processor.save_pretrained(folder)
    if not torch.cuda.is_available():
        return {q: {"status": "skipped: needs CUDA and bitsandbytes"} for q in ("4bit", "8bit")}
    rows = {}
    for q in ("4bit", "8bit"):
        start = time.perf_counter()
        model, _ = load_model(folder, LoadOptions(quantization=q, dtype="bfloat16"))
        loaded = time.perf_counter() - start
        gen_s, _ = timed({q: lambda: generate_ids(model, dict(inputs_for(model, processor, shape, 1)), shape.new_tokens)},
                         model.device, 1)[q]
        rows[q] = {"status": "ok", "load_s": loaded, "generate_s": gen_s,
                   "memory_mb": model.get_memory_footprint() / 2**20}
        del model
        torch.cuda.empty_cache()
    return rows


def heal_smoke(pruned: nn.Module, processor: Any, shape: Shape, folder: Path) -> dict[str, Any]:
    """A few LoRA steps on the pruned model: QLoRA on its 4-bit reload on CUDA, plain LoRA on it elsewhere."""
    from evotool.finetune import lora_finetune, world_samples
    from evotool.models.loading import load_model
    from evotool.options import LoadOptions, LoraSettings

    qlora = torch.cuda.is_available()
    model = load_model(folder, LoadOptions(quantization="4bit", dtype="bfloat16"))[0] if qlora else pruned
    settings = LoraSettings(steps=shape.heal_steps, batch_size=2, log_every=1, qlora=qlora)
    start = time.perf_counter()
    result = lora_finetune(model, processor, world_samples(4), settings)
    return {"kind": "qlora" if qlora else "lora", "steps": shape.heal_steps, "seconds": time.perf_counter() - start,
            "losses": result.losses, "trainable_parameters": result.trainable_parameters}


def markdown(report: dict[str, Any]) -> str:
    """The suite's results as Markdown tables: the parts measured so far, then the parts that failed."""
    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = [f"# evotool GPU suite ({report['device']}, {report['shape_name']}, {report['dtype']})"]
    if "analyze_overhead" in report:
        lines += ["", "| analyze overhead: batch | generate s | trace s | ratio | extra MB |", "|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {fmt(r['generate_s'])} | {fmt(r['trace_s'])} | {fmt(r['ratio'])} | {fmt(r['extra_mb'])} |"
                  for r in report["analyze_overhead"]]
    if "prune" in report:
        lines += ["", "| prune k=25%: batch | removed | decode speedup | ideal | efficiency |", "|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['removed']} | {fmt(r['decode_speedup'])} | {fmt(r['ideal'])} | {fmt(r['efficiency'])} |"
                  for r in report["prune"]]
    if "methods" in report:
        lines += ["", "| method | latency ratio vs greedy |", "|---|---|"]
        lines += [f"| {name} | {fmt(ratio)} |" for name, ratio in report["methods"]["latency_ratio"].items()]
        spec = report["methods"]["speculative"]
        lines += ["", f"stage_speculative draft: acceptance {fmt(spec['acceptance_rate'])}, {fmt(spec['tokens_per_step'])} "
                      f"tokens per verify step, {fmt(spec['forward_equivalents'])} forward passes per token."]
    if "quantized" in report:
        lines += ["", "| quantized load of the pruned checkpoint | status | load s | generate s | memory MB |",
                  "|---|---|---|---|---|"]
        lines += [f"| {q} | {r['status']} | {fmt(r.get('load_s'))} | {fmt(r.get('generate_s'))} | {fmt(r.get('memory_mb'))} |"
                  for q, r in report["quantized"].items()]
    if "heal" in report:
        heal = report["heal"]
        lines += ["", f"Healing smoke run: {heal['kind']}, {heal['steps']} steps in {heal['seconds']:.1f} s, "
                      f"loss {heal['losses'][0][1]:.3f} -> {heal['losses'][-1][1]:.3f}."]
    lines += [""] * bool(report["failed"]) + [f"- **{part} failed**: {error.splitlines()[0]}"
                                              for part, error in report["failed"].items()]
    lines += ["", f"Total: {report['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def run(out: Path, dry_run: bool) -> dict[str, Any]:
    """Run every part of the suite, writing ``gpu_suite.json`` and ``gpu_suite.md`` into ``out`` after each part.

    A part that raises is recorded under ``failed`` (type and message) and the suite goes on, so one missing
    package or one out-of-memory costs only that part's numbers.
    """
    from evotool.env import environment
    from evotool.io import atomic_write_text, write_json
    from evotool.validate import output_dir

    output_dir(out)
    cuda = torch.cuda.is_available() and not dry_run
    name = "dry" if dry_run else "7b"
    shape, device, dtype = SHAPES[name], "cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32
    start = time.perf_counter()
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda else "cpu", "shape_name": name,
                              "shape": asdict(shape), "dtype": str(dtype).removeprefix("torch."), "dry_run": dry_run,
                              "environment": environment(), "failed": {}, "seconds": 0.0}

    def part(key: str, measure: Callable[[], Any]) -> None:
        print(f"gpu_suite: {key} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        try:
            report[key] = measure()
        except Exception as exc:  # noqa: BLE001 - recorded in the report; the other parts still run
            report["failed"][key] = f"{type(exc).__name__}: {exc}"
        report["seconds"] = time.perf_counter() - start
        write_json(out / "gpu_suite.json", report, schema=SCHEMA)
        atomic_write_text(out / "gpu_suite.md", markdown(report))

    model, processor = build(shape, device, dtype)
    part("analyze_overhead", lambda: analyze_overhead(model, processor, shape))
    pruned = pruned_copy(model, shape)
    part("prune", lambda: prune_speed(model, pruned, processor, shape))
    part("methods", lambda: method_latency(model, processor, shape))
    del model
    if cuda:
        torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as tmp:
        part("quantized", lambda: quantized_loads(pruned, processor, shape, Path(tmp)))
        part("heal", lambda: heal_smoke(pruned, processor, shape, Path(tmp)))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_suite"), help="folder for gpu_suite.json / .md")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (the same code path)")
    args = parser.parse_args(argv)
    report = run(args.out, args.dry_run)
    sys.stdout.write(markdown(report))


if __name__ == "__main__":
    main()
