"""analyze -> mitigate -> eval on the synthetic world, W&B-tracked (:class:`PipelineConfig`, ``configs/mitigate.yaml``).

1. ``evotool analyze`` on a validation sample of world captions -> ``stages.json``.
2. ``evotool mitigate`` for every stage-aware method: options picked on the validation split
   (world seed ``validation_seed``) -> ``mitigate/<method>/method.json``; trained methods fine-tune.
3. Every method (baselines with their published defaults) on the test split (``test_seed``), interleaved
   on the same batches -> ``eval/<method>/results.json``, ``table.md``, ``summary.json`` (target check).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from torch import nn

from evotool.analysis.config import AnalyzeConfig
from evotool.analysis.run import resolve_model_id, run_analysis
from evotool.config import to_dict
from evotool.env import torch_threads
from evotool.errors import StageFileError
from evotool.evals.harness import evaluate_world_methods
from evotool.evals.results import write_results
from evotool.io import atomic_write_text, write_json
from evotool.mitigate.base import Method
from evotool.mitigate.config import TRAINED, MitigateConfig, PipelineConfig, Selection, Target
from evotool.mitigate.methods import BASELINE, build_method, method_class
from evotool.mitigate.run import resolve_spec, run_mitigate
from evotool.models.loading import fingerprint, load_model
from evotool.stages import StageFile
from evotool.tracking import Tracker
from evotool.world import WorldConfig

SUMMARY_SCHEMA = "1.0"
TABLE_KEYS = ("chair_s", "chair_i", "recall", "pope_random_f1", "pope_popular_f1", "pope_adversarial_f1",
              "latency_ratio")


def stage_aware(name: str) -> bool:
    """Whether a method's choices come from the analysis (stage file)."""
    return name == "lora_mutation" or (name not in TRAINED and method_class(name).needs_stages)


def target_check(metrics: dict[str, dict[str, float]], target: Target) -> dict[str, dict[str, Any]]:
    """Per stage-aware method: relative CHAIR_i cut vs greedy, recall loss, latency, and whether it beats DoLa and VCD."""
    base = metrics[BASELINE]
    out = {}
    for name, m in metrics.items():
        if not stage_aware(name):
            continue
        cut = 1 - m["chair_i"] / base["chair_i"] if base["chair_i"] else 0.0
        loss = 1 - m["recall"] / base["recall"] if base["recall"] else 0.0
        beats = all(m["chair_i"] < metrics[b]["chair_i"] for b in ("dola", "vcd") if b in metrics)
        out[name] = {"chair_i_reduction": cut, "recall_loss": loss, "latency_ratio": m["latency_ratio"],
                     "beats_dola_vcd": beats,
                     "met": bool(cut >= target.chair_i_reduction and loss <= target.max_recall_loss
                                 and m["latency_ratio"] <= target.max_latency_ratio and beats)}
    return out


def markdown_table(metrics: dict[str, dict[str, float]], options: dict[str, dict[str, Any]]) -> str:
    """Method x TABLE_KEYS as a Markdown table (chair/recall on prior-breaking captions, POPE in distribution)."""
    lines = ["| method | options | " + " | ".join(TABLE_KEYS) + " |", "|" + "---|" * (len(TABLE_KEYS) + 2)]
    for name, m in metrics.items():
        opts = ", ".join(f"{k}={v}" for k, v in options.get(name, {}).items()) or "defaults"
        lines.append(f"| {name} | {opts} | " + " | ".join(f"{m[k]:.3f}" for k in TABLE_KEYS) + " |")
    return "\n".join(lines) + "\n"


def _prepare(name: str, cfg: PipelineConfig, model: nn.Module, processor: Any, model_id: str, stages: StageFile,
             stages_path: Path, out: Path, wandb: bool) -> tuple[dict[str, Any], Method]:
    """(options, method) of one eval method: trained, tuned on validation (stage-aware) or fixed (baselines)."""
    common = dict(method=name, model=model_id, stages=str(stages_path), out=out / "mitigate" / name, wandb=wandb)
    if name in TRAINED:
        path = run_mitigate(MitigateConfig(**common, lora=cfg.lora.settings, train_samples=cfg.lora.samples,
                                           train_seed=cfg.lora.seed))
        spec = resolve_spec(str(path.parent))
        return {"checkpoint": spec.model}, build_method(BASELINE, load_model(spec.model)[0])
    if not method_class(name).needs_stages:
        options = cfg.eval.options.get(name, {})
        return options, build_method(name, model, options)
    tune = cfg.tune
    path = run_mitigate(MitigateConfig(**common, grid=tune.grids.get(name), layer_shifts=tune.layer_shifts, n=tune.n,
                                       seed=cfg.validation_seed, batch_size=tune.batch_size,
                                       max_new_tokens=tune.max_new_tokens,
                                       selection=Selection(tune.max_recall_loss, tune.objective)), model, processor)
    spec = resolve_spec(str(path.parent))
    return spec.options, build_method(name, model, spec.options, stages)


def run_pipeline(cfg: PipelineConfig, out: Path, wandb: bool = True) -> Path:
    """Run the pipeline into ``out`` with ``cfg.threads`` torch threads (the caller's count is restored afterwards);
    returns the path of ``summary.json``."""
    with torch_threads(cfg.threads):
        model_id = resolve_model_id(cfg.model)
        out = Path(out)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))

        an = cfg.analyze
        stages_path = run_analysis(AnalyzeConfig(model=model_id, world_samples=an.samples, seed=cfg.validation_seed,
                                                 max_new_tokens=an.max_new_tokens, batch_size=an.batch_size,
                                                 out=out / "analyze", wandb=wandb))
        model, processor = load_model(model_id)
        stages = StageFile.for_model(stages_path, model)

        methods: dict[str, Method] = {}
        options: dict[str, dict[str, Any]] = {}
        skipped: dict[str, str] = {}
        for name in cfg.eval.methods:
            try:
                options[name], methods[name] = _prepare(name, cfg, model, processor, model_id, stages, stages_path, out,
                                                        wandb)
            except StageFileError as err:  # e.g. no mutation layer found: the method does not apply to this model
                skipped[name] = str(err)

        ev = cfg.eval
        metrics = evaluate_world_methods(model, processor, methods, ev.n, WorldConfig(seed=cfg.test_seed),
                                         ev.batch_size, ev.max_new_tokens)
        for name, m in metrics.items():
            write_results(out / "eval" / name, m, {"task": "world", "model": model_id, "method": name,
                                                   "options": options[name], "stages": str(stages_path),
                                                   "world_seed": cfg.test_seed, "n": ev.n},
                          {"method": methods[name].describe()})
        checks = target_check(metrics, cfg.target)
        atomic_write_text(out / "table.md", markdown_table(metrics, options))
        path = write_json(out / "summary.json", {
            "model": model_id, "fingerprint": fingerprint(model), **stages.boundaries(), "options": options,
            "metrics": metrics, "target": checks, "skipped": skipped}, schema=SUMMARY_SCHEMA)
        tracker = Tracker("mitigate-pipeline", to_dict(cfg), out, enabled=wandb)
        tracker.log_table("methods", ["method", *TABLE_KEYS],
                          [[n, *(m[k] for k in TABLE_KEYS)] for n, m in metrics.items()])
        tracker.summary({"target": checks})
        tracker.finish()
        return path
