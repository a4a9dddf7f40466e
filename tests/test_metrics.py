"""Divergences and entropy against scipy and torch.distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy as scipy_entropy

from evotool.metrics import cosine_similarity, entropy, js_divergence, kl_divergence


def _dists(seed: int, n: int = 6, v: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(n, v, generator=g) * 3, -1)
    logq = torch.log_softmax(torch.randn(n, v, generator=g) * 3, -1)
    return logp, logq


@pytest.mark.parametrize("base", [math.e, 2.0])
def test_js_matches_scipy(base: float) -> None:
    logp, logq = _dists(0)
    ours = js_divergence(logp, logq, base=base)
    for i in range(len(logp)):
        ref = jensenshannon(logp[i].exp().double().numpy(), logq[i].exp().double().numpy(), base=base) ** 2
        assert ours[i].item() == pytest.approx(ref, rel=1e-4, abs=1e-7)


def test_js_with_zero_probabilities_and_bounds() -> None:
    p = torch.tensor([0.5, 0.5, 0.0, 0.0])
    q = torch.tensor([0.0, 0.0, 0.5, 0.5])
    js = js_divergence(p.log(), q.log(), base=2.0)  # disjoint supports: exactly 1 bit
    assert js.item() == pytest.approx(1.0, abs=1e-6)
    assert js_divergence(p.log(), p.log()).item() == pytest.approx(0.0, abs=1e-7)
    ref = jensenshannon([0.7, 0.3, 0.0], [0.1, 0.1, 0.8]) ** 2
    ours = js_divergence(torch.tensor([0.7, 0.3, 0.0]).log(), torch.tensor([0.1, 0.1, 0.8]).log())
    assert ours.item() == pytest.approx(ref, rel=1e-5)


def test_kl_and_entropy_match_torch_distributions() -> None:
    logp, logq = _dists(1)
    P = torch.distributions.Categorical(logits=logp)
    Q = torch.distributions.Categorical(logits=logq)
    torch.testing.assert_close(kl_divergence(logp, logq), torch.distributions.kl_divergence(P, Q), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(entropy(logp), P.entropy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(entropy(logp, base=2).numpy(), scipy_entropy(logp.exp().numpy().T, base=2), rtol=1e-4)


def test_js_is_stable_in_half_precision_inputs() -> None:
    logp, logq = _dists(2, v=32000)
    full = js_divergence(logp, logq)
    half = js_divergence(logp.half(), logq.half())
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half, full, rtol=2e-2, atol=1e-3)


def test_cosine() -> None:
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(cosine_similarity(a, b), torch.nn.functional.cosine_similarity(a, b, dim=-1))
    assert cosine_similarity(a, 2 * a).allclose(torch.ones(3))
