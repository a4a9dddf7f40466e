"""Cost of the analysis against plain greedy generation, measured side by side in one run.

For each configuration the script times, interleaved over repeats (median):
  plain   : ``model.generate`` greedy, fixed length (EOS disabled)
  trace   : evotool's hook-based trace (normed lens over all layers and the direct-effect readouts, 2L+1 rows, in
            one matmul per step: what ``evotool analyze`` runs by default)
  lens    : the same trace without the direct effect (L+1 rows; ``--set direct_effect=false``)
  naive   : ``generate(output_hidden_states=True)`` then the head applied layer by layer to every
            stored state (materialises [layers x tokens x vocab] log-probs)
and prints time ratios, tokens/s and, from a fresh subprocess per variant, the peak extra
memory over plain generation (CUDA: max_memory_allocated; CPU: peak RSS) at two sequence lengths.

    python benchmarks/bench_analyze.py                    # CPU, tiny LLaVA shapes
    python benchmarks/bench_analyze.py --preset mid --batch 4 --new-tokens 4 --repeats 1   # CPU, 588-token prompts
    python benchmarks/bench_analyze.py --preset 7b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from transformers import AutoModelForImageTextToText, CLIPVisionConfig, LlamaConfig, LlavaConfig

from evotool.lens import NormedLens
from evotool.metrics import js_divergence
from evotool.models.loading import synchronize
from evotool.models.registry import decoder_parts
from evotool.trace import trace_batch

PRESETS = {
    # the shipped demo model's shape (12 x 128, word-level vocabulary)
    "demo": dict(layers=12, width=128, heads=4, mlp=384, vocab=64, image=48, patch=16),
    # a tiny model with a realistic vocabulary, where the LM head dominates the lens cost
    "tiny-32k": dict(layers=12, width=256, heads=4, mlp=768, vocab=32000, image=48, patch=16),
    # a mid-size decoder with LLaVA-1.5's 576 image tokens that fits a CPU (the prefill's memory)
    "mid": dict(layers=16, width=1024, heads=8, mlp=2816, vocab=32000, image=336, patch=14),
    # LLaVA-1.5-7B's decoder (random weights are fine for timing)
    "7b": dict(layers=32, width=4096, heads=32, mlp=11008, vocab=32000, image=336, patch=14),
}


def build(preset: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    p = PRESETS[preset]
    vision = CLIPVisionConfig(hidden_size=64 if preset != "7b" else 1024, intermediate_size=128 if preset != "7b" else 4096,
                              num_hidden_layers=2 if preset != "7b" else 24, num_attention_heads=4 if preset != "7b" else 16,
                              image_size=p["image"], patch_size=p["patch"], projection_dim=64)
    text = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["width"], intermediate_size=p["mlp"],
                       num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["heads"],
                       max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=p["vocab"] - 1, vision_feature_layer=-1)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype)
    model.generation_config.eos_token_id = None  # fixed-length generation
    model.generation_config.pad_token_id = 0
    return model.eval()


def make_inputs(model: torch.nn.Module, preset: str, batch: int, device: str, dtype: torch.dtype) -> dict:
    p = PRESETS[preset]
    n_img = (p["image"] // p["patch"]) ** 2
    text = torch.randint(3, p["vocab"] - 2, (batch, 12))
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, n_img), p["vocab"] - 1), text], 1)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": torch.randn(batch, 3, p["image"], p["image"], dtype=dtype, device=device)}


@torch.inference_mode()
def run_variant(variant: str, model: torch.nn.Module, inputs: dict, new_tokens: int) -> None:
    if variant == "plain":
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    elif variant in ("trace", "lens"):
        parts = decoder_parts(model)
        trace_batch(model, parts, NormedLens(parts), inputs, new_tokens, direct=variant == "trace")
    elif variant == "naive":
        parts = decoder_parts(model)
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             output_hidden_states=True, return_dict_in_generate=True)
        per_layer = []  # the reference scripts' way: one head call per layer, all tokens kept
        for layer in range(parts.num_layers + 1):
            states = torch.stack([step[layer][:, -1] for step in out.hidden_states])
            if layer < parts.num_layers:
                states = parts.norm(states)
            per_layer.append(torch.log_softmax(parts.lm_head(states).float(), -1))
        logp = torch.stack(per_layer)  # [L+1, T, B, V]
        js_divergence(logp[1:], logp[:-1])
    else:
        raise ValueError(variant)


def timing(args: argparse.Namespace) -> dict:
    dtype = getattr(torch, args.dtype)
    model = build(args.preset, args.device, dtype)
    inputs = make_inputs(model, args.preset, args.batch, args.device, dtype)
    variants = ("plain", "trace", "lens", "naive")
    times: dict[str, list[float]] = {v: [] for v in variants}
    for v in variants:  # warm-up
        run_variant(v, model, inputs, 4)
    for _ in range(args.repeats):
        for v in variants:  # interleaved, so drift hits every variant alike
            synchronize(args.device)
            t0 = time.perf_counter()
            run_variant(v, model, inputs, args.new_tokens)
            synchronize(args.device)
            times[v].append(time.perf_counter() - t0)
    med = {v: statistics.median(t) for v, t in times.items()}
    tokens = args.batch * args.new_tokens
    return {v: {"seconds": med[v], "ratio": med[v] / med["plain"], "tokens_per_s": tokens / med[v]} for v in variants}


def memory_child(args: argparse.Namespace) -> None:
    """Run one variant once in this (fresh) process and print its peak memory in MiB."""
    dtype = getattr(torch, args.dtype)
    model = build(args.preset, args.device, dtype)
    inputs = make_inputs(model, args.preset, args.batch, args.device, dtype)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_variant(args.variant, model, inputs, args.new_tokens)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        run_variant(args.variant, model, inputs, args.new_tokens)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mib": peak}))


def memory(args: argparse.Namespace, new_tokens: int) -> dict[str, float]:
    peaks = {}
    for v in ("plain", "trace", "naive"):
        cmd = [sys.executable, __file__, "--child", "--variant", v, "--preset", args.preset, "--device", args.device,
               "--dtype", args.dtype, "--batch", str(args.batch), "--new-tokens", str(new_tokens)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        peaks[v] = json.loads(out)["peak_mib"]
    return {v: peaks[v] - peaks["plain"] for v in ("trace", "naive")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        memory_child(args)
        return
    res = timing(args)
    print(f"preset={args.preset} device={args.device} dtype={args.dtype} batch={args.batch} "
          f"new_tokens={args.new_tokens} repeats={args.repeats}")
    for v, r in res.items():
        print(f"  {v:6s} {r['seconds'] * 1000:9.1f} ms  x{r['ratio']:.3f} of plain  {r['tokens_per_s']:9.1f} tok/s")
    for n in (args.new_tokens // 2, args.new_tokens * 2):
        extra = memory(args, n)
        print(f"  peak extra memory over plain at {n:4d} new tokens: trace {extra['trace']:8.1f} MiB, "
              f"naive {extra['naive']:8.1f} MiB")


if __name__ == "__main__":
    main()
