"""bench/train.py (the training-speed benchmark the GPU runs): its --quick mode end to end on the CPU, the FLOP
count behind MFU, the equal-size hybrid, and the issue's targets read off the rows."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bench_scripts import load_bench

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    return load_bench("train")


def test_quick_run_records_every_row(tmp_path):
    # one short length (the toy's hybrid runs its sparse layer dense there): the run takes seconds
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "train.py"), "--quick", "--lengths", "64",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = tmp_path.glob("train-cpu-*.json")
    record = json.loads(path.read_text())
    assert {"device", "torch", "triton", "transformers", "command", "date", "rows", "targets"} <= set(record)
    assert record["checks_failed"] == []  # the peer computes our loss; compiled rows start from the eager loss
    modes = [(r["model"], r["compiled"], r["activation_checkpointing"]) for r in record["rows"]]
    assert modes == [("hyloom-dense-toy", False, False), ("hyloom-dense-toy", True, False),
                     ("hyloom-hybrid-toy", False, False), ("hyloom-hybrid-toy", True, False),
                     ("transformers-llama-toy", False, False),
                     ("hyloom-dense-toy", True, True), ("hyloom-hybrid-toy", True, True)]
    for row in record["rows"]:
        assert "error" not in row and row["T"] == 64 and row["B"] == 8
        assert row["tok_s"] > 0 and min(row["fwd_ms"], row["bwd_ms"], row["opt_ms"]) > 0
        assert row["mfu"] is None and row["peak_GB"] is None  # no GPU: no peak to measure against
    # --quick profiles one step at its longest length: the ops with the most (CPU) time
    assert all(r["profile"][0]["ms"] > 0 for r in record["rows"] if not r["activation_checkpointing"])


def test_mixing_flops_count_what_each_query_attends_to(bench):
    size = dict(bench.SIZES["toy"])
    dense = bench.blueprint(bench.dense_model(size, 1024)).model
    H, D, L, T = size["heads"], size["head_dim"], size["n_layers"], 256
    assert bench.mixing_flops_per_token(dense, T) == L * 3 * 4 * H * D * (T + 1) / 2
    hybrid = bench.blueprint(bench.hybrid_model(size, 1024, bench.SPARSE["toy"], 128)).model  # SLLL
    lightning = 3 * (4 * H * D * D + 2 * H * D * 65)
    below = bench.mixing_flops_per_token(hybrid, 64)  # under dense_len 128: the S layer is dense attention
    assert below == 3 * 4 * H * D * 65 / 2 + 3 * lightning
    # at 1024 tokens each query attends to at most k_total (2 + 32/16) blocks of 16 = 64 keys
    sparse = bench.SPARSE["toy"]
    cap = (sparse["topk"] + sparse["window"] // sparse["block_size"]) * sparse["block_size"]
    keys = sum(min(t + 1, cap) for t in range(1024)) / 1024
    kernels = sum(max(0, (t + 1 - 8) // 4 + 1) for t in range(1024)) / 1024
    got = bench.mixing_flops_per_token(hybrid, 1024) - 3 * lightning
    assert got == pytest.approx(3 * 4 * H * D * keys + 2 * 2 * H * D * kernels)


def test_the_hybrid_matches_the_dense_parameter_count(bench):
    size = bench.SIZES["150m"]
    dense = bench.params_of(bench.dense_model(size, 65536))
    hybrid = bench.equal_size_hybrid(size, 65536, bench.SPARSE["gpu"])
    assert abs(bench.params_of(hybrid) - dense) / dense < 0.01
    assert hybrid["layout"] == "SLLL" * 3 and hybrid["position"]["type"] == "hype"


def test_targets_are_read_off_the_rows(bench):
    def row(model, T, tok_s, compiled=False, mfu=None):
        return {"model": model, "size": model.rsplit("-", 1)[1], "T": T, "tok_s": tok_s, "compiled": compiled,
                "activation_checkpointing": False, "mfu": mfu}

    rows = [row("hyloom-dense-1b", 2048, 100), row("hyloom-dense-1b", 2048, 130, compiled=True),
            row("transformers-llama-1b", 2048, 100), row("hyloom-dense-1b", 8192, 80),
            row("hyloom-hybrid-1b", 8192, 60), row("hyloom-dense-1b", 4096, 90, mfu=0.5),
            {**row("hyloom-hybrid-1b", 8192, 500, compiled=True), "activation_checkpointing": True}]
    got = {g["target"]: (g["value"], g["met"]) for g in bench.targets(rows)}
    assert got["1b dense / transformers tok/s at T=2048"] == (1.3, True)  # the better of eager and compiled
    assert got["1b dense / transformers tok/s at T=8192"] == (None, None)  # no peer row
    assert got["1b hybrid / dense tok/s at T=8192"] == (0.75, False)  # checkpointed rows do not count
    assert got["1b dense MFU at T=4096"] == (0.5, True)
