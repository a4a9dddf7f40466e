"""Speed of a statically pruned model against the full model, measured side by side in one run.

Builds a random-weight LLaVA (CLIP-style vision tower + Llama decoder) of a chosen shape, removes k
decoder layers with :func:`evotool.prune.static.remove_layers`, then measures (interleaved repeats,
median, :mod:`evotool.prune.speed`) prefill latency, decode tokens/s at batch 1 and a larger batch and
peak memory, and prints the speedups and the decode efficiency = measured speedup / ideal L / (L - k).

    OMP_NUM_THREADS=1 python benchmarks/bench_prune.py --shape cpu24 --drop 8
    python benchmarks/bench_prune.py --shape llava7b --drop 8 --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import copy
import json
import platform

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from evotool.prune.speed import measure, ratios
from evotool.prune.static import remove_layers

# decoder width, layers, MLP, heads, vocab, image side / patch (image tokens = (side / patch) ** 2)
SHAPES = {
    "cpu24": dict(width=1024, layers=24, mlp=2816, heads=16, vocab=32000, image=112, patch=14),
    "llava7b": dict(width=4096, layers=32, mlp=11008, heads=32, vocab=32000, image=336, patch=14),
}
IMAGE_TOKEN = 31999


def build(shape: dict, dtype: torch.dtype, device: str) -> LlavaForConditionalGeneration:
    """Random LLaVA of ``shape``; the vision tower is kept small (2 layers, width 256): only the decoder is pruned."""
    vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                              image_size=shape["image"], patch_size=shape["patch"], projection_dim=256)
    text = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["width"], intermediate_size=shape["mlp"],
                       num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                       num_key_value_heads=shape["heads"], max_position_embeddings=4096, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                         image_seq_length=(shape["image"] // shape["patch"]) ** 2, vision_feature_layer=-1,
                         vision_feature_select_strategy="default")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = None  # never stop early: fixed token counts
    model.generation_config.pad_token_id = 0
    return model.to(dtype).eval()


def make_inputs(shape: dict, batch: int, text_len: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    n_img = (shape["image"] // shape["patch"]) ** 2
    gen = torch.Generator().manual_seed(batch)
    text = torch.randint(3, 30000, (batch, text_len), generator=gen)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, n_img), IMAGE_TOKEN), text], dim=1)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": torch.randn(batch, 3, shape["image"], shape["image"], generator=gen).to(device, dtype)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="cpu24")
    ap.add_argument("--drop", type=int, default=8, help="layers removed (a contiguous middle block, as a stable stage)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--batches", default="1,8", help="batch sizes")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--text-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--clock", choices=["wall", "cpu"], help="timer (default: wall on CUDA, process CPU time on CPU)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape, dtype = SHAPES[args.shape], getattr(torch, args.dtype)
    n, k = shape["layers"], args.drop
    clock = args.clock or ("wall" if args.device.startswith("cuda") else "cpu")
    full = build(shape, dtype, args.device)
    pruned = copy.deepcopy(full)
    first = n // 2 - k // 2
    removed = list(range(first + 1, first + k + 1))
    remove_layers(pruned, removed)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or 'CPU'}, {args.threads} thread(s)"
    print(f"# shape {args.shape} ({n} layers, width {shape['width']}), removed {k}: {removed}; {args.dtype} on {device_name}; {clock} clock, median of {args.repeats}")
    weights = {name: sum(p.numel() * p.element_size() for p in m.parameters()) / 2**20 for name, m in (("full", full), ("pruned", pruned))}
    print("| batch | model | weights MB | prefill ms | decode tok/s | peak MB | prefill speedup | decode speedup | ideal L/(L-k) | efficiency |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        inputs = make_inputs(shape, b, args.text_len, dtype, args.device)
        res = measure({"full": full, "pruned": pruned}, inputs, args.new_tokens, args.repeats, clock=clock)
        r = ratios(res["full"], res["pruned"], n, k)
        for name in ("full", "pruned"):
            s = res[name]
            tail = (f"{r['prefill_speedup']:.3f} | {r['decode_speedup']:.3f} | {r['ideal']:.3f} | {r['efficiency']:.3f}"
                    if name == "pruned" else " | | | ")
            print(f"| {b} | {name} | {weights[name]:.0f} | {s.prefill_s * 1e3:.1f} | {s.decode_tok_s:.2f} | {s.peak_mb:.0f} | {tail} |", flush=True)
        rows.append({"batch": b, **{f"{m}_{k2}": v for m in res for k2, v in vars(res[m]).items()}, **r})
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"shape": args.shape, "weights_mb": weights, "removed": removed, "device": device_name, "dtype": args.dtype, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
