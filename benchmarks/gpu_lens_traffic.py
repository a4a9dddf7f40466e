"""What the trace adds to a memory-bound decode step: evotool's per-token work against a CUDA-graphed forward.

Eager decoding of the suite's 7B shape is bound by kernel launches (``gpu_decode_bound.py``), which hides a lens cost
of a few percent. Here each part is captured once in a CUDA graph and replayed, so its time is GPU work alone, as in a
compiled, memory-bound decode. On the random-weight world-LLaVA of ``gpu_suite.py`` (LLaVA-1.5-7B's decoder, bf16):

  forward   : one single-token forward of the decoder and its head, no cache: every weight read once, the floor of a
              decode step
  step      : evotool's per-token trace work on that forward's L+1 states, exactly what ``trace_batch`` runs after
              each forward: one head matmul over [2L+1, B, H] (lens and direct effect), then ``reduce_step``
  lens      : the stacked lens alone, one head matmul over [L+1, B, H] (the head read once)
  per_layer : the same lens applied layer by layer, L+1 head matmuls (the head read L+1 times)
  head      : the model's own head on the last state (read by every decode anyway)
  step_compiled (``--compile``): ``step`` through ``torch.compile(fullgraph=True)`` (inductor on CUDA, so its
              reductions are fused; dynamo's eager backend on CPU, which only checks that the step traces whole), and
              its largest difference from ``step`` over every float output

Printed and written (``--json``): each median time relative to ``forward``, and the bandwidth ``forward`` reaches
(weight bytes / time). The stacked and per-layer lens are compared (largest log-prob difference, same top-1). A part whose graph cannot be captured is
timed eagerly and marked so. On CPU the tiny ``dry`` shape runs eagerly, only to test the script.

    python benchmarks/gpu_lens_traffic.py --batch 1 --json lens_traffic.json     # on a GPU (about a minute)
    python benchmarks/gpu_lens_traffic.py --batch 8 --compile                     # with a fused step (compiles first)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_suite  # noqa: E402

from evotool.lens import NormedLens  # noqa: E402
from evotool.models.registry import decoder_parts  # noqa: E402
from evotool.trace import lens_with_direct, reduce_step  # noqa: E402


def replayer(fn: Callable[[], object], iters: int, cuda: bool) -> tuple[Callable[[], None], str]:
    """A callable running ``fn``'s GPU work ``iters`` times, from one captured CUDA graph where possible; and how
    ("graph", or "eager" with the reason capture failed, or "eager" off CUDA)."""
    def eager() -> None:
        for _ in range(iters):
            fn()

    if not cuda:
        return eager, "eager"
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()  # warm-up on a side stream, as capture requires
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as err:  # noqa: BLE001 - any capture failure falls back to eager timing, recorded
        torch.cuda.synchronize()
        return eager, f"eager ({type(err).__name__}: {str(err).splitlines()[0][:120]})"

    def replay() -> None:
        for _ in range(iters):
            graph.replay()

    return replay, "graph"


@torch.inference_mode()
def measure(batch: int, repeats: int, iters: int, compile_step: bool = False) -> dict[str, Any]:
    """Median seconds per call of each part (see the module docstring), their ratios to ``forward``, and checks."""
    cuda = torch.cuda.is_available()
    shape = gpu_suite.SHAPES["7b" if cuda else "dry"]
    model, _ = gpu_suite.build(shape, "cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32)
    parts = decoder_parts(model)
    lens = NormedLens(parts)
    embeds = parts.decoder.get_input_embeddings()(torch.randint(0, shape.vocab, (batch, 1), device=model.device))
    out = parts.decoder(inputs_embeds=embeds, use_cache=False, output_hidden_states=True)
    states = torch.stack(out.hidden_states).squeeze(2).clone()  # [L+1, B, H]

    def step(s: torch.Tensor) -> dict[str, torch.Tensor]:
        return reduce_step(*lens_with_direct(lens, s), s, 5)

    def stacked_lens() -> torch.Tensor:
        return lens.log_probs(states)

    def per_layer_lens() -> list[torch.Tensor]:
        return [lens.log_probs(s[None]) for s in states]

    stacked, per_layer = stacked_lens(), torch.cat(per_layer_lens())
    parts_fns: dict[str, Callable[[], object]] = {
        "forward": lambda: parts.lm_head(parts.decoder(inputs_embeds=embeds, use_cache=False).last_hidden_state),
        "step": lambda: step(states),
        "lens": stacked_lens,
        "per_layer": per_layer_lens,
        "head": lambda: parts.lm_head(states[-1]),
    }
    checks = {}
    if compile_step:
        compiled = torch.compile(step, fullgraph=True, backend="inductor" if cuda else "eager")
        parts_fns["step_compiled"] = lambda: compiled(states)
        eager_out, compiled_out = step(states), compiled(states)
        checks["compiled_max_abs_diff"] = max(float((eager_out[k] - compiled_out[k]).abs().nan_to_num().max())
                                              for k in eager_out if eager_out[k].is_floating_point())
        checks["compiled_same_tokens"] = bool(torch.equal(eager_out["topk_ids"], compiled_out["topk_ids"]))
    runs, how = {}, {}
    for name, fn in parts_fns.items():
        runs[name], how[name] = replayer(fn, iters, cuda)
    seconds = {name: s / iters for name, (s, _) in gpu_suite.timed(runs, model.device, repeats).items()}
    weight_bytes = sum(p.numel() * p.element_size() for p in {*parts.decoder.parameters(), *parts.lm_head.parameters()})
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "shape": "7b" if cuda else "dry", "batch": batch,
        "layers": parts.num_layers, "vocab": shape.vocab, "repeats": repeats, "iters": iters, "how": how,
        "seconds": seconds, "ratio_to_forward": {name: s / seconds["forward"] for name, s in seconds.items()},
        "forward_weight_gb": weight_bytes / 1e9, "forward_gb_per_s": weight_bytes / seconds["forward"] / 1e9,
        "lens_max_abs_diff": float((stacked - per_layer).abs().max()),
        "lens_top1_agrees": bool(torch.equal(stacked.argmax(-1), per_layer.argmax(-1))), **checks,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--iters", type=int, default=20, help="graph replays per timed call")
    parser.add_argument("--compile", action="store_true", help="also time the step through torch.compile")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    result = measure(args.batch, args.repeats, args.iters, args.compile)
    print(f"{result['device']}, {result['shape']} shape, batch {args.batch}, {result['layers']} layers, vocab "
          f"{result['vocab']}; median of {args.repeats} x {args.iters}; stacked vs per-layer lens: max |diff| "
          f"{result['lens_max_abs_diff']:.2g}, same top-1 {result['lens_top1_agrees']}")
    for name, seconds in result["seconds"].items():
        print(f"  {name:13s} {seconds * 1e6:9.1f} us  x{result['ratio_to_forward'][name]:.3f} of forward  "
              f"[{result['how'][name]}]")
    print(f"  forward reads {result['forward_weight_gb']:.2f} GB of weights: {result['forward_gb_per_s']:.0f} GB/s")
    if args.compile:
        print(f"  compiled step vs step: max |diff| {result['compiled_max_abs_diff']:.2g}, same top-k tokens "
              f"{result['compiled_same_tokens']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
