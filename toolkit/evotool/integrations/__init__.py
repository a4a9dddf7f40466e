"""evotool where users already work.

hf      evotool's decoding methods inside plain ``model.generate`` (:func:`evotool.decoding`) and as
        transformers ``custom_generate`` directories (``evotool export-generate``)
lmms    an ``evotool`` model for lmms-eval (``pip install 'evotool[lmms]'``; registered through the
        ``lmms_eval.models`` entry point) and lmms-eval tasks built from the synthetic world
hub     model cards with Hub metadata and ``--push-to-hub`` for the checkpoints evotool writes
"""

from __future__ import annotations

from typing import Any


def lmms_manifest() -> Any:
    """The ``lmms_eval.models`` entry point: ``--model evotool`` is :class:`evotool.integrations.lmms.EvotoolLMM`.

    Kept out of :mod:`evotool.integrations.lmms` so that lmms-eval can load it while that module imports
    lmms-eval (the model class is imported only when ``--model evotool`` is asked for).
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="evotool", simple_class_path="evotool.integrations.lmms.EvotoolLMM")
