"""evotool: how multimodal knowledge evolves layer by layer inside vision-language models.

Subpackages
-----------
models     architecture registry and loading (any HF image-text-to-text model)
lens       logit-lens readouts (normed / reference) of every layer's hidden state
metrics    divergences and entropies in log space
trace      greedy generation that records every layer's last-position state, reduced on device
stages     automatic critical / mutation layer detection
analysis   the `analyze` run: per-token metrics, stages.json, figures, report
world      the synthetic vision-language world and the shipped demo model
prune      stage-guided layer removal, runtime skipping, early exit, healing
mitigate   hallucination interventions at the mutation layers and baselines
recipes    end-to-end scripts (one YAML config each, in evotool.configs)
evals      POPE, CHAIR, AMBER and the synthetic world's exact-ground-truth evals
integrations  evotool.decoding for plain `model.generate`, custom_generate export, lmms-eval, Hub cards

``evotool.decoding(model, method, stages=..., batch_size=..., **options)`` (from :mod:`evotool.integrations.hf`)
is the one top-level function: an evotool decoding method inside a plain ``model.generate`` call.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``evotool.decoding``, imported on first use (it pulls in torch and transformers)."""
    if name == "decoding":
        from evotool.integrations.hf import decoding

        return decoding
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
