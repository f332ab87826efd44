"""The GRPO experiment (bench/grpo_small.py): its two blueprints validate, differ only in the model and have the
same size; the toy scale shrinks both alike; the RL levels are picked from the sweep (on the GPU runs' tables);
figures and the summary are drawn from a results file alone."""

import json
from pathlib import Path

import pytest

from bench_scripts import load_bench

from hyloom.blueprint import load_blueprint
from hyloom.cli import main
from hyloom.model import build_model

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "blueprints" / "experiments"


def script():
    return load_bench("grpo_small")


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


def table(rows):
    """{model: [sampled accuracy at 1, 2, ... operations]} as the script's sweep records it."""
    return {m: {str(k): {"accuracy": a} for k, a in enumerate(accs, 1)} for m, accs in rows.items()}


def test_rl_levels_straddle_the_floor_on_the_gpu_runs_sweeps():
    bench = script()
    assert bench.FLOOR_ACCURACY == 0.40
    # run 3 (SFT on 1..4): a cliff after 4; it trained on 5 alone, where ~98% / 75% of its groups had one reward
    run3 = table({"dense": [1.00, 0.98, 0.89, 0.77, 0.02, 0.01, 0.01, 0.02],
                  "hybrid": [0.99, 0.92, 0.85, 0.64, 0.04, 0.00, 0.02, 0.00]})
    assert bench.pick_levels(run3) == (4, 5)
    # run 2 (SFT on 1..6, sweep to 6): nothing below the floor, so the hardest measured level alone
    run2 = table({"dense": [1.00, 1.00, 0.99, 0.96, 0.93, 0.83], "hybrid": [0.99, 0.97, 0.92, 0.79, 0.73, 0.61]})
    assert bench.pick_levels(run2) == (6, 6)
    # the weaker model decides: dense would allow 5..6, the hybrid drops below the floor at 4
    mixed = table({"dense": [1.0, 0.9, 0.8, 0.6, 0.4, 0.1], "hybrid": [1.0, 0.8, 0.5, 0.3, 0.15, 0.0]})
    assert bench.pick_levels(mixed) == (3, 4)
    # exactly at the floor still counts as solved; everything below it: the easiest level alone
    assert bench.pick_levels(table({"dense": [0.5, 0.4, 0.39]})) == (2, 3)
    assert bench.pick_levels(table({"dense": [0.3, 0.0]})) == (1, 1)
    # --floor moves the pair: run 13's sweep (sampled 0.95 0.84 0.70 0.60 ...) at 0.7 trained on 3..4
    run13 = table({"hybrid": [0.95, 0.84, 0.70, 0.60, 0.41, 0.38, 0.27, 0.22]})
    assert bench.pick_levels(run13, floor=0.7) == (3, 4) and bench.pick_levels(run13) == (5, 6)
    assert bench.levels_text((4, 5)) == "4..5" and bench.levels_text((6, 6)) == "6"


def test_levels_option_forces_the_rl_levels_within_the_sweep():
    bench = script()
    sweep = list(range(1, 9))
    assert bench.parse_levels(None, sweep) is None
    assert bench.parse_levels("4,5", sweep) == (4, 5) and bench.parse_levels("5", sweep) == (5, 5)
    for bad in ("5,4", "0,1", "8,9", "4,5,6", "four", ""):
        with pytest.raises(ValueError, match="LO"):
            bench.parse_levels(bad, sweep)
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--out", "/nonexistent/never-written", "--levels", "9,10"])
    assert exit_.value.code == 2


def test_figures_and_summary_from_a_results_file(tmp_path):
    bench = script()
    curve = [{"step": s, "entropy": 1.0 - 0.1 * s, "response_length_mean": 30.0 + s, "clipped": 0.0,
              "reward_mean": -0.5 + 0.1 * s} for s in (1, 2, 3)]
    grpo = {"steps": 3, "seconds": 12.0, "levels": [1, 3], "accuracy_before": 0.3, "accuracy_after": 0.55,
            "greedy_accuracy_before": 0.5, "greedy_accuracy_after": 0.6,
            "by_level": {"3": {"accuracy": 0.45, "greedy_accuracy": 0.5}},
            "eval_curve": [{"step": 0, "accuracy": 0.3}, {"step": 3, "accuracy": 0.55}], "curve": curve,
            "rollout_tokens_per_s": 1234.0}
    results = {"scale": "toy", "device": "cpu", "budget_seconds": 60, "levels": [1, 3],
               "models": {m: {"parameters": 1000, "sft": {"steps": 5, "seconds": 2.0, "eval_loss": 1.5},
                              "grpo": grpo} for m in ("dense", "hybrid")},
               "sweep": {m: {"1": {"accuracy": 0.9, "greedy_accuracy": 0.95}, "3": {"accuracy": 0.3, "greedy_accuracy": 0.5}}
                         for m in ("dense", "hybrid")}}
    bench.write(json.loads(json.dumps(results)), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy.png", "dynamics.png", "results.json",
                                                          "summary.txt", "sweep.png"]
    text = (tmp_path / "summary.txt").read_text()
    assert "0.300 -> 0.550 (+25.0)" in text and "0.500 -> 0.600 (+10.0)" in text and "1,234" in text
    assert "RL difficulty: 1..3 operations" in text
    assert "hybrid, 3 operations (the sweep's problems): sampled 0.300 -> 0.450 (+15.0), greedy 0.500 -> 0.500" in text


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
    lo, hi = results["levels"]
    assert 1 <= lo <= hi <= 4 and hi - lo <= 1
    # the RL levels and the next one, where the toy sweep (1..4) has it
    assert set(results["models"]["dense"]["grpo"]["by_level"]) == {str(k) for k in range(lo, min(hi + 1, 4) + 1)}
    assert (tmp_path / "out" / "accuracy.png").exists() and (tmp_path / "out" / "summary.txt").exists()
    for m in ("dense", "hybrid"):  # the completions logs come with the results
        rows = [json.loads(line) for line in (tmp_path / "out" / f"completions-{m}.jsonl").read_text().splitlines()]
        assert rows and rows[0]["step"] == 1 and "completion" in rows[0]  # the first step, sampled


def test_arms_parse_into_named_grpo_overrides():
    bench = script()
    assert bench.parse_arms(None) == [{"name": "blueprint", "overrides": []}]
    arms = bench.parse_arms("stages.1.train.lr=5e-6; stages.1.train.lr=1e-5,stages.1.train.seed=2")
    assert arms == [{"name": "lr=5e-6", "overrides": ["stages.1.train.lr=5e-6"]},
                    {"name": "lr=1e-5, seed=2", "overrides": ["stages.1.train.lr=1e-5", "stages.1.train.seed=2"]}]
    for bad in ("stages.1.train.lr=1e-5;", "stages.0.train.lr=1e-3", "model.d_model=64", "stages.1.train.lr",
                "stages.1.train.max_seconds=5", "stages.1.train.lr=1e-5;stages.1.train.lr=1e-5"):
        with pytest.raises(ValueError):
            bench.parse_arms(bad)
    # the key an arm's seed goes to exists in the GRPO stage
    assert resolved("dense", ["stages.1.train.seed=2"]).stages[1].train.seed == 2


@pytest.mark.slow  # ~80 s on 2 cores, like the one-arm toy run above
def test_arms_toy_run_end_to_end(tmp_path):
    """Two arms at toy scale on the CPU (about 80 s on 2 cores): SFT and the sweep once, then each arm trains both
    models from the same SFT checkpoint in its own run directory. Same start: the recorded checksum of the
    starting weights equals that of the SFT run's checkpoint, and, the arms sharing a seed, the first step's
    policy entropy (measured on its rollouts before any update) and the step-0 evaluation agree to the bit. The
    step-0 accuracy alone would prove nothing here: the toy models solve nothing (0.0 for any weights)."""
    import json as jsonlib

    from hyloom.train import checkpoint_dir

    bench = script()
    work = tmp_path / "work"
    assert bench.main(["--out", str(tmp_path / "out"), "--scale", "toy", "--device", "cpu", "--budget-seconds", "80",
                       "--work", str(work), "--arms", "stages.1.train.lr=1e-4;stages.1.train.lr=3e-4"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [a["name"] for a in results["arms"]] == ["lr=1e-4", "lr=3e-4"]
    for m in ("dense", "hybrid"):
        arms = results["models"][m]["arms"]
        assert [a["name"] for a in arms] == ["lr=1e-4", "lr=3e-4"] and [a["lr"] for a in arms] == [1e-4, 3e-4]
        assert {k: v for k, v in arms[0].items() if k not in ("name", "overrides", "run")} == results["models"][m]["grpo"]
        assert [a["run"] for a in arms] == [str(work / m), str(work / f"{m}-arm2")]
        sft = bench.weights_checksum(checkpoint_dir(work / m / "sft"))
        rows = []
        for a in arms:
            assert a["steps"] >= 1 and a["eval_curve"][0]["step"] == 0 and a["curve"]
            assert a["start_weights_sha256"] == sft
            metrics = [jsonlib.loads(line) for line in (Path(a["run"]) / "grpo" / "metrics.jsonl").read_text().splitlines()]
            # the arm's learning rate reached its trainer (after the 2 warmup steps of the toy scale)
            assert metrics[0]["step"] == 0 and (a["steps"] < 2 or max(r.get("lr", 0) for r in metrics) == a["lr"])
            rows.append((metrics[0], a["curve"][0]["entropy"]))
        assert rows[0] == rows[1]
    text = (tmp_path / "out" / "summary.txt").read_text()
    assert all(f"{m}, lr={lr}" in text for m in ("dense", "hybrid") for lr in ("1e-4", "3e-4"))
    assert {p.name for p in (tmp_path / "out").glob("completions-*.jsonl")} == {
        "completions-dense.jsonl", "completions-hybrid.jsonl", "completions-dense-arm2.jsonl",
        "completions-hybrid-arm2.jsonl"}
    assert (tmp_path / "out" / "accuracy.png").exists()


def test_figures_and_summary_of_arms_from_a_results_file(tmp_path):
    bench = script()
    curve = [{"step": 1, "entropy": 1.0, "response_length_mean": 30.0, "clipped": 0.0}]

    def run(after):
        return {"steps": 1, "seconds": 5.0, "accuracy_before": 0.3, "accuracy_after": after,
                "eval_curve": [{"step": 0, "accuracy": 0.3}, {"step": 1, "accuracy": after}], "curve": curve,
                "rollout_tokens_per_s": 100.0}

    arms = bench.parse_arms("stages.1.train.lr=5e-6;stages.1.train.lr=2e-5")
    models = {m: {"parameters": 1000, "sft": {"steps": 5, "seconds": 2.0, "eval_loss": 1.5}, "grpo": run(0.4),
                  "arms": [{**arms[0], **run(0.4)}, {**arms[1], **run(0.5)}]} for m in ("dense", "hybrid")}
    results = {"scale": "toy", "device": "cpu", "budget_seconds": 60, "levels": [1, 2], "arms": arms,
               "grpo_seconds_each": 5.0, "models": models}
    bench.write(results, tmp_path)
    assert (tmp_path / "accuracy.png").exists() and (tmp_path / "dynamics.png").exists()
    text = (tmp_path / "summary.txt").read_text()
    assert "  2. lr=2e-5: stages.1.train.lr=2e-5" in text
    assert "hybrid, lr=2e-5" in text and "0.300 -> 0.500 (+20.0)" in text and "0.300 -> 0.400 (+10.0)" in text


def test_compare_draws_every_models_curve_of_several_results(tmp_path, capsys):
    compare = load_bench("grpo_compare")

    def results(path, before, after):
        curve = [{"step": 0, "accuracy": before}, {"step": 10, "accuracy": after}]
        path.write_text(json.dumps({"models": {"dense": {"grpo": {"eval_curve": curve}},
                                               "hybrid": {"sft": {"steps": 5}}}}))  # no GRPO run: left out
        return path

    one, two = results(tmp_path / "a.json", 0.3, 0.5), results(tmp_path / "b.json", 0.2, 0.6)
    assert compare.main(["--out", str(tmp_path / "c.png"), f"seed 1={one}", f"={two}"]) == 0
    assert (tmp_path / "c.png").stat().st_size > 0
    assert capsys.readouterr().out.splitlines() == ["dense seed 1: 0.300 -> 0.500 in 10 steps",
                                                     "dense: 0.200 -> 0.600 in 10 steps"]
    for bad in ([str(one)], [f"x={tmp_path / 'missing.json'}"]):
        with pytest.raises(SystemExit) as exit_:
            compare.main(["--out", str(tmp_path / "d.png"), *bad])
        assert exit_.value.code == 2
