"""Lossless stable-stage skipping: self-speculative greedy decoding with a stage-guided draft (docs/prune.md)."""

from evotool.prune.speculative.decoding import SpeculativeStats, speculative_decoding, speculative_generate

__all__ = ["SpeculativeStats", "speculative_decoding", "speculative_generate"]
