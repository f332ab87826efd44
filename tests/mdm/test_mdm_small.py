"""The AR-vs-MDM experiment (bench/mdm_small.py): its two blueprints validate and differ only in model.causal and
train.objective; the toy scale shrinks both alike; the likelihood estimators and probe measures give known
values on hand-built inputs; figures and the summary come from a results file alone."""

import json
import math
from pathlib import Path

import pytest
import torch

from bench_scripts import load_bench

from hyloom.blueprint import builtin_names, load_blueprint
from hyloom.cli import main

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "blueprints" / "experiments"


def resolved(name, overrides=()):
    return load_blueprint(str(FOLDER / f"mdm-{name}.yaml"), list(overrides)).model_dump(mode="json")


def leaves(tree, prefix=()):
    if not isinstance(tree, dict):
        return {".".join(prefix): tree}
    out = {}
    for key, value in tree.items():
        out.update(leaves(value, (*prefix, str(key))))
    return out


def differing(a, b):
    la, lb = leaves(a), leaves(b)
    return sorted(k for k in set(la) | set(lb) if la.get(k, "<absent>") != lb.get(k, "<absent>"))


def script():
    return load_bench("mdm_small")


@pytest.mark.parametrize("name", ["ar", "mdm"])
def test_each_blueprint_validates_on_meta(name, capsys):
    assert main(["validate", str(FOLDER / f"mdm-{name}.yaml")]) == 0
    assert capsys.readouterr().out.startswith("ok:")


def test_the_two_differ_only_in_causal_and_objective():
    ar, mdm = resolved("ar"), resolved("mdm")
    assert ar["model"]["causal"] is True and mdm["model"]["causal"] is False
    assert ar["train"]["objective"]["type"] == "next_token" and mdm["train"]["objective"]["type"] == "mdm"
    changed = differing(ar, mdm)
    assert all(k == "model.causal" or k.startswith("train.objective") for k in changed), changed
    # a hybrid whose Lightning layers decay both ways when bidirectional, without the gate that removes sinks
    assert set(mdm["model"]["layout"]) == {"A", "L"}
    assert mdm["model"]["mixers"]["L"]["bidirectional_decay"] == "symmetric"
    assert mdm["model"]["mixers"]["A"]["gate"] is False
    assert not any("mdm-" in name for name in builtin_names())


def test_toy_scale_shrinks_both_alike():
    toy = script().SCALES["toy"]["overrides"]
    ar, mdm = resolved("ar", toy), resolved("mdm", toy)
    assert differing(resolved("ar"), ar) == differing(resolved("mdm"), mdm)
    assert ar["data"] == mdm["data"] and ar["data"]["seq_len"] == 128


class Uniform(torch.nn.Module):
    """Equal logits everywhere (every token costs log V); remembers its inputs."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.seen = vocab, []
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids_BT):
        self.seen.append(ids_BT.clone())
        return torch.zeros(*ids_BT.shape, self.vocab) + self.weight


def test_likelihood_estimators_on_a_uniform_model():
    bench = script()
    V, mask_id, cpu = 50, 1, torch.device("cpu")
    windows = torch.randint(2, V, (12, 33), generator=torch.Generator().manual_seed(0))
    ar = bench.ar_nll(Uniform(V), windows, cpu, batch=5)
    assert ar["nll"] == pytest.approx(math.log(V)) and ar["se"] == pytest.approx(0, abs=1e-6)
    assert ar["windows"] == 12 and ar["tokens_per_window"] == 32 and len(ar["per_window"]) == 12
    model = Uniform(V)
    got = bench.mdm_bound(model, windows, cpu, batch=5, mask_id=mask_id, eps=1e-3, draws=8)
    # E[#masked / p] = 32 tokens: the bound's expectation is exactly log V; the estimate lies within its noise
    assert abs(got["bound"] - math.log(V)) < 4 * got["se"] + 1e-9
    assert len(got["by_t"]) == 8 and got["by_t"][0]["t_lo"] == 0 and got["by_t"][-1]["t_hi"] == 1
    assert len(model.seen) == 3 * 8  # 3 batches x 8 strata
    for noisy in model.seen:
        assert not (noisy[:, 0] == mask_id).any()  # token 0 conditions, as for the AR model
    assert any((noisy == mask_id).any() for noisy in model.seen)


def step(anchors_by_layer, incoming_by_layer):
    return {"layers": {layer: {"anchors": a, "incoming": incoming_by_layer[layer]}
                       for layer, a in anchors_by_layer.items()}}


def test_probe_measures_on_hand_built_reports():
    bench = script()
    layers = {"0": "lightning: |implicit decayed attention|, rows normalised", "1": "softmax attention",
              "2": "softmax attention"}
    flat = [1.0, 1.0, 1.0, 1.0]
    sink = [7.0, 1.0, 1.0, 1.0]
    # attention layers: layer 1 anchored at 0 throughout; layer 2 at 0, then 2, then nothing
    report = {"layers": layers, "steps": [
        step({"0": [], "1": [0], "2": [0]}, {"0": flat, "1": sink, "2": sink}),
        step({"0": [], "1": [0], "2": [2]}, {"0": flat, "1": sink, "2": flat}),
        step({"0": [], "1": [0], "2": []}, {"0": flat, "1": sink, "2": flat}),
    ]}
    got = bench.probe_measures([report])
    one, two = got["layers"]["1"], got["layers"]["2"]
    assert one["kind"] == "attention" and got["layers"]["0"]["kind"] == "lightning"
    assert one["jaccard_over_steps"] == 1 and one["pos0_anchor"] == 1 and one["pos0_share"] == pytest.approx(0.7)
    assert two["jaccard_over_steps"] == 0 and two["pos0_anchor"] == pytest.approx(1 / 3)
    assert two["distinct_anchor_positions"] == 2 and two["anchored"] == pytest.approx(2 / 3)
    assert got["layers"]["0"]["jaccard_over_steps"] is None  # never anchored: no pair to compare
    attention = got["by_kind"]["attention"]
    assert attention["jaccard_over_steps"] == pytest.approx(2 / 4)  # pairs 1,1 (layer 1), 0,0 (layer 2)
    assert attention["jaccard_across_layers"] == pytest.approx(1 / 3)  # steps: same, different, one empty
    assert got["by_kind"]["lightning"]["anchored"] == 0


def test_figures_and_summary_from_a_results_file(tmp_path):
    bench = script()
    curve = [{"step": 5, "loss": 6.0}, {"step": 10, "loss": 5.0, "eval_loss": 5.5}]
    train = {"steps": 10, "tokens": 20480, "seconds": 1.0, "train_loss": 5.0, "eval_loss": 5.5, "curve": curve}
    kinds = {"attention": {"jaccard_over_steps": 1.0, "jaccard_across_layers": 1.0, "pos0_share": 0.61,
                           "pos0_anchor": 1.0, "anchored": 1.0, "distinct_anchor_positions": 1}}
    layer = {"kind": "attention", "jaccard_over_steps": None, "pos0_share": 0.5, "pos0_anchor": 0.0,
             "anchored": 0.0, "distinct_anchor_positions": 0}
    results = {"scale": "toy", "device": "cpu", "seq_len": 128, "gap": {"bound_minus_nll": 0.5, "se": 0.03},
               "models": {
        "ar": {"parameters": 1000, "train": train, "likelihood": {"nll": 4.25, "se": 0.01, "windows": 8},
               "probe": {"layers": {"1": layer}, "by_kind": kinds},
               "samples": [{"prompt": "def ", "continuation": "f(x):", "nfe": 4}]},
        "mdm": {"parameters": 1000, "train": train,
                "likelihood": {"bound": 4.75, "se": 0.05, "windows": 8, "draws": 4,
                               "by_t": [{"t_lo": 0, "t_hi": 0.5, "integrand": 4.5},
                                        {"t_lo": 0.5, "t_hi": 1, "integrand": 5.0}]}}}}
    bench.figures(json.loads(json.dumps(results)), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["likelihood.png", "probe_metrics.png", "training.png"]
    text = bench.summary(results)
    assert "4.2500 ± 0.0100" in text and "0.5000 ± 0.0300" in text and "4.7500 ± 0.0500" in text and "0.610" in text and "'f(x):'" in text


@pytest.mark.slow
def test_toy_run_end_to_end(tmp_path, monkeypatch):
    """The script as documented, at toy scale with a few steps: every file, both models, every phase."""
    monkeypatch.setenv("HOME", str(tmp_path))  # a fresh data cache
    out = tmp_path / "out"
    assert script().main(["--scale", "toy", "--device", "cpu", "--steps", "3", "--out", str(out),
                          "--work", str(tmp_path / "runs")]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["likelihood.png", "probe-ar", "probe-mdm", "probe.png",
                                                     "probe_metrics.png", "results.json", "summary.txt",
                                                     "training.png"]
    results = json.loads((out / "results.json").read_text())
    for name in ("ar", "mdm"):
        v = results["models"][name]
        assert v["train"]["steps"] == 3 and v["train"]["tokens"] == 3 * 8 * 128
        assert set(v) >= {"likelihood", "samples", "probe"}
        assert (out / f"probe-{name}" / "probe.json").exists()
    assert results["models"]["mdm"]["samples"][0]["options"]["remasking"] == "low_confidence"
