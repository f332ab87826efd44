"""bench/rollout.py end to end at its quick scale: every row samples exactly rows x new_tokens tokens (the never-
occurring EOS keeps each completion to its full length), and the ratios pair each hybrid row with its dense twin."""

import json

from bench_scripts import load_bench


def test_quick_run_writes_one_row_per_model_and_shape_and_their_ratios(tmp_path):
    bench = load_bench("rollout")
    assert bench.main(["--out", str(tmp_path), "--quick", "--device", "cpu"]) == 0
    (path,) = tmp_path.glob("rollout-cpu-*.json")
    record = json.loads(path.read_text())
    shapes = [(r, n) for r in bench.QUICK["rows"] for n in bench.QUICK["new_tokens"]]
    assert [(r["model"], r["rows"], r["new_tokens"]) for r in record["rows"]] == \
        [(m, r, n) for m in ("dense", "hybrid") for r, n in shapes]
    for r in record["rows"]:  # seconds are rounded to the millisecond
        assert abs(r["tokens_per_s"] * r["seconds"] / (r["rows"] * r["new_tokens"]) - 1) < 2e-2
    speed = {(r["model"], r["rows"], r["new_tokens"]): r["tokens_per_s"] for r in record["rows"]}
    for ratio in record["ratios"]:
        key = (ratio["rows"], ratio["new_tokens"])
        assert abs(ratio["hybrid_over_dense"] - speed[("hybrid", *key)] / speed[("dense", *key)]) < 2e-3
    assert record["parameters"]["dense"] > 0 and record["parameters"]["hybrid"] > 0
