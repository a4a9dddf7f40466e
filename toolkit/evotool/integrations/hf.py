"""evotool's decoding methods inside plain transformers code.

:func:`decoding` binds a method to a model for a ``with`` block: the method's hooks are active inside it
and it yields the ``model.generate`` keyword arguments (the method's logits processors)::

    with evotool.decoding(model, "stage_contrast", stages="runs/demo", batch_size=len(images)) as kw:
        out = model.generate(**inputs, **kw, max_new_tokens=32)

:func:`export_generate` writes a method as a transformers ``custom_generate`` directory
(``OUT/custom_generate/generate.py`` + ``requirements.txt``), the convention DoLa uses on the Hub:
``model.generate(**inputs, custom_generate=str(OUT), trust_remote_code=True)`` then decodes with it,
VCD included. The method, its full config and the stage fields it reads are embedded in ``generate.py``;
the stage file's model fingerprint is checked against the model at generation time. The directory
needs evotool installed (``requirements.txt`` says so), not its CLI.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessorList

from evotool import __version__
from evotool.config import to_dict
from evotool.errors import ConfigError
from evotool.io import atomic_write_text, write_json
from evotool.mitigate.methods import build_method, make_config, method_class
from evotool.mitigate.run import MethodSpec, load_stages_for, method_for, resolve_spec
from evotool.stages import StageFile

CUSTOM_GENERATE = "custom_generate"
EXPORT_SCHEMA = "1.0"

_TEMPLATE = '''"""evotool decoding method `{method}` as a transformers custom_generate function.

    model.generate(**inputs, custom_generate="{folder}", trust_remote_code=True)

Exported by `evotool export-generate` (evotool {version}). Method settings: {options}.
Stage file: {stages} (made for the model with fingerprint {fingerprint}; other models are refused).
"""

import json

RECORD = json.loads({record!r})


def generate(model, *args, **kwargs):
    from evotool.integrations.hf import generate_with

    return generate_with(model, RECORD, *args, **kwargs)
'''


def _spec(method: str | Path, stages: str | Path | None, options: dict[str, Any]) -> MethodSpec:
    """The decoding method named by ``method`` (a name or an ``evotool mitigate`` run directory)."""
    spec = resolve_spec(str(method), options, str(stages) if stages is not None else None)
    if spec.model is not None:
        raise ConfigError(f"{method} is a trained method: load its checkpoint {spec.model} and decode greedily")
    return spec


@contextmanager
def decoding(model: nn.Module, method: str | Path = "greedy", stages: str | Path | None = None, batch_size: int = 1,
             **options: Any) -> Iterator[dict[str, Any]]:
    """Decode with an evotool method inside plain ``model.generate`` calls on batches of ``batch_size`` rows.

    Inside the block the method's forward hooks are active; the yielded dict (``logits_processor``, or
    empty for hook-only methods) goes to ``model.generate(**inputs, **kw)``. The logits processors check
    every step against ``batch_size`` (so beam search is refused). Methods that change the batch (VCD adds
    noised-image rows) are refused: run them with :func:`export_generate` or ``Method.generate``.
    ``stage_speculative`` yields transformers' ``custom_generate`` callable (``skip=auto`` calibrates at ``batch_size``).
    ``method`` is a name or an ``evotool mitigate`` run directory (``options`` override its settings); the
    stage file (stage-aware methods) must belong to ``model``.
    """
    bound = method_for(model, _spec(method, stages, options))
    if bound.changes_batch:
        raise ConfigError(f"method {bound.name!r} adds rows to the batch, which plain generate kwargs cannot do; "
                          "use `evotool export-generate` and model.generate(custom_generate=DIR, trust_remote_code=True)")
    with bound.generation_kwargs(batch_size) as kwargs:
        yield kwargs


def export_generate(method: str | Path, out: Path, stages: str | Path | None = None,
                    options: dict[str, Any] | None = None) -> Path:
    """Write ``out/custom_generate/`` (``generate.py``, ``requirements.txt``, ``method.json``) for the method;
    ``out`` may be a checkpoint folder (then ``from_pretrained(out, trust_remote_code=True)`` decodes with it
    by default). Returns the ``custom_generate`` folder."""
    spec = _spec(method, stages, options or {})
    config = make_config(spec.method, spec.options)
    stage_file = load_stages_for(None, spec)
    if method_class(spec.method).needs_stages:  # its layers against the stage file, before anything is written
        build_method(spec.method, None, spec.options, stage_file)
    record = {"evotool_version": __version__, "method": spec.method, "options": to_dict(config),
              "stages": embedded_stages(stage_file) if stage_file else None, "stage_file": spec.stages}
    folder = Path(out) / CUSTOM_GENERATE
    text = _TEMPLATE.format(method=spec.method, folder=out, version=__version__, options=json.dumps(record["options"]),
                            stages=spec.stages or "none", fingerprint=stage_file.fingerprint if stage_file else "any",
                            record=json.dumps(record))
    atomic_write_text(folder / "generate.py", text)
    atomic_write_text(folder / "requirements.txt", f"evotool>={__version__}\n")
    write_json(folder / "method.json", record, schema=EXPORT_SCHEMA)
    return folder


def embedded_stages(stage_file: StageFile) -> dict[str, Any]:
    """The fields of ``stage_file`` that methods read, as a stage-file object (:meth:`StageFile.from_payload`)."""
    return {"schema_version": stage_file.payload["schema_version"], "model": stage_file.model,
            "fingerprint": stage_file.fingerprint, "num_layers": stage_file.num_layers, "flags": stage_file.flags,
            **stage_file.boundaries()}


def generate_with(model: nn.Module, record: dict[str, Any], inputs: torch.Tensor | None = None,
                  logits_processor: LogitsProcessorList | None = None, **kwargs: Any) -> Any:
    """The body of an exported ``generate.py``: ``model.generate`` with the recorded method.

    ``kwargs`` are ``generate``'s arguments (``input_ids`` [B, T], ``pixel_values``, ...,
    ``max_new_tokens``, ...). Returns what ``generate`` returns, with the batch's B rows.
    """
    stages = StageFile.from_payload(record["stages"], "custom_generate/method.json") if record["stages"] else None
    if stages is not None:
        stages.check_model(model, "re-run `evotool analyze` and `evotool export-generate` on this model")
    method = build_method(record["method"], model, record["options"], stages)
    if inputs is not None:
        kwargs["input_ids"] = inputs
    rows = kwargs["input_ids"].shape[0]
    config = kwargs.get("generation_config") or model.generation_config
    if method.changes_batch:
        if kwargs.get("do_sample", config.do_sample) or kwargs.get("return_dict_in_generate", config.return_dict_in_generate):
            raise ConfigError(f"method {method.name!r} picks one token per pair of rows and returns token ids only: "
                              "pass do_sample=False (sample with its option sample=true) and no return_dict_in_generate")
        kwargs.update(method.prepare({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}))
    with method.generation_kwargs(rows) as extra:
        processors = LogitsProcessorList([*(logits_processor or []), *extra.pop("logits_processor", [])])
        out = type(model).generate(model, logits_processor=processors, **kwargs, **extra)
    return out[:rows] if method.changes_batch else out
