"""Lossless stage speculative decoding against plain greedy and transformers' ``assistant_early_exit``.

Trained model (``--model DIR --stages stages.json``): tunes on calibration data, reports on held-out data.
* stage_speculative ``auto``: the draft plan (skip set from the stage rankings, max draft length) chosen by
  measured tokens/s on the calibration samples at each batch size (``calibrate_draft``), searching the
  stable stage's ranking and the stable and mutation stages' ranking (skipping every layer of both is an
  early exit at the critical layer), as ``--skip auto`` does;
* stage_speculative ``auto stable only``: the same search over the stable stage's ranking alone;
* ``stable``: the draft skipping every skippable stable-stage layer (max draft 4), untuned;
* ``early-exit``: transformers' ``assistant_early_exit`` (draft = the first e layers, batch 1 only), e swept
  on the calibration samples; the fastest e is reported and, when another e needs fewer full-forward
  equivalents on the calibration samples, that e too (``early-exit fewest fwd-eq``). transformers reads the
  exit from the base model's config, which for a LLaVA is the composite config: the benchmark forwards
  ``num_hidden_layers`` to the text config (a property on a config subclass) so that transformers' own code
  runs unchanged;
* ``exit draft (our loop)``: an ablation: this package's loop with the draft = the first e layers (skip e+1..L),
  e and the draft length chosen by ``calibrate_draft`` like ``auto``: it separates what the stage-guided skip
  set brings from what the loop (adaptive length, one cache, batching) brings.
Every method's tokens are checked against plain greedy. Columns: acceptance (accepted / drafted draft
tokens), tokens per verify step, full-model-forward equivalents per token (decoder-layer calls / L per token
after the first: stage_speculative from its counters, early exit from forward hooks on every decoder
layer, the assistant's own prompt pass included), tokens/s (process CPU time on CPU, one thread; wall on
CUDA; interleaved repeats, median) relative to greedy and to the best early exit.

Compute side (both modes; for a trained model with the ``stable`` draft): one decode step of the full model
(t1), of the draft, of the prefix-only pass, and a verify forward over k+1 positions (full, and from the
first skipped layer), all relative to t1 at batch 1; from these, the predicted speedup E(a, k) / cost(k) at
acceptance a, with E = (1 - a^(k+1)) / (1 - a) tokens per round and cost(k) = k draft steps + one verify.
Random-weight model (``--shape cpu24|llava7b``, shapes of ``bench_prune.py``, draft skipping a middle block of
``--skip-count`` layers): acceptance of a random model is meaningless, so only the compute side is reported.

    OMP_NUM_THREADS=1 python benchmarks/bench_speculative.py --stages runs/demo/stages.json
    OMP_NUM_THREADS=1 python benchmarks/bench_speculative.py --model /work/zoo/l24-llama-w64/model \\
        --stages runs/zoo-l24/stages.json --data /work/zoo/l24-llama-w64/test/manifest.jsonl \\
        --calibration-data /work/zoo/l24-llama-w64/val/manifest.jsonl
    OMP_NUM_THREADS=1 python benchmarks/bench_speculative.py --shape cpu24
    python benchmarks/bench_speculative.py --shape llava7b --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prune import SHAPES, build, make_inputs  # noqa: E402

from evotool.data.inputs import load_samples  # noqa: E402
from evotool.generation import GREEDY, cut_at_eos  # noqa: E402
from evotool.models.compat import CACHE_KEY  # noqa: E402
from evotool.models.loading import load_model, synchronize  # noqa: E402
from evotool.models.registry import decoder_parts  # noqa: E402
from evotool.prune.runtime import skip_layers  # noqa: E402
from evotool.prune.speculative import DraftPlan, SpeculativeStats, calibrate_draft, skip_ranking  # noqa: E402
from evotool.prune.speculative.plan import calibration_inputs  # noqa: E402
from evotool.prune.speed import timer  # noqa: E402
from evotool.stages import StageFile  # noqa: E402


@contextmanager
def early_exit_config(model: torch.nn.Module) -> Iterator[None]:
    """Let transformers' EarlyExitCandidateGenerator set the exit on a composite VLM config (see docstring)."""
    config, cls = model.config, type(model.config)
    if hasattr(config, "text_config") and "num_hidden_layers" not in vars(config):
        prop = property(lambda self: self.text_config.num_hidden_layers,
                        lambda self, v: setattr(self.text_config, "num_hidden_layers", v))
        config.__class__ = type(f"EarlyExit{cls.__name__}", (cls,), {"num_hidden_layers": prop})
    try:
        yield
    finally:
        config.__class__ = cls


class LayerCalls:
    """Counts calls of every decoder layer (forward hooks)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.layers = decoder_parts(model).layers
        self.calls = [0] * len(self.layers)

    def __enter__(self) -> LayerCalls:
        self.handles = [layer.register_forward_hook(lambda *_a, i=i: self.calls.__setitem__(i, self.calls[i] + 1))
                        for i, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


Runner = Callable[[dict[str, torch.Tensor], int], torch.Tensor]


def greedy_runner(model: torch.nn.Module, **kwargs: Any) -> Runner:
    return lambda batch, n: model.generate(**batch, max_new_tokens=n, **GREEDY, **kwargs)


def count(model: torch.nn.Module, runner: Runner, batches: list[dict], n: int, plan: DraftPlan | None) -> dict[str, Any]:
    """One untimed pass: new tokens, identity to greedy is checked by the caller, cost counters."""
    stats = SpeculativeStats()
    outs = []
    with LayerCalls(model) as calls:
        for batch in batches:
            outs.append(runner(batch, n) if plan is None else
                        model.generate(**batch, max_new_tokens=n, **GREEDY, **plan.generate_kwargs(stats)))
    L = len(calls.calls)
    prompts = [b["input_ids"].shape[1] for b in batches]
    steps = sum(o.shape[1] - p - 1 for o, p in zip(outs, prompts))  # decode steps after the prefill token
    if plan is not None and plan.skip:
        return {"outs": outs, "acceptance": stats.acceptance_rate, "per_step": stats.tokens_per_step,
                "fwd_eq": stats.forward_equivalents}
    last = calls.calls[-1] - len(batches)  # full-model forwards after each prefill
    return {"outs": outs, "acceptance": None, "per_step": steps / last if last else float("nan"),
            "fwd_eq": (sum(calls.calls) - L * len(batches)) / L / steps}


def timed(model: torch.nn.Module, runners: dict[str, Runner], batches: list[dict], n: int, repeats: int,
          clock: str) -> dict[str, float]:
    """Median seconds of each runner over all batches (interleaved, rotating order)."""
    tick = timer(clock)
    times: dict[str, list[float]] = {k: [] for k in runners}
    names = list(runners)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            synchronize(model.device)
            start = tick()
            for batch in batches:
                runners[name](batch, n)
            synchronize(model.device)
            times[name].append(tick() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def spec_runner(model: torch.nn.Module, plan: DraftPlan) -> Runner:
    return lambda batch, n: model.generate(**batch, max_new_tokens=n, **GREEDY, **plan.generate_kwargs())


def trained(args: argparse.Namespace) -> dict[str, Any]:
    model, processor = load_model(args.model or Path(__file__).resolve().parents[1] / "toolkit/evotool/assets/demo_model")
    stages = StageFile.for_model(args.stages, model)
    L = decoder_parts(model).num_layers
    clock = "wall" if model.device.type == "cuda" else "cpu"
    if args.data:
        test = load_samples(args.data, limit=args.n)
    else:
        from evotool.world import default_samples
        test = default_samples(args.n)
    if args.calibration_data:
        cal = load_samples(args.calibration_data, limit=args.calibration_n)
    else:
        from evotool.finetune import world_samples
        cal = world_samples(args.calibration_n)
    ranking = skip_ranking(model, stages, args.redundancy)
    ranking_mut = skip_ranking(model, stages, args.redundancy, keep_mutation=False)
    exit_ranking = list(range(L, 1, -1))  # the first N skip the last N layers: an exit after layer L - N
    stable = DraftPlan(sorted(ranking), 4)
    print(f"# {args.model or 'shipped demo model'}: {L} layers; stages critical {stages.critical_layer}, "
          f"stabilization {stages.stages['stabilization']}; ranking ({args.redundancy}) {ranking}")
    print(f"# tuned on {len(cal)} calibration samples ({args.calibration_data or 'world train split'}), reported on "
          f"{len(test)} held-out samples ({args.data or 'world test split'}); {args.max_new_tokens} new tokens max; "
          f"{clock} clock, median of {args.repeats}")
    exits = list(range(1, L)) if L <= 12 else list(range(2, L, 2))
    result: dict[str, Any] = {"model": str(args.model or "demo"), "layers": L, "ranking": ranking, "rows": []}
    first = calibration_inputs(processor, test[:1], 1, model.device)[0]
    result["costs"] = cost_table(model, first, stable.skip, args.repeats, clock)
    for bsz in [int(b) for b in args.batches.split(",")]:
        cal_batches = calibration_inputs(processor, cal, bsz, model.device)
        batches = calibration_inputs(processor, test, bsz, model.device)
        calibs = {name: calibrate_draft(model, cal_batches, r, args.max_new_tokens, repeats=args.calibration_repeats)
                  for name, r in (("stage_speculative auto", [ranking, ranking_mut]),
                                  ("stage_speculative auto stable only", [ranking]),
                                  ("exit draft (our loop)", [exit_ranking]))}
        for name, calib in calibs.items():
            print(f"# batch {bsz}: {name} chose skip {calib.plan.skip or '- (plain greedy)'} max_draft "
                  f"{calib.plan.max_draft} (re-measured {calib.confirmed_speedup:.3f}x greedy on calibration data, "
                  f"{calib.seconds:.0f} s)")
        plans: dict[str, DraftPlan | None] = {"greedy": None, **{k: c.plan for k, c in calibs.items()},
                                              "stage_speculative stable": stable}
        runners: dict[str, Runner] = {"greedy": greedy_runner(model)}
        runners.update({k: spec_runner(model, p) for k, p in plans.items() if p is not None})
        sweep: dict[int, float] = {}
        if bsz == 1:  # transformers' assisted generation is batch-1 only
            with early_exit_config(model):
                ee = {f"early-exit {e}": greedy_runner(model, assistant_early_exit=e) for e in exits}
                secs = timed(model, {"greedy": greedy_runner(model), **ee}, cal_batches, args.max_new_tokens, 1, clock)
                sweep = {e: secs["greedy"] / secs[f"early-exit {e}"] for e in exits}
                fwd = {e: count(model, ee[f"early-exit {e}"], cal_batches, args.max_new_tokens, None)["fwd_eq"] for e in exits}
                best, fewest = max(sweep, key=sweep.get), min(fwd, key=fwd.get)
                print(f"# early-exit sweep on calibration data (speedup over greedy / fwd-eq per token): "
                      + ", ".join(f"{e}: {sweep[e]:.2f} / {fwd[e]:.3f}" for e in exits)
                      + f" -> fastest exit {best}, fewest fwd-eq exit {fewest}")
                runners["early-exit"] = greedy_runner(model, assistant_early_exit=best)
                plans["early-exit"] = None
                if fewest != best:
                    runners["early-exit fewest fwd-eq"] = greedy_runner(model, assistant_early_exit=fewest)
                    plans["early-exit fewest fwd-eq"] = None
                counted = {name: count(model, runners[name], batches, args.max_new_tokens, plans[name]) for name in runners}
                secs = timed(model, runners, batches, args.max_new_tokens, args.repeats, clock)
        else:
            counted = {name: count(model, runners[name], batches, args.max_new_tokens, plans[name]) for name in runners}
            secs = timed(model, runners, batches, args.max_new_tokens, args.repeats, clock)
        ref = counted["greedy"]["outs"]
        tokens = sum(len(cut_at_eos(row.tolist()[b["input_ids"].shape[1]:], model)) for o, b in zip(ref, batches) for row in o)
        print(f"\n| batch | method | draft | max draft | acceptance | tokens / verify step | fwd-eq / token | tokens/s | vs greedy | vs early exit | identical |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for name in runners:
            c, plan = counted[name], plans[name]
            draft = (f"skip {plan.skip}" + (" + prefix reuse" if plan.reuse_prefix else "")
                     + (f" + stop below p {plan.threshold}" if plan.threshold else "") if plan and plan.skip else "-" if plan else
                     f"first {best} layers" if name == "early-exit" else
                     f"first {fewest} layers" if name == "early-exit fewest fwd-eq" else "-")
            rate = tokens / secs[name]
            ee_rate = tokens / secs["early-exit"] if "early-exit" in secs else None
            same = all(torch.equal(a, b) for a, b in zip(c["outs"], ref))
            acc = f"{c['acceptance']:.3f}" if c["acceptance"] is not None else "-"
            vs_ee = f"{rate / ee_rate:.3f}" if ee_rate else "-"
            print(f"| {bsz} | {name} | {draft} | {plan.max_draft if plan and plan.skip else '-'} | {acc} | "
                  f"{c['per_step']:.2f} | {c['fwd_eq']:.3f} | {rate:.1f} | {rate / (tokens / secs['greedy']):.3f} | {vs_ee} | {same} |")
            result["rows"].append({"batch": bsz, "method": name, "draft": draft, "acceptance": c["acceptance"],
                                   "tokens_per_step": c["per_step"], "forward_equivalents": c["fwd_eq"],
                                   "tokens_per_s": rate, "identical": same})
        result.setdefault("calibration", {})[bsz] = {k: c.summary() for k, c in calibs.items()}
        result.setdefault("early_exit_sweep", {}).update({str(e): s for e, s in sweep.items()})
        if sweep:
            result["early_exit_forward_equivalents"] = {str(e): f for e, f in fwd.items()}
        print()
    return result


def step_seconds(model: torch.nn.Module, inputs: dict, positions: int, repeats: int, clock: str,
                 skip: list[int] | None = None) -> float:
    """Median time of one forward over ``positions`` new tokens on a prefilled cache (optionally with layers skipped)."""
    tick = timer(clock)
    cache = DynamicCache(config=model.config)
    vocab = model.config.get_text_config().vocab_size
    with torch.inference_mode():
        model(**inputs, **{CACHE_KEY: cache}, use_cache=True)
        base = inputs["input_ids"].shape[1]
        ids = torch.randint(3, vocab, (inputs["input_ids"].shape[0], positions), device=model.device)
        mask = torch.ones(ids.shape[0], base + positions, dtype=torch.long, device=model.device)
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            with skip_layers(model, skip or []):
                synchronize(model.device)
                start = tick()
                model(input_ids=ids, attention_mask=mask, **{CACHE_KEY: cache}, use_cache=True)
                synchronize(model.device)
                times.append(tick() - start)
            cache.crop(-positions)
    return statistics.median(times[1:])


def cost_table(model: torch.nn.Module, inputs: dict, skip: list[int], repeats: int, clock: str) -> dict[str, Any]:
    """Measured step costs relative to one full decode step t1 and the speedups they predict (module docstring).

    Approximations, both slight over-estimates: the prefix-only step also runs the final norm and head, and
    the verify from layer s still runs layer 1 (runtime skipping cannot drop it)."""
    L, n, s = decoder_parts(model).num_layers, len(skip), min(skip)
    t1 = step_seconds(model, inputs, 1, repeats, clock)
    c_draft = step_seconds(model, inputs, 1, repeats, clock, skip) / t1
    c_prefix = step_seconds(model, inputs, 1, repeats, clock, list(range(s, L + 1))) / t1
    print(f"# compute side: one full decode step t1 = {t1 * 1e3:.2f} ms; draft step (skip {skip}) {c_draft:.3f} t1 "
          f"(layer share {(L - n) / L:.3f}); prefix-only step (layers 1..{s - 1}) {c_prefix:.3f} t1 "
          f"(layer share {(s - 1) / L:.3f})")
    print("\n| k | verify k+1 positions / t1 | verify from layer s / t1 | acceptance a | tokens / round | fwd-eq / token | "
          "predicted speedup | with prefix reuse |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for k in (2, 4, 8):
        c_v = step_seconds(model, inputs, k + 1, repeats, clock) / t1
        c_vr = step_seconds(model, inputs, k + 1, repeats, clock, list(range(2, s))) / t1 if s > 2 else c_v
        for a in (0.6, 0.8, 0.9):
            e = (1 - a ** (k + 1)) / (1 - a)
            speed, speed_r = e / (k * c_draft + c_v), e / (k * c_draft + c_prefix + c_vr)
            fwd = (k * (L - n) + L) / L / e
            print(f"| {k} | {c_v:.3f} | {c_vr:.3f} | {a} | {e:.2f} | {fwd:.3f} | {speed:.3f} | {speed_r:.3f} |")
            rows.append({"k": k, "verify": c_v, "verify_reuse": c_vr, "acceptance": a, "tokens_per_round": e,
                         "forward_equivalents": fwd, "speedup": speed, "speedup_reuse": speed_r})
    print()
    return {"skip": skip, "t1_s": t1, "draft": c_draft, "prefix": c_prefix, "rows": rows}


def compute_side(args: argparse.Namespace) -> dict[str, Any]:
    shape, dtype = SHAPES[args.shape], getattr(torch, args.dtype)
    clock = "wall" if args.device.startswith("cuda") else "cpu"
    model = build(shape, dtype, args.device)
    L, k = shape["layers"], args.skip_count
    first = L // 2 - k // 2
    skip = list(range(first + 1, first + k + 1))
    print(f"# random-weight {args.shape} ({L} layers, width {shape['width']}), {args.dtype} on {args.device}; "
          f"{clock} clock, median of {args.repeats}. Acceptance of a random model is meaningless: the speedups are "
          "predicted from the measured costs at an assumed acceptance a.")
    return {"shape": args.shape, **cost_table(model, make_inputs(shape, 1, 16, dtype, args.device), skip, args.repeats, clock)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="trained model dir (default: the shipped demo model)")
    ap.add_argument("--stages", help="its stages.json (trained-model mode)")
    ap.add_argument("--data", help="held-out manifest to report on (default: world test-split captions)")
    ap.add_argument("--calibration-data", help="manifest to tune on (default: world training samples)")
    ap.add_argument("--n", type=int, default=16, help="held-out samples")
    ap.add_argument("--calibration-n", type=int, default=8, help="calibration samples")
    ap.add_argument("--redundancy", default="cosine", choices=["cosine", "js"])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calibration-repeats", type=int, default=1)
    ap.add_argument("--shape", choices=sorted(SHAPES), help="random-weight compute-side mode")
    ap.add_argument("--skip-count", type=int, default=8, help="random mode: layers the draft skips (middle block)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.shape is None and args.stages is None:
        ap.error("give --stages (trained model) or --shape (random-weight compute side)")
    result = compute_side(args) if args.shape else trained(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
