"""bench/grpo_step.py end to end at its quick scale on the CPU: one row per model with each phase timed, the
rollout's tokens/s consistent with its rows and seconds, its split into a cost per step and a fixed one, and the
profiler's operator table of one update."""

import json

import pytest

from bench_scripts import load_bench


def test_quick_run_times_each_phase_and_keeps_the_update_profile(tmp_path):
    bench = load_bench("grpo_step")
    assert bench.main(["--out", str(tmp_path), "--quick", "--device", "cpu", "--models", "dense"]) == 0
    (path,) = tmp_path.glob("grpo-step-cpu-*.json")
    (row,) = json.loads(path.read_text())["rows"]
    assert (row["model"], row["rows"], row["new_tokens"], row["updates_per_step"]) == ("dense", 8, 4, 4)
    assert all(row[k] > 0 for k in ("rollout_s", "old_logprobs_s", "update_s"))  # the step cost: noise on CPU
    assert row["rollout_fixed_s"] == pytest.approx(row["rollout_s"] - 4 * row["rollout_step_ms"] / 1000, abs=2e-4)
    assert abs(row["rollout_tokens_per_s"] * row["rollout_s"] / (8 * 4) - 1) < 2e-2
    assert "aten::mm" in row["update_profile"]  # the update's matmuls were recorded
