"""The lmms-eval plugin end to end: lmms-eval's own evaluator, the `evotool` model found through the
entry point, the synthetic world as local tasks; numbers and texts equal evotool's own eval."""

from __future__ import annotations

import pytest
import torch

lmms_eval = pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance  # noqa: E402

from evotool.errors import ConfigError, InputError  # noqa: E402
from evotool.evals.world import evaluate_world  # noqa: E402
from evotool.generation import build_inputs, decode  # noqa: E402
from evotool.integrations.lmms import EvotoolLMM, StopOnStrings, write_world_tasks  # noqa: E402
from evotool.mitigate.methods import build_method  # noqa: E402
from evotool.models.loading import load_model  # noqa: E402
from evotool.stages import StageFile  # noqa: E402
from evotool.world import WorldConfig, default_model_path, make_records  # noqa: E402

N = 8
CAPTION, POPE = "evotool_world_prior_breaking_caption", "evotool_world_in_distribution_pope_adversarial"


def test_world_tasks_through_lmms_eval_equal_evotool_eval(demo_stages, tmp_path):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    names = write_world_tasks(tmp_path / "tasks", n=N, seed=0, max_new_tokens=32)
    assert {CAPTION, POPE} <= set(names) and len(names) == 8
    args = f"method=stage_contrast,stages={demo_stages},weight=0.5,options={{\"alpha\": 0.01}}"
    out = simple_evaluate(model="evotool", model_args=args, tasks=[CAPTION, POPE], batch_size=4, bootstrap_iters=0,
                          task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False))
    model, processor = load_model(default_model_path())  # a fresh copy: nothing shared with the plugin's model
    method = build_method("stage_contrast", model, {"weight": 0.5, "alpha": 0.01}, StageFile.read(demo_stages))
    ref = evaluate_world(model, processor, N, WorldConfig(seed=0), batch_size=4, max_new_tokens=32, generate_fn=method.generate)
    caption, pope = out["results"][CAPTION], out["results"][POPE]
    for key in ("chair_s", "chair_i", "recall"):
        assert caption[f"{key},none"] == pytest.approx(ref["prior_breaking"]["caption"][key]), key
    for ours, theirs in (("accuracy", "accuracy"), ("precision", "precision"), ("recall", "recall"), ("f1", "f1_score")):
        assert pope[f"pope_{theirs},none"] == pytest.approx(ref["in_distribution"]["pope_adversarial"][ours]), ours
    # record by record: lmms-eval's responses are the method's texts, and the method is not greedy here
    records = make_records("caption", "prior_breaking", N, WorldConfig(seed=0))
    _, texts = method.generate(model, processor, [r["image"] for r in records], [r["prompt"] for r in records], 32)
    _, greedy = build_method("greedy", model).generate(model, processor, [r["image"] for r in records],
                                                        [r["prompt"] for r in records], 32)
    got = [s["filtered_resps"][0] for s in sorted(out["samples"][CAPTION], key=lambda s: s["doc_id"])]
    assert got == texts and texts != greedy


@pytest.fixture(scope="module")
def plugin():
    return EvotoolLMM(batch_size=3)


def _requests(lm: EvotoolLMM, records: list[dict], gen_kwargs: list[dict]) -> list[Instance]:
    lm.task_dict = {"t": {"test": [{"image": r["image"]} for r in records]}}
    return [_instance((r["prompt"], dict(g), lambda doc: [doc["image"]], i, "t", "test")) for i, (r, g) in
            enumerate(zip(records, gen_kwargs))]


def _instance(args: tuple) -> Instance:
    return Instance("generate_until", args, args[3], {"task": args[4], "doc_id": args[3], "repeats": 1})


def test_generation_kwargs_are_honoured(plugin):
    """max_new_tokens and `until` per request group, request order kept across groups and batches."""
    records = make_records("caption", "prior_breaking", 5, WorldConfig(seed=0))
    until, short = {"until": [","], "max_new_tokens": 32}, {"max_new_tokens": 3}
    kwargs = [until, short, short, short, until]
    got = plugin.generate_until(_requests(plugin, records, kwargs))
    model, processor = plugin.model, plugin.processor
    inputs = build_inputs(processor, [r["image"] for r in records], [r["prompt"] for r in records])
    with torch.no_grad():
        full = model.generate(**inputs, do_sample=False, max_new_tokens=32)[:, inputs["input_ids"].shape[1]:]
    texts3 = decode(processor, full[:, :3].tolist())
    texts = decode(processor, full.tolist())
    expected = [texts3[i] if "until" not in k else texts[i].split(",")[0] for i, k in enumerate(kwargs)]
    assert got == expected
    assert all("," in texts[i] for i in (0, 4)), "the stop string must occur in these captions"


def test_stop_strings_stop_rows(plugin):
    tok = plugin.tokenizer
    prompt = tok.convert_tokens_to_ids(["USER", ":"])
    rows = [prompt + tok.convert_tokens_to_ids(t) for t in (["a", "red", "circle", ","], ["a", "red", "circle", "."])]
    stop = StopOnStrings(tok, [","], prompt_len=2)
    assert stop(torch.tensor(rows), torch.zeros(2, 1)).tolist() == [True, False]
    assert StopOnStrings(tok, [":"], prompt_len=2)(torch.tensor(rows), torch.zeros(2, 1)).tolist() == [False, False]


def test_sampling_follows_the_task_temperature(plugin):
    records = make_records("caption", "prior_breaking", 2, WorldConfig(seed=0))
    torch.manual_seed(0)
    got = plugin.generate_until(_requests(plugin, records, [{"temperature": 5.0, "max_new_tokens": 8}] * 2))
    inputs = build_inputs(plugin.processor, [r["image"] for r in records], [r["prompt"] for r in records])
    torch.manual_seed(0)
    ref = plugin.model.generate(**inputs, do_sample=True, temperature=5.0, top_p=None, top_k=None, max_new_tokens=8)
    assert got == decode(plugin.processor, ref[:, inputs["input_ids"].shape[1]:].tolist())


def test_refusals(plugin):
    records = make_records("caption", "test", 1, WorldConfig(seed=0))
    with pytest.raises(ConfigError, match="num_beams"):
        plugin.generate_until(_requests(plugin, records, [{"num_beams": 2}]))
    plugin.task_dict = {"t": {"test": [{}]}}
    two = _instance(("x", {}, lambda doc: [records[0]["image"]] * 2, 0, "t", "test"))
    with pytest.raises(InputError, match="exactly one image"):
        plugin.generate_until([two])
    with pytest.raises(ConfigError, match="unknown method"):
        EvotoolLMM(method="nope")
