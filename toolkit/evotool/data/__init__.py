"""Inputs: samples (image + prompt + optional ground truth) from folders, JSONL, datasets, the world."""

from evotool.data.inputs import DEFAULT_PROMPT, Sample, load_samples

__all__ = ["DEFAULT_PROMPT", "Sample", "load_samples"]
