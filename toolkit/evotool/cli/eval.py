"""`evotool eval pope|chair|amber|manifest|world`: run one decoding method (and greedy, for latency) and write results.json.

Every subcommand takes ``--model``, ``--method`` (a name or an ``evotool mitigate`` run directory),
``--set key=value`` (method options), ``--stages`` (the model's stages.json), ``--data`` and ``--out``.
The method and greedy decode the same batches interleaved; ``latency_ratio`` is method / greedy seconds.
``--predictions FILE`` (chair, pope, amber, manifest) scores given outputs instead, without a model;
``--protocol official|strict`` picks the metric protocol (docs/evals.md), recorded in results.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from evotool.cli.options import Device, GpusPerProcess, Model, NoWandb, load_command_model
from evotool.mitigate.methods import method_names
from evotool.tracking import ArtifactRef, Tracker

app = typer.Typer(help="Evaluate a decoding method on POPE, CHAIR, AMBER or the synthetic world.", no_args_is_help=True)

MethodOpt = Annotated[str, typer.Option("--method", help=f"{', '.join(method_names())}, or a mitigate run dir.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Method option key=value (repeatable; YAML value).")]
Stages = Annotated[Optional[str], typer.Option(help="stages.json (or analyze run dir) of this model.")]
Out = Annotated[Path, typer.Option(help="Output directory for results.json.")]
Batch = Annotated[int, typer.Option(help="Samples per generation batch.")]
Limit = Annotated[Optional[int], typer.Option(help="Evaluate at most this many samples.")]
Dtype = Annotated[str, typer.Option(help="auto, float32, float16 or bfloat16 (default: bfloat16 on GPU).")]
ImageDir = Annotated[Optional[Path], typer.Option(help="Folder of the images named in the data files.")]
Predictions = Annotated[Optional[Path], typer.Option(
    help="Score these outputs (JSONL / JSON list: id, image_id or question_id + caption, text, answer or response) "
         "instead of running a model.")]
Protocol = Annotated[str, typer.Option(help="Metric protocol: official (the reference scripts) or strict (docs/evals.md).")]


def _run(task: str, model: str | None, method: str, options: list[str] | None, stages: str | None, out: Path,
         dtype: str, device: str | None, gpus_per_process: int, wandb: bool, config: dict[str, Any],
         evaluate: Callable[[Any, Any, dict[str, Any]], dict[str, dict[str, float]]]) -> None:
    """Resolve the method (before loading the model, so bad names fail fast), evaluate, write and log."""
    from evotool.config import parse_set
    from evotool.mitigate.methods import BASELINE, make_config
    from evotool.mitigate.run import method_for, resolve_spec
    from evotool.models.loading import fingerprint

    spec = resolve_spec(method, parse_set(options or []), stages)
    make_config(spec.method, spec.options)  # option errors before the model loads
    m, p, model_id = load_command_model(model or spec.model, dtype, device, gpus_per_process)
    chosen = method_for(m, spec)
    methods = {spec.method: chosen} if spec.method == BASELINE else {spec.method: chosen, BASELINE: method_for(m, resolve_spec(BASELINE))}
    scores = evaluate(m, p, methods)
    metrics = scores[spec.method]
    if spec.method == BASELINE:
        metrics["latency_ratio"] = 1.0
    full_config = {"task": task, "model": model_id, "method": spec.method, "options": spec.options,
                   "stages": spec.stages, "length_unit": "tokens", **config}
    meta = {"method": chosen.describe(), "baseline": scores.get(BASELINE) if spec.method != BASELINE else None}
    fp = fingerprint(m)
    inputs = [ArtifactRef.model(model_id, fp)] if Path(model_id).is_dir() else []
    inputs += [ArtifactRef.stages(spec.stages, fp)] if spec.stages is not None else []
    inputs += [ArtifactRef.method(method, spec.method, fp)] if Path(method).is_dir() else []
    _finish(task, out, metrics, full_config, meta, wandb, fp, inputs)


def _finish(task: str, out: Path, metrics: dict[str, float], config: dict[str, Any], meta: dict | None, wandb: bool,
            source: str, inputs: Sequence[ArtifactRef] = ()) -> None:
    """Write results.json, log to W&B (``inputs`` as the run's input artifacts, results.json as
    ``results-<task>-<source>``: the model fingerprint, or ``predictions``), print the headline metrics; in a
    data-parallel run only the main process does."""
    from evotool.evals.results import write_results
    from evotool.models.loading import process_state

    state = process_state()
    if not state.is_main_process:
        return
    config = {**config, "processes": state.num_processes}
    path = write_results(out, metrics, config, meta)
    tracker = Tracker(f"eval-{task}", config, out, enabled=wandb)
    tracker.summary(metrics)
    for ref in inputs:
        tracker.use_artifact(ref)
    tracker.log_artifact(ArtifactRef.results(path, task, source, method=config.get("method")))
    tracker.finish()
    keys = [k for k in ("chair_s", "chair_i", "recall", "pope_f1", "pope_random_f1", "pope_adversarial_f1",
                        "exact_match", "amber_chair", "amber_f1", "latency_ratio") if k in metrics]
    typer.echo(", ".join(f"{k} {metrics[k]:.4f}" for k in keys))
    typer.echo(f"wrote {path}")


def _score_file(task: str, predictions: Path, samples: list, out: Path, protocol: str, wandb: bool,
                config: dict[str, Any], score: Callable[[list, list[str]], dict[str, float]]) -> None:
    """Score the outputs in ``predictions`` on the samples they name (no model) and write results.json."""
    from evotool.evals.predictions import match_predictions, read_predictions

    matched, texts = match_predictions(samples, read_predictions(predictions))
    metrics = score(matched, texts)
    full_config = {"task": task, "predictions": str(predictions), "protocol": protocol, "n": len(matched),
                   "length_unit": "words", **config}
    _finish(task, out, metrics, full_config, None, wandb, "predictions")


def _samples_eval(samples: list, batch_size: int, max_new_tokens: int, score: Callable[[list, Any], dict[str, float]]):
    from evotool.evals.harness import evaluate_methods

    return lambda m, p, methods: evaluate_methods(m, p, methods, samples, batch_size, max_new_tokens, score)


def _limit(samples: list, limit: int | None) -> list:
    return samples[:limit] if limit is not None else samples


def _check(out: Path, device: str | None, **numbers: int | None) -> None:
    """Cheap checks of the options before any data or model loads: ``--out``, ``--device``, counts >= 1."""
    from evotool.validate import at_least, device as check_device, output_dir

    output_dir(out)
    check_device(device)
    at_least(1, **numbers)


@app.command("pope")
def pope(
    data: Annotated[Path, typer.Option(help="coco_pope_<split>.json file, a folder of them, or a datasets dataset.")],
    model: Model = None, method: MethodOpt = "greedy", set_: SetOpt = None, stages: Stages = None,
    out: Out = Path("runs/eval/pope"), image_dir: ImageDir = None,
    split: Annotated[Optional[str], typer.Option(help="random, popular or adversarial (default: all present).")] = None,
    batch_size: Batch = 8, max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 16,
    limit: Limit = None, dtype: Dtype = "auto", device: Device = None, gpus_per_process: GpusPerProcess = 1,
    no_wandb: NoWandb = False,
    predictions: Predictions = None, protocol: Protocol = "official",
) -> None:
    """POPE: accuracy, precision, recall, F1 and yes-ratio per split."""
    _check(out, device, gpus_per_process=gpus_per_process, batch_size=batch_size, max_new_tokens=max_new_tokens,
           limit=limit)
    from evotool.evals.pope import load_pope, parse_yes_no, score_pope
    from evotool.mitigate.run import require_file

    parse_yes_no("", protocol)  # protocol errors before anything runs
    data = require_file(data, "POPE data")
    samples = _limit(load_pope(data, image_dir or (data if data.is_dir() else data.parent), split), limit)
    config = {"data": str(data), "split": split, "protocol": protocol}
    if predictions is not None:
        return _score_file("pope", predictions, samples, out, protocol, not no_wandb, config,
                           lambda s, t: score_pope(s, t, protocol))
    _run("pope", model, method, set_, stages, out, dtype, device, gpus_per_process, not no_wandb,
         config | {"n": len(samples), "max_new_tokens": max_new_tokens},
         _samples_eval(samples, batch_size, max_new_tokens, lambda s, g: score_pope(s, g.texts, protocol)))


def coco_image(image_dir: Path, image_id: int) -> Path:
    """The COCO val2014 file of ``image_id`` in ``image_dir`` (``COCO_val2014_<id>.jpg`` or ``<id>.jpg``)."""
    for name in (f"COCO_val2014_{image_id:012d}.jpg", f"{image_id:012d}.jpg"):
        if (image_dir / name).is_file():
            return image_dir / name
    return image_dir / f"COCO_val2014_{image_id:012d}.jpg"


@app.command("chair")
def chair(
    data: Annotated[list[Path], typer.Option(help="COCO instances and/or captions JSON (repeatable).")],
    image_ids: Annotated[Optional[Path], typer.Option(help="The fixed image ids file of the run (default with --predictions: their ids).")] = None,
    image_dir: Annotated[Optional[Path], typer.Option(help="Folder of the COCO val2014 images (not with --predictions).")] = None,
    model: Model = None, method: MethodOpt = "greedy", set_: SetOpt = None, stages: Stages = None,
    out: Out = Path("runs/eval/chair"),
    prompt: Annotated[str, typer.Option(help="Caption prompt.")] = "Please describe this image in detail.",
    batch_size: Batch = 8, max_new_tokens: Annotated[int, typer.Option(help="Locked protocol: 512.")] = 512,
    limit: Limit = None, dtype: Dtype = "auto", device: Device = None, gpus_per_process: GpusPerProcess = 1,
    no_wandb: NoWandb = False,
    predictions: Predictions = None, protocol: Protocol = "official",
) -> None:
    """CHAIR: CHAIR_s, CHAIR_i, recall and mean caption length (greedy protocol, fixed image ids)."""
    _check(out, device, gpus_per_process=gpus_per_process, batch_size=batch_size, max_new_tokens=max_new_tokens,
           limit=limit)
    from evotool.data.inputs import Sample
    from evotool.errors import InputError
    from evotool.evals.chair import (
        CocoObjects,
        load_chair_image_ids,
        load_coco_instances,
        parse_image_id,
        score_captions,
    )
    from evotool.evals.harness import score_chair
    from evotool.mitigate.run import require_file

    objects = CocoObjects(protocol)
    if predictions is None and (image_ids is None or image_dir is None):
        raise InputError("chair needs --image-ids and --image-dir (or --predictions to score given captions)")
    for path in data:
        require_file(path, "COCO annotations")
    truth = load_coco_instances(data, objects)
    config = {"data": [str(d) for d in data], "image_ids": str(image_ids) if image_ids else None, "protocol": protocol}
    if predictions is not None:
        from evotool.evals.predictions import read_predictions

        ids = load_chair_image_ids(image_ids) if image_ids else [parse_image_id(p.key, p.where)
                                                                 for p in read_predictions(predictions)]
    else:
        ids = load_chair_image_ids(image_ids)
    missing = [i for i in ids if i not in truth]
    if missing:
        raise InputError(f"{len(missing)} image ids (e.g. {missing[0]}) have no annotations in {', '.join(map(str, data))}")
    if predictions is not None:
        samples = [Sample(id=str(i), image=Path(), objects=sorted(truth[i])) for i in ids]
        return _score_file("chair", predictions, samples, out, protocol, not no_wandb, config,
                           lambda s, t: score_captions(t, [set(x.objects or ()) for x in s], objects))
    samples = _limit([Sample(id=str(i), image=coco_image(require_file(image_dir, "image dir"), i), prompt=prompt,
                             objects=sorted(truth[i])) for i in ids], limit)
    _run("chair", model, method, set_, stages, out, dtype, device, gpus_per_process, not no_wandb,
         config | {"n": len(samples), "max_new_tokens": max_new_tokens},
         _samples_eval(samples, batch_size, max_new_tokens, lambda s, g: score_chair(s, g, objects)))


@app.command("amber")
def amber(
    data: Annotated[Path, typer.Option(help="AMBER query JSON (query_all.json, query_generative.json ...).")],
    annotations: Annotated[Path, typer.Option(help="AMBER annotations.json.")],
    relation: Annotated[Path, typer.Option(help="AMBER relation.json (object vocabulary).")],
    image_dir: Annotated[Path, typer.Option(help="Folder of the AMBER images.")] = Path("."),
    safe_words: Annotated[Optional[Path], typer.Option(help="AMBER safe_words.txt.")] = None,
    model: Model = None, method: MethodOpt = "greedy", set_: SetOpt = None, stages: Stages = None,
    out: Out = Path("runs/eval/amber"), batch_size: Batch = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per response.")] = 512,
    limit: Limit = None, dtype: Dtype = "auto", device: Device = None, gpus_per_process: GpusPerProcess = 1,
    no_wandb: NoWandb = False,
    predictions: Predictions = None, protocol: Protocol = "official",
) -> None:
    """AMBER: generative CHAIR/Cover/Hal/Cog and discriminative accuracy/precision/recall/F1."""
    _check(out, device, gpus_per_process=gpus_per_process, batch_size=batch_size, max_new_tokens=max_new_tokens,
           limit=limit)
    from evotool.evals.amber import AmberVocabulary, load_amber, parse_amber_answer
    from evotool.evals.harness import score_amber
    from evotool.mitigate.run import require_file

    parse_amber_answer("", protocol)  # protocol errors before anything runs
    vocab = AmberVocabulary.load(require_file(relation, "AMBER relation.json"), safe_words)
    samples = _limit(load_amber(require_file(data, "AMBER queries"), require_file(annotations, "AMBER annotations"),
                                image_dir), limit)
    config = {"data": str(data), "protocol": protocol}
    if predictions is not None:
        return _score_file("amber", predictions, samples, out, protocol, not no_wandb, config,
                           lambda s, t: score_amber(s, t, vocab, protocol))
    _run("amber", model, method, set_, stages, out, dtype, device, gpus_per_process, not no_wandb,
         config | {"n": len(samples), "max_new_tokens": max_new_tokens},
         _samples_eval(samples, batch_size, max_new_tokens, lambda s, g: score_amber(s, g.texts, vocab, protocol)))


@app.command("manifest")
def manifest(
    data: Annotated[Path, typer.Option(help="JSONL manifest: records with objects (captions) or answer (yes/no or free).")],
    model: Model = None, method: MethodOpt = "greedy", set_: SetOpt = None, stages: Stages = None,
    out: Out = Path("runs/eval/manifest"),
    vocab: Annotated[Optional[str], typer.Option(help="Caption vocabulary 'dog,cat=kitten|kitty' (default: the records' objects).")] = None,
    batch_size: Batch = 8, max_new_tokens: Annotated[int, typer.Option(help="Tokens per output.")] = 64,
    limit: Limit = None, dtype: Dtype = "auto", device: Device = None, gpus_per_process: GpusPerProcess = 1,
    no_wandb: NoWandb = False,
    predictions: Predictions = None, protocol: Protocol = "official",
) -> None:
    """Any manifest: CHAIR / recall on caption records, POPE metrics on yes/no records, exact match on free answers; per split."""
    _check(out, device, gpus_per_process=gpus_per_process, batch_size=batch_size, max_new_tokens=max_new_tokens,
           limit=limit)
    from evotool.data.inputs import load_samples
    from evotool.evals.manifest import ObjectVocabulary, check_manifest, score_generations, score_manifest
    from evotool.evals.pope import parse_yes_no
    from evotool.mitigate.run import require_file

    parse_yes_no("", protocol)  # protocol errors before anything runs
    check_manifest(require_file(data, "manifest"))
    samples = _limit(load_samples(data), limit)
    words = ObjectVocabulary.parse(vocab) if vocab else None
    config = {"data": str(data), "vocab": vocab, "protocol": protocol}
    if predictions is not None:
        return _score_file("manifest", predictions, samples, out, protocol, not no_wandb, config,
                           lambda s, t: score_manifest(s, t, None, words, protocol))
    _run("manifest", model, method, set_, stages, out, dtype, device, gpus_per_process, not no_wandb,
         config | {"n": len(samples), "max_new_tokens": max_new_tokens},
         _samples_eval(samples, batch_size, max_new_tokens, lambda s, g: score_generations(s, g, words, protocol)))


@app.command("world")
def world(
    model: Model = None, method: MethodOpt = "greedy", set_: SetOpt = None, stages: Stages = None,
    data: Annotated[Optional[Path], typer.Option(help="world.json (a WorldConfig, as `evotool world` writes); default: the default world.")] = None,
    out: Out = Path("runs/eval/world"),
    n: Annotated[int, typer.Option("--n", "--records", help="Records per task and group (--records under torchrun, which takes --n for its own).")] = 200,
    seed: Annotated[int, typer.Option(help="World seed (0 = test split; tune on another).")] = 0,
    batch_size: Batch = 50, max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 32,
    dtype: Dtype = "auto", device: Device = None, gpus_per_process: GpusPerProcess = 1,
    no_wandb: NoWandb = False,
) -> None:
    """Synthetic world with exact ground truth: captions (CHAIR, recall) and POPE, in-distribution and prior-breaking."""
    _check(out, device, gpus_per_process=gpus_per_process, n=n, batch_size=batch_size, max_new_tokens=max_new_tokens)
    from dataclasses import replace

    from evotool.errors import InputError
    from evotool.evals.harness import evaluate_world_methods
    from evotool.io import read_json
    from evotool.world import WorldConfig

    stored = read_json(data, InputError, "world config") if data else {}
    if not isinstance(stored, dict):
        raise InputError(f"{data}: a world config is a JSON object, got {type(stored).__name__}")
    try:
        cfg = WorldConfig(**stored)
    except TypeError as err:
        raise InputError(f"{data}: not a world config ({err})") from err
    cfg = replace(cfg, seed=seed)
    _run("world", model, method, set_, stages, out, dtype, device, gpus_per_process, not no_wandb,
         {"world": cfg.__dict__, "n": n, "max_new_tokens": max_new_tokens},
         lambda m, p, methods: evaluate_world_methods(m, p, methods, n, cfg, batch_size, max_new_tokens))
