"""Resolve a method for a model (name or ``evotool mitigate`` run directory), tune it on a validation split,
and write mitigate run directories.

A mitigate run directory holds ``method.json``: ``{"schema_version", "method", "options", "stages", "model",
"fingerprint", "layers", "config", "validation"}`` and ``tuning.json`` (``{"schema_version", "candidates"}``:
every tried option set with its validation metrics, greedy first). ``evotool eval ... --method RUN_DIR``
decodes with exactly that method.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from evotool.config import to_dict
from evotool.errors import ConfigError, InputError, StageFileError
from evotool.integrations.hub import card_with_metadata, check_push, push_folder
from evotool.io import DirLock, atomic_dir, atomic_write_text, read_json, write_json
from evotool.mitigate.base import Method
from evotool.mitigate.config import TRAINED, MitigateConfig, Selection
from evotool.mitigate.methods import BASELINE, build_method, candidates, method_class
from evotool.models.loading import fingerprint
from evotool.stages import StageFile
from evotool.validate import output_dir

METHOD_FILE = "method.json"
METHOD_SCHEMA = "1.0"
TUNING_FILE = "tuning.json"
TUNING_SCHEMA = "1.0"


@dataclass
class MethodSpec:
    """A method name with its options, the stage file it reads and (trained methods) the checkpoint it runs on."""

    method: str
    options: dict[str, Any] = field(default_factory=dict)
    stages: str | None = None
    model: str | None = None


def resolve_spec(method: str, options: dict[str, Any] | None = None, stages: str | None = None) -> MethodSpec:
    """``method`` is a registered name or a mitigate run directory (its ``method.json``); explicit
    ``options`` / ``stages`` override the stored ones. Raises ConfigError for anything else."""
    path = Path(method)
    if (path / METHOD_FILE).is_file():
        stored = read_json(path / METHOD_FILE, ConfigError, "method file", schema=METHOD_SCHEMA, keys=("method",))
        if not isinstance(stored.get("options", {}), dict):
            raise ConfigError(f"{path / METHOD_FILE}: options must be a JSON object, got {stored['options']!r}")
        method_class(stored["method"])
        return MethodSpec(stored["method"], {**stored.get("options", {}), **(options or {})},
                          stages or stored.get("stages"), stored.get("checkpoint"))
    if path.is_dir():
        raise ConfigError(f"{path} is not a mitigate run directory (no {METHOD_FILE})")
    method_class(method)  # unknown names fail here with the list of methods
    return MethodSpec(method, dict(options or {}), stages)


def load_stages_for(model: nn.Module | None, spec: MethodSpec) -> StageFile | None:
    """The spec's stage file, validated against ``model`` when one is given; None when the method needs none
    and none is given."""
    if spec.stages is None:
        if method_class(spec.method).needs_stages:
            raise StageFileError(f"method {spec.method!r} needs a stage file: pass --stages (from `evotool analyze`)")
        return None
    return StageFile.for_model(spec.stages, model) if model is not None else StageFile.read(spec.stages)


def method_for(model: nn.Module, spec: MethodSpec) -> Method:
    """The method of ``spec`` bound to ``model``."""
    return build_method(spec.method, model, spec.options, load_stages_for(model, spec))


def select(candidates: list[dict[str, Any]], baseline: dict[str, float], sel: Selection) -> dict[str, Any]:
    """The candidate (``{"options", "metrics"}``) with the lowest objective among those within the recall
    budget (ties: lower latency); if none keeps the recall, the one with the highest recall."""
    floor = (1 - sel.max_recall_loss) * baseline["recall"]
    kept = [c for c in candidates if c["metrics"]["recall"] >= floor - 1e-12]
    if kept:
        return min(kept, key=lambda c: (c["metrics"][sel.objective], c["metrics"].get("latency_ratio", 1.0)))
    return max(candidates, key=lambda c: c["metrics"]["recall"])


def run_mitigate(cfg: MitigateConfig, model: nn.Module | None = None, processor: Any = None) -> Path:
    """Tune (optionally) and record a method for one model in ``cfg.out``; returns the ``method.json`` path.

    ``--out`` and the stage file are checked before the model loads; the run holds ``cfg.out``'s lock."""
    from evotool.analysis.run import resolve_model_id
    from evotool.models.loading import process_state

    model_id = resolve_model_id(cfg.model)
    output_dir(cfg.out)
    if cfg.stages is not None:
        StageFile.read(cfg.stages)
    state = process_state(cfg.load)
    if cfg.method in TRAINED and state.num_processes > 1:
        raise ConfigError(f"{cfg.method} trains in one process; start it without torchrun / accelerate launch")
    with DirLock(cfg.out) if state.is_main_process else contextlib.nullcontext():
        if cfg.method in TRAINED:
            return _run_lora(cfg, model_id)
        return _run_decoding(cfg, model_id, model, processor, state)


def _run_decoding(cfg: MitigateConfig, model_id: str, model: nn.Module | None, processor: Any, state: Any) -> Path:
    """:func:`run_mitigate` of a decoding method; tuning runs data parallel over the processes (``state``, see
    :func:`evotool.models.loading.process_state`), the main one writes the run directory."""
    from evotool.evals.harness import evaluate_world_methods
    from evotool.models.loading import load_model
    from evotool.tracking import ArtifactRef, Tracker
    from evotool.world import WorldConfig

    if model is None:
        model, processor = load_model(model_id, cfg.load)
    spec = MethodSpec(cfg.method, dict(cfg.options), str(cfg.stages) if cfg.stages else None)
    stages = load_stages_for(model, spec)
    option_grid = cfg.tuning_grid()
    tried: list[dict[str, Any]] = []
    chosen: dict[str, Any] = {"options": {}, "metrics": {}}
    if cfg.tune and option_grid:
        found = candidates(cfg.method, model, stages, option_grid, cfg.layer_shifts, cfg.options)
        sets = [opts for opts, _ in found]
        methods: dict[str, Method] = {BASELINE: build_method(BASELINE, model),
                                      **{f"c{k}": method for k, (_, method) in enumerate(found)}}
        scores = evaluate_world_methods(model, processor, methods, cfg.n, WorldConfig(seed=cfg.seed),
                                        cfg.batch_size, cfg.max_new_tokens)
        tried = [{"options": opts, "metrics": scores[f"c{i}"]} for i, opts in enumerate(sets)]
        chosen = select(tried, scores[BASELINE], cfg.selection)
        tried.insert(0, {"options": "greedy", "metrics": scores[BASELINE]})
    spec.options = {**cfg.options, **chosen["options"]}
    method = build_method(spec.method, model, spec.options, stages)
    if not state.is_main_process:
        return cfg.out / METHOD_FILE
    write_json(cfg.out / TUNING_FILE, {"candidates": tried}, schema=TUNING_SCHEMA)  # method.json last: it marks the run done
    fp = fingerprint(model)
    path = write_json(cfg.out / METHOD_FILE, {
        "method": spec.method, "options": spec.options, "stages": spec.stages, "model": model_id,
        "fingerprint": fp, "layers": method.layers_used(), "config": to_dict(method.config),
        "validation": {"world_seed": cfg.seed, "n": cfg.n, "metrics": chosen["metrics"], "processes": state.num_processes}},
        schema=METHOD_SCHEMA)
    tracker = Tracker("mitigate", to_dict(cfg), cfg.out, enabled=cfg.wandb)
    if stages is not None:
        tracker.use_artifact(ArtifactRef.stages(stages.source, fp))
    tracker.log_artifact(ArtifactRef.method(path, spec.method, fp))
    if tried:
        keys = ["chair_i", "chair_s", "recall", "pope_adversarial_f1", "latency_ratio"]
        tracker.log_table("tuning", ["options", *keys],
                          [[json.dumps(t["options"]), *(t["metrics"].get(k) for k in keys)] for t in tried])
    tracker.summary({"method": spec.method, "options": json.dumps(spec.options)})
    tracker.finish()
    return path


def _run_lora(cfg: MitigateConfig, model_id: str) -> Path:
    """LoRA on the mutation stage's decoder layers (``lora_mutation``) or on all of them (``lora_all``), same
    samples, steps, rank and learning rate; saves the merged checkpoint as ``cfg.out/model``."""
    from evotool.finetune import lora_finetune, merge_and_save, world_samples
    from evotool.models.loading import load_model
    from evotool.tracking import ArtifactRef, Tracker

    check_push(cfg.push_to_hub)
    model, processor = load_model(model_id, cfg.load)  # a private copy: peft wraps it in place
    base_fingerprint = fingerprint(model)
    layers = None
    base_stages = StageFile.for_model(cfg.stages, model) if cfg.stages is not None else None
    if cfg.method == "lora_mutation":
        if base_stages is None:
            raise StageFileError("method 'lora_mutation' needs a stage file: pass --stages (from `evotool analyze`)")
        layers = base_stages.stage_layers("mutation")
        if not layers:
            raise StageFileError(f"{cfg.stages} has no mutation stage")
    settings = replace(cfg.lora, layers_to_transform=layers)
    half = max(1, cfg.train_samples // 2)
    samples = world_samples(half, cfg.train_seed, "test") + world_samples(half, cfg.train_seed, "prior_breaking")
    tracker = Tracker("mitigate", to_dict(cfg), cfg.out, enabled=cfg.wandb)
    result = lora_finetune(model, processor, samples, settings, on_log=lambda step, loss: tracker.log({"lora/loss": loss}, step))
    checkpoint = cfg.out / "model"
    with atomic_dir(checkpoint) as staged:  # an old method.json never points at a half-written checkpoint
        merged = merge_and_save(result.model, processor, staged)
        record = {
            "method": BASELINE, "trained": cfg.method, "options": {}, "stages": None, "base_stages": cfg.stages,
            "model": model_id, "base_fingerprint": base_fingerprint, "fingerprint": fingerprint(merged),
            "checkpoint": str(checkpoint), "layers": {"lora": layers or "all"}, "lora": result.settings,
            "losses": result.losses, "trainable_parameters": result.trainable_parameters,
            "train": {"world_seed": cfg.train_seed, "samples": len(samples), "splits": ["test", "prior_breaking"]}}
        atomic_write_text(staged / "README.md", lora_card(record, base_stages))
    path = write_json(cfg.out / METHOD_FILE, record, schema=METHOD_SCHEMA)
    if base_stages is not None:
        tracker.use_artifact(ArtifactRef.stages(base_stages.source, base_fingerprint))
    tracker.log_artifact(ArtifactRef.model(checkpoint, record["fingerprint"], source_model=model_id, trained=cfg.method))
    tracker.log_artifact(ArtifactRef.method(path, BASELINE, record["fingerprint"], trained=cfg.method))
    tracker.summary({"method": cfg.method, "trainable_parameters": result.trainable_parameters})
    tracker.finish()
    if cfg.push_to_hub:
        push_folder(checkpoint, cfg.push_to_hub)
    return path


def lora_card(record: dict[str, Any], base_stages: StageFile | None) -> str:
    """Model card (with Hub metadata) of a trained method's merged checkpoint; ``record`` is its method.json."""
    lora, losses = record["lora"], record["losses"]
    body = "\n".join([
        f"# {record['trained']}: hallucination mitigation by LoRA (evotool mitigate)", "",
        f"Base model `{record['model']}` (fingerprint {record['base_fingerprint']}); LoRA r={lora['r']} on "
        f"{TRAINED[record['trained']]} (decoder layers {record['layers']['lora']}), {lora['steps']} steps on "
        f"{record['train']['samples']} truthful synthetic-world samples; loss {losses[0][1]:.3f} -> {losses[-1][1]:.3f}. "
        "The adapters are merged into these weights: decode greedily.", "",
        "Load with `AutoModelForImageTextToText.from_pretrained(path)` and `AutoProcessor.from_pretrained(path)`.", ""])
    meta = {"method": record["trained"], "base_fingerprint": record["base_fingerprint"],
            "lora_layers": record["layers"]["lora"], "base_stages": base_stages.boundaries() if base_stages else None}
    return card_with_metadata(body, record["model"], ["lora", "hallucination-mitigation"], meta)


def require_file(path: str | Path | None, what: str) -> Path:
    """``path`` as a Path; InputError naming ``what`` when it is not given or does not exist."""
    if path is None:
        raise InputError(f"{what} is required")
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} not found: {p}")
    return p
