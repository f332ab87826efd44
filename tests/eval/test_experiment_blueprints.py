"""The hype-length experiment (docs/results/hype-length.md): its four blueprints validate, differ only in the
position policy (and the pure-attention model's layout), stay out of the built-in list; and the script that
runs them shrinks them consistently at toy scale and draws its figures from a results file."""

import functools
import json
from pathlib import Path

import pytest

from bench_scripts import load_bench

from hyloom.blueprint import builtin_names, load_blueprint
from hyloom.cli import main

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "blueprints" / "experiments"
VARIANTS = ("hype", "rope", "nope", "attn-rope")


def leaves(tree, prefix=()):
    """{dotted path: value} of every leaf of a nested dict (lists are leaves)."""
    if not isinstance(tree, dict):
        return {".".join(prefix): tree}
    out = {}
    for key, value in tree.items():
        out.update(leaves(value, (*prefix, str(key))))
    return out


@functools.cache
def _resolved(variant, overrides):
    bp = load_blueprint(str(FOLDER / f"hype-length-{variant}.yaml"), list(overrides))
    return json.dumps(bp.model_dump(mode="json"))


def resolved(variant, overrides=()):
    return json.loads(_resolved(variant, tuple(overrides)))  # a fresh copy: callers may not share one


def differing(a, b):
    la, lb = leaves(a), leaves(b)
    return sorted(k for k in set(la) | set(lb) if la.get(k, "<absent>") != lb.get(k, "<absent>"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_blueprint_validates_on_meta(variant, capsys):
    assert main(["validate", str(FOLDER / f"hype-length-{variant}.yaml")]) == 0
    assert capsys.readouterr().out.startswith("ok:")


def test_the_variants_differ_only_in_position_and_layout():
    hype = resolved("hype")
    assert hype["model"]["position"]["type"] == "hype"
    assert hype["model"]["layout"] == list("LLLALLLA")  # 1:3 attention:Lightning
    assert hype["data"]["seq_len"] == hype["model"]["max_seq_len"] == 512
    for other in ("rope", "nope"):
        changed = differing(hype, resolved(other))
        assert "model.position.type" in changed
        assert all(k.startswith("model.position.") for k in changed), changed
    attn = resolved("attn-rope")
    assert attn["model"]["layout"] == ["A"] * 8
    changed = differing(hype, attn)
    assert all(k.startswith(("model.position", "model.layout", "model.layers")) for k in changed), changed
    assert attn["model"]["position"] == resolved("rope")["model"]["position"]
    for other in ("rope", "nope", "attn-rope"):  # same data, tokens, seed and budget
        assert resolved(other)["data"] == hype["data"]
        assert resolved(other)["train"] == hype["train"]


def test_the_mix_holds_retrieval_examples_at_a_quarter_of_the_tokens():
    items = resolved("hype")["data"]["source"]["sources"]
    weights = {item["source"]["type"]: item["weight"] for item in items}
    assert set(weights) == {"stdlib", "passkey", "niah"}
    assert 0.2 <= (weights["passkey"] + weights["niah"]) / sum(weights.values()) <= 0.3
    assert all(item["tiers"] == [] for item in items if item["source"]["type"] != "stdlib")


def test_experiments_are_not_builtin_blueprints(capsys):
    assert not any("hype-length" in name or "experiments" in name for name in builtin_names())
    assert main(["ls", "blueprints"]) == 0
    assert "hype-length" not in capsys.readouterr().out


def script():
    return load_bench("hype_length")


def test_toy_scale_shrinks_every_variant_the_same_way():
    bench = script()
    toy = bench.SCALES["toy"]
    shrunk = {v: resolved(v, toy["overrides"]) for v in VARIANTS}
    for v in VARIANTS:
        assert differing(resolved(v), shrunk[v]) == differing(resolved("hype"), shrunk["hype"])
        assert shrunk[v]["data"]["seq_len"] == min(toy["lengths"])  # 1x, then extrapolated lengths
    assert min(bench.SCALES["full"]["lengths"]) == resolved("hype")["data"]["seq_len"]


def test_figures_and_summary_from_a_results_file(tmp_path):
    """Figures are drawn from results.json alone, a variant without training (query-scaled HyPE) or without
    a task included; the summary names every variant with its numbers."""
    bench = script()
    lengths, depths = [256, 512], [0.0, 1.0]

    def retrieval(prefix, score):
        rows = [{"length": n, "depth": d, "score": score} for n in lengths for d in depths]
        return {"metrics": {f"{prefix}/acc@{n}": score for n in lengths}, "rows": rows}

    def loss(nll):
        rows = [{"length": n, "end": e, "nll": nll} for n in lengths for e in (1, 2, n)]
        return {"metrics": {f"loss/nll@{n}": nll for n in lengths}, "rows": rows}

    train = {"steps": 10, "tokens": 20480, "seconds": 1.0, "train_loss": 5.0, "eval_loss": 5.5,
             "curve": [{"step": 5, "loss": 6.0}, {"step": 10, "loss": 5.0, "eval_loss": 5.5}]}
    results = {"scale": "toy", "device": "cpu", "train_len": 256,
               "eval": {"lengths": lengths, "depths": depths},
               "variants": {"hype": {"parameters": 1000, "train": train, "eval_seconds": 2.0,
                                     "eval": {"passkey": retrieval("passkey", 0.75),
                                              "niah": retrieval("niah_single", 0.5), "loss_by_position": loss(4.0)}},
                            "hype+a": {"parameters": 1000, "eval": {"passkey": retrieval("passkey", 0.25),
                                                                    "loss_by_position": loss(4.5)}}}}
    bench.figures(json.loads(json.dumps(results)), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy_by_length.png", "loss_by_position.png",
                                                          "retrieval.png", "training.png"]
    text = bench.summary(results)
    assert "hybrid, HyPE + query scaling" in text and "0.750" in text and "0.250" in text and "4.500" in text
    assert "512*" in text and " 256 " in text  # lengths past training are starred


def test_the_budget_sets_equal_steps_after_the_evaluations():
    bench = script()
    step_s = {"hype": 0.1, "attn-rope": 0.3}
    evals = {"hype": 20.0, "attn-rope": 10.0}
    # 400 s left: 400 - 30 (evals) - 21 (5% of 420) - 6 (3 s a variant) = 343 s for 1.1 x 0.4 s a step
    assert bench.steps_that_fit(400, step_s, evals, 420) == int(343 / 0.44)
    assert bench.steps_that_fit(200, step_s, evals, 420) < bench.steps_that_fit(400, step_s, evals, 420)
    assert bench.steps_that_fit(40, step_s, evals, 420) < 0  # nothing fits: the caller's min_steps applies
    full, toy = bench.SCALES["full"], bench.SCALES["toy"]
    cal = {"forward_longest_s": 1.0}
    with_a, plain = bench.eval_estimate(cal, full, True), bench.eval_estimate(cal, full, False)
    assert with_a > plain > bench.eval_estimate(cal, toy, False)


@pytest.mark.slow
def test_toy_run_end_to_end(tmp_path, monkeypatch):
    """The script as documented, at toy scale on two variants with a few steps: every file, every variant."""
    monkeypatch.setenv("HOME", str(tmp_path))  # a fresh data cache
    bench = script()
    out = tmp_path / "out"
    assert bench.main(["--scale", "toy", "--device", "cpu", "--steps", "3", "--variants", "hype,attn-rope",
                       "--out", str(out), "--work", str(tmp_path / "runs")]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["accuracy_by_length.png", "loss_by_position.png",
                                                     "results.json", "retrieval.png", "summary.txt", "training.png"]
    results = json.loads((out / "results.json").read_text())
    assert list(results["variants"]) == ["hype", "hype+a", "attn-rope"]
    for name in ("hype", "attn-rope"):
        v = results["variants"][name]
        assert v["train"]["steps"] == 3 and v["train"]["tokens"] == 3 * 8 * 256
        assert set(v["eval"]) == {"passkey", "niah", "loss_by_position"}
        assert {r["length"] for r in v["eval"]["passkey"]["rows"]} == {256, 512, 1024}
    assert results["variants"]["hype+a"]["query_scaling_a"] == 500.0
