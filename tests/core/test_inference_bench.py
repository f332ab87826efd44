"""bench/e2e.py (the end-to-end inference benchmark the GPU runs): its --quick mode end to end on the CPU, its
rows refusing a context that cannot fit, and the summary of the issue's targets."""

import json
import subprocess
import sys
from pathlib import Path

from bench_scripts import load_bench

import hyloom

ROOT = Path(__file__).resolve().parents[2]


def script():
    return load_bench("e2e")


def test_quick_run_writes_a_record_of_every_row(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "e2e.py"), "--quick", "--out", str(tmp_path),
                           "--models", "llama3-8b"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (path,) = tmp_path.glob("e2e-cpu-quick-*.json")
    record = json.loads(path.read_text())
    assert {"device", "torch", "triton", "command", "date", "rows", "checks"} <= set(record)
    assert record["checks"]["llama3-8b"]["decode_vs_full_rel_err"] < 1e-5
    rows = record["rows"]
    assert [(r["T"], r["B"]) for r in rows] == [(512, 1), (128, 1), (2048, 1), (128, 1), (128, 2), (128, 4)]
    for row in rows:
        assert row["model"] == "llama3-8b" and "error" not in row
        assert row["prefill_s"] > 0 and row["decode_ms_per_token"] > 0 and "peak_GB" in row
    assert "decode_eager_ms_per_token" in rows[0] and len(rows[0]["prefill_runs_s"]) == 2


def test_a_row_that_cannot_fit_records_the_refusal(monkeypatch):
    e2e = script()
    model = e2e.build("llama3-8b", quick=True)
    monkeypatch.setattr(hyloom.inference, "free_bytes", lambda device: 1000)
    row = e2e.measure(model, "llama3-8b", 4096, 1, 3, 1024)
    assert row["error"].startswith("refused before starting: a context of 4,099 tokens") and "prefill_s" not in row


def test_summary_reads_the_targets_from_the_rows():
    e2e = script()
    rows = [{"model": "minicpm-sala", "T": 128, "B": 1, "decode_ms_per_token": 2.0, "prefill_s": 1.0},
            {"model": "llama3-8b", "T": 128, "B": 1, "decode_ms_per_token": 11.0, "prefill_s": 3.0},
            {"model": "minicpm-sala", "T": 512, "B": 1, "prefill_s": 4.0, "decode_ms_per_token": 3.0},
            {"model": "llama3-8b", "T": 512, "B": 1, "prefill_s": 14.0, "decode_ms_per_token": 20.0},
            {"model": "minicpm-sala", "T": 2048, "B": 1, "peak_GB": 9.5}]
    sizes = {"contexts": [64, 128, 512], "million": 2048}
    assert e2e.summary(rows, sizes) == {"sala_decode_128k_ms": 2.0, "decode_128k_speedup_vs_llama": 5.5,
                                        "prefill_256k_speedup_vs_llama": 3.5, "sala_1m_peak_GB": 9.5}
