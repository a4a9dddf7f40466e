"""Distances between vocabulary distributions, computed in log space in float32.

All functions take log-probabilities ``logp`` of shape [..., V] (natural log) and reduce the last
dimension. Zero-probability entries (``-inf``) contribute 0, as in the definitions.
"""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)


def _plogp_diff(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum_v p_v (log p_v - log q_v), with 0 * anything = 0."""
    p = logp.exp()
    term = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    return term.sum(-1)


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) in nats: [..., V] x [..., V] -> [...]."""
    return _plogp_diff(logp.float(), logq.float())


def js_divergence(logp: torch.Tensor, logq: torch.Tensor, base: float = math.e) -> torch.Tensor:
    """Jensen-Shannon divergence (KL(P||M) + KL(Q||M)) / 2 with M = (P + Q) / 2: [..., V] -> [...].

    In nats by default; ``base=2`` gives bits (then bounded by 1).
    """
    logp, logq = logp.float(), logq.float()
    logm = torch.logaddexp(logp, logq) - LN2
    js = 0.5 * (_plogp_diff(logp, logm) + _plogp_diff(logq, logm))
    js = js.clamp_min(0.0)
    return js / math.log(base) if base != math.e else js


def entropy(logp: torch.Tensor, base: float = math.e) -> torch.Tensor:
    """Shannon entropy -sum p log p: [..., V] -> [...]."""
    logp = logp.float()
    p = logp.exp()
    h = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    return h / math.log(base) if base != math.e else h


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of hidden states: [..., H] x [..., H] -> [...]."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)
