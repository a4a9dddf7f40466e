"""Is greedy decoding of the suite's 7B shape bound by the host? Interleaved timings of four ways to decode.

On the random-weight world-LLaVA of ``gpu_suite.py`` (LLaVA-1.5-7B's decoder, bf16 on CUDA; its tiny ``dry`` shape
on CPU), for one batch size, each variant once per repeat after a warm-up each, ``new_tokens`` tokens:

  plain     : ``model.generate`` greedy (:func:`evotool.generation.generate_ids`)
  trace     : evotool's trace (lens and direct effect at every layer and step, what ``analyze`` runs)
  lens_only : the same without the direct effect
  forwards  : prefill, then one cached single-token forward per token in a plain Python loop (no ``generate``)

If ``forwards`` is as slow as ``plain``, the time goes to launching the eager forward, not to ``generate``'s
bookkeeping nor to reading weights, and a lens cost of a few percent is below what this regime can resolve.

    python benchmarks/gpu_decode_bound.py --batch 1 --repeats 15      # on a GPU (about a minute)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_suite  # noqa: E402

from evotool.generation import generate_ids  # noqa: E402
from evotool.models.compat import CACHE_KEY  # noqa: E402
from evotool.lens import NormedLens  # noqa: E402
from evotool.models.registry import decoder_parts  # noqa: E402
from evotool.trace import trace_batch  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    shape = gpu_suite.SHAPES["7b" if cuda else "dry"]
    model, processor = gpu_suite.build(shape, "cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32)
    parts, n = decoder_parts(model), shape.new_tokens
    inputs = gpu_suite.inputs_for(model, processor, shape, args.batch)

    def forwards() -> None:
        with torch.inference_mode():
            out = model(**inputs, use_cache=True)
            ids, mask = out.logits[:, -1:].argmax(-1), inputs["attention_mask"]
            for _ in range(n - 1):
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
                out = model(input_ids=ids, attention_mask=mask, **{CACHE_KEY: out[CACHE_KEY]}, use_cache=True)
                ids = out.logits[:, -1:].argmax(-1)

    variants = {"plain": lambda: generate_ids(model, dict(inputs), n),
                "trace": lambda: trace_batch(model, parts, NormedLens(parts), dict(inputs), n),
                "lens_only": lambda: trace_batch(model, parts, NormedLens(parts), dict(inputs), n, direct=False),
                "forwards": forwards}
    results = gpu_suite.timed(variants, model.device, args.repeats)
    base = results["plain"][0]
    print(f"prompt {tuple(inputs['input_ids'].shape)}, {n} new tokens, median of {args.repeats}")
    for name, (seconds, _) in results.items():
        print(f"batch {args.batch} {name:10s} {seconds * 1000:8.1f} ms  x{seconds / base:.3f}  {args.batch * n / seconds:7.1f} tok/s")


if __name__ == "__main__":
    main()
