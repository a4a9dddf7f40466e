"""Calibration statistics of the baseline selectors: block influence and pairwise angular distances."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from evotool.data.inputs import Sample
from evotool.finetune import collate
from evotool.generation import batches
from evotool.hooks import capture_states
from evotool.models.registry import decoder_parts
from evotool.prune.select import CalibrationStats


@torch.inference_mode()
def calibrate(model: nn.Module, processor: Any, samples: Sequence[Sample], batch_size: int = 8) -> CalibrationStats:
    """Block influence and pairwise angular distances from teacher-forced ``samples`` (all positions)."""
    parts = decoder_parts(model)
    n = parts.num_layers
    cos_sum = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    ang_sum = torch.zeros_like(cos_sum)
    count = 0
    with capture_states(parts.layers) as states:
        for batch_samples in batches(samples, batch_size):
            batch = collate(processor, batch_samples, model.device)
            mask = batch.pop("attention_mask").bool()
            batch.pop("labels")
            model(attention_mask=mask.long(), **batch)
            h = torch.stack([s[mask] for s in states]).double()  # [L+1, N, H]
            h = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            for i in range(n + 1):
                cos = (h[i : i + 1] * h[i:]).sum(-1).clamp(-1, 1)  # [L+1-i, N]
                cos_sum[i, i:] += cos.sum(-1)
                ang_sum[i, i:] += (torch.arccos(cos) / torch.pi).sum(-1)
            count += h.shape[1]
    mean_cos = (cos_sum / count).numpy()
    influence = np.full(n + 1, np.nan)
    influence[1:] = 1.0 - np.diagonal(mean_cos, offset=1)
    return CalibrationStats(block_influence=influence, angular=(ang_sum / count).numpy(), tokens=count)
