"""lmms-eval plugin: the ``evotool`` model (any HF VLM + any evotool decoding method) and the synthetic
world as lmms-eval tasks. Needs ``pip install 'evotool[lmms]'``.

lmms-eval finds the model through the ``lmms_eval.models`` entry point
(:func:`evotool.integrations.lmms_manifest`)::

    lmms-eval --model evotool --tasks pope --batch_size 8 \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=stage_contrast,stages=runs/llava/stages.json

``model_args``: ``pretrained`` (hub id or path; default: the shipped demo model, or the checkpoint of a
trained mitigate run), ``method`` (a method name or an ``evotool mitigate`` run directory), ``stages``,
``dtype``, ``device``, ``options`` (a JSON object of method options) and any other ``key=value`` as one
method option (``weight=0.5``). Requests are batched in the order lmms-eval gives them, grouped by
generation kwargs; decoding is greedy unless the task asks for ``temperature > 0`` / ``do_sample``;
``max_new_tokens`` and the ``until`` stop strings are honoured. One image per request.

:func:`write_world_tasks` writes the synthetic world's eval records (the records ``evotool eval world``
scores) as a local ``datasets`` dataset plus one lmms-eval task YAML per group and task; the POPE tasks
use lmms-eval's own POPE prompt, parsing and metrics, the caption tasks CHAIR on the world's vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from evotool.errors import ConfigError, InputError
from evotool.evals.chair import chair_metrics
from evotool.evals.world import GROUPS, POPE_TASKS, caption_mentions
from evotool.generation import build_inputs, context_length, decode
from evotool.io import atomic_write_text
from evotool.mitigate.methods import make_config
from evotool.mitigate.run import method_for, resolve_spec
from evotool.models.loading import LoadOptions, load_model

DEFAULT_MAX_NEW_TOKENS = 256
WORLD_TAG = "evotool_world"


class EvotoolLMM(lmms):
    """An HF image-text-to-text model decoding with an evotool method (see the module docstring)."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, method: str = "greedy", stages: str | None = None,
                 options: str | dict[str, Any] | None = None, batch_size: int | str = 1, device: str | None = None,
                 dtype: str = "auto", max_batch_size: int | None = None, **method_options: Any) -> None:
        super().__init__()
        from evotool.analysis.run import resolve_model_id

        extra = json.loads(options) if isinstance(options, str) else dict(options or {})
        spec = resolve_spec(str(method), {**extra, **method_options}, str(stages) if stages is not None else None)
        make_config(spec.method, spec.options)  # option errors before the model loads
        if str(batch_size) == "auto" or int(batch_size) < 1:
            raise ConfigError(f"batch_size must be a positive integer, not {batch_size!r}")
        self.batch_size = int(batch_size)
        self.model, self.processor = load_model(resolve_model_id(pretrained or spec.model),
                                                LoadOptions(dtype=dtype, device=device))
        self.method = method_for(self.model, spec)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """One continuation per request (``args``: context, gen_kwargs, doc_to_visual, doc_id, task, split),
        batched within groups of equal generation kwargs, in request order."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        texts: list[str] = [""] * len(requests)
        for indices in groups.values():
            until, max_new_tokens, kwargs = generation_settings(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                args = [requests[i].args for i in chunk]
                inputs = build_inputs(self.processor, [self._image(*a[2:]) for a in args], [a[0] for a in args],
                                      self.model.device, self.model.dtype, context_length(self.model))
                if until:
                    stop = StopOnStrings(self.tokenizer, until, inputs["input_ids"].shape[1])
                    kwargs["stopping_criteria"] = StoppingCriteriaList([stop])
                ids = self.method.generate_ids(inputs, max_new_tokens, **kwargs)
                for i, a, text in zip(chunk, args, decode(self.processor, ids)):
                    texts[i] = cut_at_stop(text, until)
                    self.cache_hook.add_partial("generate_until", (a[0], a[1]), texts[i])
        return texts

    def _image(self, doc_to_visual: Any, doc_id: int, task: str, split: str) -> Image.Image:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if len(visuals) != 1 or not isinstance(visuals[0], Image.Image):
            raise InputError(f"{task} doc {doc_id}: the evotool model takes exactly one image per request, got {len(visuals)} visuals")
        return visuals[0].convert("RGB")

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("the evotool model changes decoding; it runs generate_until tasks only")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the evotool model runs single-round generate_until tasks only")


class StopOnStrings(StoppingCriteria):
    """Stops a row once its generated text contains one of ``stops`` (any tokenizer; transformers'
    ``stop_strings`` needs a subword vocabulary). Reads the last ``window`` tokens of each row."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], prompt_len: int) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.prompt_len = prompt_len
        self.window = max((len(s) for s in self.stops), default=0) + 2  # a token holds >= 1 character

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        tails = self.tokenizer.batch_decode(input_ids[:, max(self.prompt_len, input_ids.shape[1] - self.window):],
                                            skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in tails], device=input_ids.device)


def generation_settings(gen_kwargs: dict[str, Any]) -> tuple[list[str], int, dict[str, Any]]:
    """lmms-eval generation kwargs -> (stop strings, max_new_tokens, ``generate`` sampling kwargs).

    Greedy unless ``do_sample`` or ``temperature > 0``; ``num_beams`` must be 1; other keys are ignored.
    """
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    if int(gen_kwargs.get("num_beams") or 1) != 1:
        raise ConfigError("evotool decoding methods decode with num_beams=1")
    temperature = float(gen_kwargs.get("temperature") or 0)
    sampling: dict[str, Any] = {}
    if gen_kwargs.get("do_sample") or temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature or 1.0, "top_p": gen_kwargs.get("top_p")}
    return until, int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS), sampling


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string (lmms-eval's convention)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


# ----------------------------------------------------------------------------- the world as lmms-eval tasks


def world_doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    return [doc["image"].convert("RGB")]


def world_doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    return doc["prompt"]


def world_caption_results(doc: dict[str, Any], results: Sequence[str]) -> dict[str, dict[str, list[str]]]:
    """Per caption: its world shape mentions (repeats kept, as CHAIR_i counts them) and the shapes present,
    under every CHAIR metric."""
    item = {"mentioned": [shape for _, shape in caption_mentions(results[0])], "truth": list(doc["objects"])}
    return {"chair_s": item, "chair_i": item, "recall": item}


def _chair(items: Sequence[dict[str, list[str]]], key: str) -> float:
    return chair_metrics([i["mentioned"] for i in items], [set(i["truth"]) for i in items], [0] * len(items))[key]


def world_chair_s(items: Sequence[dict[str, list[str]]]) -> float:
    return _chair(items, "chair_s")


def world_chair_i(items: Sequence[dict[str, list[str]]]) -> float:
    return _chair(items, "chair_i")


def world_recall(items: Sequence[dict[str, list[str]]]) -> float:
    return _chair(items, "recall")


_FUNCTIONS = {"caption": (f"{__name__}.world_doc_to_visual", f"{__name__}.world_doc_to_text", f"{__name__}.world_caption_results"),
              "pope": ("lmms_eval.tasks.pope.utils.pope_doc_to_visual", "lmms_eval.tasks.pope.utils.pope_doc_to_text",
                       "lmms_eval.tasks.pope.utils.pope_process_results")}
_METRICS = {"caption": [("chair_s", f"{__name__}.world_chair_s", False), ("chair_i", f"{__name__}.world_chair_i", False),
                        ("recall", f"{__name__}.world_recall", True)],
            "pope": [(f"pope_{m}", f"lmms_eval.tasks.pope.utils.pope_aggregate_{m}", True)
                     for m in ("accuracy", "precision", "recall", "f1_score", "yes_ratio")]}


def world_task_yaml(name: str, data: Path, split: str, kind: str, max_new_tokens: int) -> str:
    """One lmms-eval task config over split ``split`` of the dataset saved at ``data``."""
    visual, text, results = _FUNCTIONS[kind]
    metrics = "".join(f"  - metric: {m}\n    aggregation: !function {agg}\n    higher_is_better: {str(up).lower()}\n"
                      for m, agg, up in _METRICS[kind])
    return (f"task: {name}\ntag: {WORLD_TAG}\ndataset_path: {json.dumps(str(data))}\ndataset_kwargs:\n  load_from_disk: true\n"
            f"test_split: {split}\noutput_type: generate_until\ndoc_to_visual: !function {visual}\n"
            f"doc_to_text: !function {text}\ndoc_to_target: answer\n"
            f"generation_kwargs:\n  max_new_tokens: {max_new_tokens}\n  temperature: 0\n  do_sample: false\n"
            f"process_results: !function {results}\nmetric_list:\n{metrics}"
            "lmms_eval_specific_kwargs:\n  default:\n    pre_prompt: \"\"\n    post_prompt: \"\"\n"
            "metadata:\n  version: 1.0\n")


def write_world_tasks(out: Path, n: int = 200, seed: int = 0, max_new_tokens: int = 32) -> list[str]:
    """The world's held-out eval records (``evotool eval world``'s: same ``n`` and ``seed``) as lmms-eval tasks.

    Writes ``out/data`` (a ``datasets.DatasetDict`` with one split per group and task, POPE splits with
    the ``question_id`` / ``question`` columns lmms-eval's POPE expects) and ``out/<task>.yaml`` for
    ``--include_path out``; every task carries the tag ``evotool_world``. Returns the task names.
    """
    import datasets

    from evotool.world import WorldConfig, make_split

    if n < 1 or max_new_tokens < 1:
        raise ConfigError("n and max_new_tokens must be positive")
    out = Path(out).resolve()
    world = WorldConfig(seed=seed)
    splits: dict[str, datasets.Dataset] = {}
    names = []
    for group, world_split in GROUPS.items():
        for task in ("caption", *POPE_TASKS):
            ds = make_split(task, world_split, n, world)
            if task != "caption":
                ds = ds.add_column("question_id", ds["id"]).add_column("question", ds["prompt"])
            split = f"{group}_{task}"
            splits[split] = ds
            name = f"{WORLD_TAG}_{split}"
            atomic_write_text(out / f"{name}.yaml", world_task_yaml(name, out / "data", split,
                                                                     "caption" if task == "caption" else "pope", max_new_tokens))
            names.append(name)
    datasets.DatasetDict(splits).save_to_disk(str(out / "data"))
    return names
