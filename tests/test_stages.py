"""Stage detection recovers boundaries planted in constructed curves, reports its uncertainty, and flags degenerate
curves instead of forcing boundaries."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest

from conftest import V7_MUTATION as V7
from conftest import V8_MUTATION
from evotool.errors import ConfigError
from evotool.stages import StageConfig, StageResult, detect_stages
from evotool.stages.detect import CRITICAL_RULES


class Planted(NamedTuple):
    p: np.ndarray  # p_token [N, L+1]
    flip: np.ndarray  # direct_flip [N, L+1]
    depth: np.ndarray  # decision depth [N]
    js: np.ndarray  # direct_js [N, L+1]


def planted(num_layers: int, critical: int, mutation: int | None, tokens: int, rng: np.random.Generator,
            late_flips: int | None = None) -> Planted:
    """Curves of ``tokens`` tokens: p_token [N, L+1] rising until ``critical``, then flat; direct_flip [N, L+1] with
    rare background flips, a third of the tokens decided by ``mutation``'s own update and a quarter by the layer
    right after the critical one (the tail of rapid evolution), or by ``late_flips`` when given; direct_js [N, L+1]:
    0.05-0.3 where a planted update decides the token, 0.001-0.004 for the background flips (near ties, as in zoo
    runs), below 2e-4 elsewhere; decision depths: 90% of the tokens decided at one of the three layers up to
    ``critical``, the rest only at the output."""
    depth = np.where(rng.random(tokens) < 0.9, rng.integers(max(1, critical - 2), critical + 1, tokens), num_layers)
    p = np.empty((tokens, num_layers + 1))
    for i in range(tokens):
        top = rng.uniform(0.8, 0.99)
        p[i, : critical + 1] = np.linspace(0.0, 0.9 * top, critical + 1)
        p[i, critical:] = top * rng.uniform(0.97, 1.0, num_layers + 1 - critical)
    flip = (rng.random((tokens, num_layers + 1)) < 0.002).astype(float)
    js = np.where(flip > 0, rng.uniform(0.001, 0.004, flip.shape), rng.uniform(0.0, 2e-4, flip.shape))
    tail = critical + 1 if late_flips is None else late_flips
    planted_rows = [(slice(None, tokens // 4), tail)]
    if mutation is not None:
        planted_rows.append((slice(tokens // 3, 2 * tokens // 3), mutation))
    for rows, layer in planted_rows:
        flip[rows, layer] = 1.0
        js[rows, layer] = rng.uniform(0.05, 0.3, len(range(tokens)[rows]))
    flip[:, 0] = js[:, 0] = np.nan
    return Planted(p, flip, depth, js)


def detect(c: Planted, groups: np.ndarray | None = None, cfg: StageConfig | None = None) -> StageResult:
    return detect_stages(c.p, c.flip, groups, cfg, c.depth, direct_js=c.js)


@pytest.mark.parametrize("rule,signal", [("depth", "js"), ("probability", "js"), ("depth", "flip")])
@pytest.mark.parametrize("num_layers,critical,mutation", [(32, 18, 28), (12, 5, 10), (24, 9, 24), (8, 3, 6)])
def test_planted_boundaries_recovered_exactly(num_layers: int, critical: int, mutation: int, rule: str, signal: str) -> None:
    c = planted(num_layers, critical, mutation, 400, np.random.default_rng(critical))
    groups = np.arange(400) % 40  # every sample holds tokens of each kind
    res = detect(c, groups, StageConfig(critical_rule=rule, mutation_signal=signal))
    assert res.critical_layer == critical
    assert res.mutation_layers == [mutation]  # the flips right after the critical layer are not a mutation
    assert res.stages == {
        "rapid_evolution": [0, critical],
        "stabilization": [critical + 1, mutation - 1],
        "mutation": [mutation, num_layers],
    }
    assert res.interval["critical"] == [critical, critical]
    assert res.interval["mutation"][0] <= mutation == res.interval["mutation"][1]
    # the flip signal's background flips move the first mutation in some resamples (v2-v4's noise): flagged then
    assert res.flags == ([] if signal == "js" or res.interval["mutation"][0] >= mutation - 1 else ["uncertain_mutation"])
    assert res.mutation_stats["histogram"][mutation] >= 400 // 3


def test_evidence_curves_are_the_median_probability_decided_share_and_direct_effects() -> None:
    p, flip, depth, js = c = planted(12, 5, 10, 60, np.random.default_rng(0))
    res = detect(c, cfg=StageConfig(bootstrap=0))
    np.testing.assert_allclose(res.evidence["median_p"], np.median(p, axis=0))
    np.testing.assert_allclose(res.evidence["decided_share"], [np.mean(depth <= layer) for layer in range(13)])
    assert res.evidence["direct_flip"][0] is None
    np.testing.assert_allclose(res.evidence["direct_flip"][1:], flip[:, 1:].mean(axis=0))
    assert res.evidence["direct_js"][0] is None
    np.testing.assert_allclose(res.evidence["direct_js"][1:], js[:, 1:].mean(axis=0))
    assert res.interval == {"critical": None, "mutation": None}


def test_rise_fraction_moves_the_critical_layer() -> None:
    p = np.tile([0.0, 0.1, 0.5, 0.8, 0.92, 0.96, 1.0], (60, 1))
    for fraction, layer in ((0.95, 5), (0.9, 4), (0.5, 2)):
        cfg = StageConfig(bootstrap=0, critical_rule="probability", rise_fraction=fraction)
        assert detect_stages(p, cfg=cfg).critical_layer == layer


def test_depth_share_moves_the_critical_layer() -> None:
    """Decision depths 1..6 of 60 tokens (10 each): 80% are decided by layer 5, half by layer 3."""
    p, depth = np.full((60, 7), 0.5), np.repeat(np.arange(1, 7), 10)
    for share, layer in ((0.8, 5), (0.5, 3), (1.0, 6)):
        assert detect_stages(p, cfg=StageConfig(bootstrap=0, depth_share=share), decision_depth=depth).critical_layer == layer
    with pytest.raises(ConfigError, match="decision depths"):
        detect_stages(p, cfg=StageConfig(bootstrap=0))
    with pytest.raises(ConfigError, match="decision_depth"):
        detect_stages(p, decision_depth=depth[:10])


def test_object_tokens_decided_late_move_the_critical_layer() -> None:
    """A caption's frame decided early, its objects late (v4): 70 frame tokens decided at layers 1-2, 30 object tokens
    at 6-9 of 10. All tokens: 80% decided by layer 7; object tokens: 80% only by layer 9."""
    p = np.full((100, 11), 0.5)
    depth = np.r_[np.repeat([1, 2], 35), np.repeat([6, 7, 8, 9], [6, 6, 11, 7])]
    objects = np.r_[np.zeros(70, bool), np.ones(30, bool)]
    assert np.mean(depth <= 7) >= 0.8 > np.mean(depth <= 6) and np.mean(depth[objects] <= 8) < 0.8

    def critical(cfg: StageConfig, obj: np.ndarray | None = objects) -> StageResult:
        return detect_stages(p, cfg=cfg, decision_depth=depth, objects=obj)

    v4 = critical(StageConfig(bootstrap=0))
    assert v4.critical_layer == 9
    np.testing.assert_allclose(v4.evidence["object_decided_share"], [np.mean(depth[objects] <= lay) for lay in range(11)])
    assert v4.critical_spread["object_tokens"] == 30
    assert critical(StageConfig(bootstrap=0, object_share=0.5)).critical_layer == 8  # 23 of 30 by layer 8
    for v3 in (critical(StageConfig(bootstrap=0, object_share=0.0)), critical(StageConfig(bootstrap=0), None),
               critical(StageConfig(bootstrap=0, min_object_tokens=31))):  # off, no mask, too few object tokens
        assert v3.critical_layer == 7 and v3.evidence["object_decided_share"] is None
    assert critical(StageConfig(bootstrap=0, critical_rule="probability")).evidence["object_decided_share"] is None
    # the object share can only move the critical layer later: with objects decided first it is the all-token layer
    assert detect_stages(p, cfg=StageConfig(bootstrap=0), decision_depth=depth, objects=~objects).critical_layer == 7
    with pytest.raises(ConfigError, match="objects"):
        detect_stages(p, decision_depth=depth, objects=objects[:10])
    # resamples keep each token's object flag: the interval is the object layer's
    assert critical(StageConfig(bootstrap=50)).interval["critical"][1] == 9


def test_no_mutation_is_reported_not_forced() -> None:
    res = detect(planted(20, 8, None, 80, np.random.default_rng(2)))
    assert res.critical_layer == 8
    assert res.mutation_layers == []
    assert res.stages["mutation"] is None and res.stages["stabilization"] == [9, 20]
    assert res.interval["mutation"] is None


def test_weak_late_change_is_not_a_mutation() -> None:
    """Signal flip (v4): a layer deciding 1% of the tokens stays below mutation_min_flip, however quiet the other
    layers are. Signal js (v5): a layer must stand out by mutation_ratio (8) times the post-critical median of the
    mean direct-effect JS: 4x is a bump, 12x a mutation; below mutation_min_js nothing is, whatever the ratio."""
    c = planted(16, 6, None, 200, np.random.default_rng(3))
    c.flip[:, 1:] = 0.0
    c.flip[:2, 12] = 1.0
    assert detect(c, cfg=StageConfig(mutation_signal="flip")).mutation_layers == []
    c.js[:, 1:] = 1e-4
    for factor, found in ((4, []), (12, [12])):
        c.js[:, 12] = factor * 1e-4
        assert detect(c).mutation_layers == found
    c.js[:, 1:] /= 100
    assert detect(c).mutation_layers == []  # 12x the median, but a mean JS of 1.2e-5 < mutation_min_js


def test_last_layer_excess_tells_sharpening_from_mutation() -> None:
    """A last layer that moves a little mass on every token (JS 0.02 each: confidence only) stands out by its mean
    direct JS, so v6 (mutation_last_excess 0) calls it a mutation; v7's excess signal (0.03, the default) does not.
    A last layer that rewrites 5% of the tokens (JS 0.3) is a mutation under both; layers before the last are judged
    as in v6."""
    c = planted(12, 4, None, 400, np.random.default_rng(11))
    c.js[:, 12] = 0.02  # sharpening: 100x the post-critical median of ~1e-4
    v6, v7 = StageConfig(bootstrap=0, mutation_last_excess=0, **V7), StageConfig(bootstrap=0, **V7)
    assert detect(c, cfg=v6).mutation_layers == [12]
    assert detect(c, cfg=v6).evidence["last_layer_excess"] is None
    res = detect(c, np.arange(400) % 40, StageConfig(bootstrap=20))
    assert res.mutation_layers == [] and res.interval["mutation"] is None and res.interval["mutation_share"] == 0
    excess = np.maximum(c.js[:, 1:] - 0.03, 0).sum(axis=0) / len(c.js)  # reference: a plain loop-free mean
    assert res.evidence["last_layer_excess"][1:] == pytest.approx(excess.tolist())
    c.js[::20, 12] = 0.3  # 20 of 400 tokens rewritten: mean excess 0.0135 >= mutation_last_min
    assert detect(c, cfg=v7).mutation_layers == detect(c, cfg=v6).mutation_layers == [12]
    c.js[:, 9] = 0.02  # a mid-stack layer is still read by its mean direct JS
    assert detect(c, cfg=v7).mutation_layers == [9, 12]
    c.js[::20, 12] = 0.035  # a 0.005 excess on 5% of the tokens: below mutation_last_min
    assert detect(c, cfg=v7).mutation_layers == [9]
    assert (StageConfig().mutation_last_excess, StageConfig(mutation_signal="flip").mutation_last_excess) == (0.03, 0.0)
    with pytest.raises(ConfigError, match="mutation_last_excess"):
        StageConfig(mutation_last_excess=0.03, mutation_signal="flip")
    with pytest.raises(ConfigError, match="mutation_last_min"):
        StageConfig(mutation_last_min=2.0)


V8 = StageConfig(bootstrap=0, **V8_MUTATION)  # the default from holdout26 to holdout30


def test_v8_reference_leaves_the_layer_out_and_quiet_tier_reads_small_standouts() -> None:
    """Few post-critical layers with two large ones (a 6-layer stack, critical 2, direct JS 1e-4, 1.5e-4, 0.005,
    0.0035 at layers 3-6, as in zoo member l6-qwen2-w64-prior): their median over all four (0.0018) hides layer 5
    (2.7x); v8 divides by the median of the other three (1.5e-4: 33x) and finds it. The last layer is judged on its
    excess over JS 0.03 (none here) either way. The quiet tier: 3.9e-4 at 30x a 1.3e-5 median is under
    mutation_min_js (0.001), found at quiet ratio 20 and floor 2e-4, not at 40x or under a floor of 5e-4."""
    c = planted(6, 2, None, 300, np.random.default_rng(12))
    c.js[:, 1:] = 1e-4
    c.js[:, 4:] = 1.5e-4, 0.005, 0.0035
    assert detect(c, cfg=StageConfig(bootstrap=0, **V7)).critical_layer == 2
    assert detect(c, cfg=StageConfig(bootstrap=0, **V7)).mutation_layers == []
    assert detect(c, cfg=V8).mutation_layers == [5]
    others = np.median(np.delete(c.js[0, 3:], 2))  # reference: layer 5 left out of layers 3-6
    assert c.js[0, 5] >= 8 * others and c.js[0, 5] < 8 * np.median(c.js[0, 3:])
    q = planted(20, 5, None, 300, np.random.default_rng(13))
    q.js[:, 1:] = 1.3e-5
    q.js[:, 16] = 30 * 1.3e-5  # 3.9e-4: 30x the median, under mutation_min_js
    assert detect(q, cfg=StageConfig(bootstrap=0, **V7)).mutation_layers == []
    assert detect(q, cfg=V8).mutation_layers == [16]
    assert detect(q, cfg=StageConfig(bootstrap=0, **V8_MUTATION | {"mutation_quiet_ratio": 40})).mutation_layers == []
    assert detect(q, cfg=StageConfig(bootstrap=0, **V8_MUTATION, mutation_quiet_min_js=5e-4)).mutation_layers == []
    assert (StageConfig().mutation_reference, StageConfig().mutation_quiet_ratio) == ("all", 0.0)  # v7 again since holdout30
    assert (StageConfig(mutation_signal="flip").mutation_reference, StageConfig(mutation_signal="flip").mutation_quiet_ratio) == ("all", 0.0)
    with pytest.raises(ConfigError, match="mutation_reference"):
        StageConfig(mutation_reference="mean")
    with pytest.raises(ConfigError, match="mutation_quiet_ratio"):
        StageConfig(mutation_quiet_ratio=4)  # under mutation_ratio 8
    with pytest.raises(ConfigError, match="mutation_quiet_ratio"):
        StageConfig(mutation_signal="flip", mutation_quiet_ratio=20)
    with pytest.raises(ConfigError, match="mutation_quiet_min_js"):
        StageConfig(mutation_quiet_min_js=-0.001)
    assert detect(q, cfg=StageConfig(bootstrap=0, mutation_min_js=0.0)).mutation_layers == [16]  # a floor sweep to 0 stays valid


def test_critical_at_the_output_has_no_stable_stage() -> None:
    p = np.tile(np.r_[np.zeros(11), 1.0], (60, 1))  # the emitted token only appears at the last layer
    res = detect_stages(p, np.zeros_like(p), decision_depth=np.full(60, 11))
    assert res.critical_layer == 11
    assert res.stages == {"rapid_evolution": [0, 11], "stabilization": None, "mutation": None}
    assert "no_stable_stage" in res.flags


def test_one_layer_stable_stage_is_flagged() -> None:
    res = detect(planted(12, 5, 7, 90, np.random.default_rng(4)))
    assert res.stages["stabilization"] == [6, 6]
    assert "short_stable_stage" in res.flags


def test_too_few_tokens_gives_null_boundaries() -> None:
    res = detect(planted(12, 5, 10, 20, np.random.default_rng(5)))
    assert res.critical_layer is None and res.mutation_layers == []
    assert res.stages == {"rapid_evolution": [0, 12], "stabilization": None, "mutation": None}
    assert res.flags == ["too_few_tokens"]


def test_missing_direct_effect_leaves_mutation_undecided() -> None:
    c = planted(12, 5, 10, 60, np.random.default_rng(6))
    res = detect_stages(c.p, decision_depth=c.depth)
    assert res.critical_layer == 5 and res.mutation_layers == []
    assert "no_direct_effect" in res.flags


def test_disagreeing_samples_widen_the_interval() -> None:
    """Half the samples settle at layer 3, half at layer 9: the bootstrap interval spans both, and is flagged."""
    rng = np.random.default_rng(7)
    early, late = planted(16, 3, None, 60, rng), planted(16, 9, None, 60, rng)
    groups = np.repeat(np.arange(12), 10)
    res = detect_stages(np.concatenate([early.p, late.p]), np.concatenate([early.flip, late.flip]), groups,
                        StageConfig(critical_rule="probability"))
    lo, hi = res.interval["critical"]
    assert lo <= 4 and hi >= 8
    assert "wide_interval" in res.flags


def test_bad_config_and_shapes_rejected() -> None:
    with pytest.raises(ConfigError, match="rise_fraction"):
        StageConfig(rise_fraction=1.5)
    with pytest.raises(ConfigError, match="critical_rule"):
        StageConfig(critical_rule="js")
    with pytest.raises(ConfigError, match="depth_share"):
        StageConfig(depth_share=0.0)
    with pytest.raises(ConfigError, match="mutation_ratio"):
        StageConfig(mutation_ratio=0.5)
    with pytest.raises(ConfigError, match="object_share"):
        StageConfig(object_share=1.2)
    with pytest.raises(ConfigError, match="min_object_tokens"):
        StageConfig(min_object_tokens=-1)
    with pytest.raises(ConfigError, match="mutation_signal"):
        StageConfig(mutation_signal="cos")
    with pytest.raises(ConfigError, match="mutation_min_js"):
        StageConfig(mutation_min_js=-0.1)
    assert (StageConfig().mutation_ratio, StageConfig(mutation_signal="flip").mutation_ratio) == (8.0, 3.0)
    assert StageConfig(mutation_signal="flip", mutation_ratio=5).mutation_ratio == 5
    with pytest.raises(ConfigError):
        detect_stages(np.zeros((0, 5)))
    with pytest.raises(ConfigError, match="direct_flip"):
        detect_stages(np.zeros((60, 5)), np.zeros((60, 4)))
    with pytest.raises(ConfigError, match="direct_js"):
        detect_stages(np.zeros((60, 5)), direct_js=np.zeros((60, 4)))


def test_uncertainty_flags_warn_where_resamples_leave_the_tolerance() -> None:
    """A mutation carried by a third of the samples is found in some resamples and not in others: flagged; a planted
    boundary every sample shares stays unflagged. The flags agree with a loop-free reading of the bootstrap values."""
    rng = np.random.default_rng(11)
    clean = planted(16, 5, 12, 60, rng)
    res = detect(clean)
    assert res.critical_layer == 5 and res.mutation_layers == [12]
    assert not {"wide_interval", "uncertain_mutation"} & set(res.flags)
    mutated, plain = planted(16, 5, 12, 20, rng), planted(16, 5, None, 40, rng)
    groups = np.repeat(np.arange(12), 5)  # 4 samples carry the mutation, 8 do not
    both = detect_stages(np.concatenate([mutated.p, plain.p]), np.concatenate([mutated.flip, plain.flip]), groups,
                         StageConfig(mutation_signal="flip"), np.concatenate([mutated.depth, plain.depth]))
    share = both.interval["mutation_share"]
    assert 0.1 < share < 0.9
    assert "uncertain_mutation" in both.flags
    lo, hi = both.interval["critical"]
    assert ("wide_interval" in both.flags) == (lo < both.critical_layer - 1 or hi > both.critical_layer + 1)
    with pytest.raises(ConfigError, match="flag_tolerance"):
        StageConfig(flag_tolerance=-1)


@pytest.mark.parametrize("name, value, message", [
    ("check_recall", 1.5, r"check_recall=1.5 must lie in \[0, 1\]$"),
    ("check_add_share", -0.1, r"check_add_share=-0.1 must lie in \[0, 1\]$"),
    ("check_chair_guard", 2.0, r"check_chair_guard=2.0 must lie in \[0, 1\] or be null \(off\)"),
    ("check_add_cut", -0.5, r"check_add_cut=-0.5 must lie in \[0, 1\] or be null \(off\)"),
])
def test_check_options_are_validated(name: str, value: float, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        StageConfig(**{name: value})
    StageConfig(**{name: 0.5})  # in range
    if name in ("check_chair_guard", "check_add_cut"):
        StageConfig(**{name: None})  # off
