"""What differs between the transformers releases evotool supports (5.17 and later), decided once from the version.

Each flag names the first release that behaves the new way; ``.ci/run`` runs the test suite on the newest release
and on the oldest that pyproject admits.
"""

from __future__ import annotations

import transformers
from packaging.version import Version

_VERSION = Version(transformers.__version__)

CACHE_KEY = "cache" if _VERSION >= Version("5.24") else "past_key_values"
"""The name of the KV cache in model calls, ``generate``'s model kwargs and its outputs (renamed in 5.24)."""
PALIGEMMA_SOFTCAPS = _VERSION >= Version("5.23")
"""Whether PaliGemma's forward soft-caps its logits with the text config's value (5.22 and earlier return them raw)."""
MIXED_ATTENTION_OK = _VERSION >= Version("5.24")
"""Whether speculative decoding can draft models with several attention types (Gemma 3's sliding and full layers):
on 5.17 the verify step's masks and the cropped sliding-window cache disagree (5.18-5.23 untested)."""
