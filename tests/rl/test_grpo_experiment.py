"""The GRPO experiment (bench/grpo_small.py): its two blueprints validate, differ only in the model and have the
same size; the toy scale shrinks both alike; the difficulty is picked from the sweep; figures and the summary are
drawn from a results file alone."""

import importlib.util
import json
from pathlib import Path

import pytest

from hyloom.blueprint import load_blueprint
from hyloom.cli import main
from hyloom.model import build_model

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "blueprints" / "experiments"


def script():
    spec = importlib.util.spec_from_file_location("grpo_small", ROOT / "bench" / "grpo_small.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def resolved(model, overrides=()):
    return load_blueprint(str(FOLDER / f"grpo-{model}.yaml"), list(overrides))


@pytest.mark.parametrize("model", ["dense", "hybrid"])
def test_each_blueprint_validates_on_meta(model, capsys):
    assert main(["validate", str(FOLDER / f"grpo-{model}.yaml")]) == 0
    assert capsys.readouterr().out.startswith("ok:")


def test_dense_and_hybrid_differ_only_in_the_model_and_match_in_size():
    dense, hybrid = resolved("dense"), resolved("hybrid")
    assert [s.name for s in dense.stages] == ["sft", "grpo"]
    assert [s.train.type for s in dense.stages] == ["lm", "grpo"]
    a, b = dense.model_dump(mode="json"), hybrid.model_dump(mode="json")
    assert {k for k in a if a[k] != b[k]} == {"model"}
    assert "".join(hybrid.model.layout) == "LLLALLLA" and set(dense.model.layout) == {"A"}
    n_dense, n_hybrid = (build_model(bp, device="meta").num_parameters() for bp in (dense, hybrid))
    assert abs(n_dense - n_hybrid) / n_dense < 1e-3
    grpo = dense.stages[1].train  # SPEC §8's fixed hyper-parameters, except the size-scaled LR
    assert (grpo.group_size, grpo.updates_per_step, grpo.clip_low, grpo.clip_high, grpo.dual_clip, grpo.kl_coef,
            grpo.entropy_coef, grpo.temperature) == (8, 4, 0.2, 0.28, 10.0, 0.0, 0.0, 1.0)
    # the SFT text ends its prompt where the trainer's template does, and eval problems come from their own seed
    assert dense.data.source.template == grpo.prompt_template
    assert len({dense.data.source.seed, grpo.prompts.seed, grpo.eval_prompts.seed}) == 3


def test_toy_scale_shrinks_both_models_alike():
    bench = script()
    toy = bench.SCALES["toy"]
    shrunk = {m: resolved(m, toy["overrides"] + toy["model_overrides"][m]) for m in ("dense", "hybrid")}
    sizes = [build_model(bp, device="meta").num_parameters() for bp in shrunk.values()]
    assert abs(sizes[0] - sizes[1]) / sizes[0] < 0.01 and max(sizes) < 400_000
    a, b = (bp.model_dump(mode="json") for bp in shrunk.values())
    assert {k for k in a if a[k] != b[k]} == {"model"}


def test_the_difficulty_nearest_the_target_accuracy():
    bench = script()
    sweep = {"dense": {"1": {"accuracy": 0.9}, "2": {"accuracy": 0.6}, "3": {"accuracy": 0.3}},
             "hybrid": {"1": {"accuracy": 0.8}, "2": {"accuracy": 0.4}, "3": {"accuracy": 0.05}}}
    assert bench.TARGET_ACCURACY == 0.30
    assert bench.pick_level(sweep) == 3  # furthest model 0.6, 0.3, 0.25 from 0.30
    sweep["dense"]["2"]["accuracy"] = 0.2
    assert bench.pick_level(sweep) == 2  # both 0.1 from 0.30
    # run 2's case: a mean near 0.30 can hide a model that is already good; the furthest model decides
    sweep = {"dense": {"6": {"accuracy": 0.55}, "7": {"accuracy": 0.35}},
             "hybrid": {"6": {"accuracy": 0.05}, "7": {"accuracy": 0.25}}}
    assert bench.pick_level(sweep) == 7  # means 0.3 and 0.3: the tie would pick 6 by the mean


def test_figures_and_summary_from_a_results_file(tmp_path):
    bench = script()
    curve = [{"step": s, "entropy": 1.0 - 0.1 * s, "response_length_mean": 30.0 + s, "clipped": 0.0,
              "reward_mean": -0.5 + 0.1 * s} for s in (1, 2, 3)]
    grpo = {"steps": 3, "seconds": 12.0, "level": 3, "accuracy_before": 0.3, "accuracy_after": 0.55,
            "greedy_accuracy_before": 0.5, "greedy_accuracy_after": 0.6,
            "eval_curve": [{"step": 0, "accuracy": 0.3}, {"step": 3, "accuracy": 0.55}], "curve": curve,
            "rollout_tokens_per_s": 1234.0}
    results = {"scale": "toy", "device": "cpu", "budget_seconds": 60, "level": 3,
               "models": {m: {"parameters": 1000, "sft": {"steps": 5, "seconds": 2.0, "eval_loss": 1.5},
                              "grpo": grpo} for m in ("dense", "hybrid")},
               "sweep": {m: {"1": {"accuracy": 0.9, "greedy_accuracy": 0.95}, "3": {"accuracy": 0.3, "greedy_accuracy": 0.5}}
                         for m in ("dense", "hybrid")}}
    bench.write(json.loads(json.dumps(results)), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy.png", "dynamics.png", "results.json",
                                                          "summary.txt", "sweep.png"]
    text = (tmp_path / "summary.txt").read_text()
    assert "0.300 -> 0.550 (+25.0)" in text and "0.500 -> 0.600 (+10.0)" in text and "1,234" in text
    assert "RL difficulty: 3 operations" in text


@pytest.mark.slow
def test_toy_run_end_to_end(tmp_path):
    """The script as documented, at toy scale on the CPU with a small budget: every phase writes its results."""
    bench = script()
    assert bench.main(["--out", str(tmp_path / "out"), "--scale", "toy", "--device", "cpu",
                       "--budget-seconds", "60"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["models"]) == {"dense", "hybrid"}
    for m in ("dense", "hybrid"):
        g = results["models"][m]["grpo"]
        assert g["steps"] >= 1 and g["eval_curve"][0]["step"] == 0 and g["rollout_tokens_per_s"] > 0
        assert 0 <= g["greedy_accuracy_before"] <= 1 and 0 <= g["greedy_accuracy_after"] <= 1
    assert results["level"] in (1, 2, 3)
    assert (tmp_path / "out" / "accuracy.png").exists() and (tmp_path / "out" / "summary.txt").exists()
