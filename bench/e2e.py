"""Whole-model long-context inference with random bf16 weights (issue 13 §2): prefill and decode of the
`minicpm-sala` and `llama3-8b` blueprints through `HybridLM.prefill` / `decode_step`, B = 1 at 8K, 128K and
256K (prefill with last-position logits, in chunks; decode in CUDA graphs), MiniCPM-SALA at 1M + 32 decoded
tokens with its peak memory (and what llama3-8b does at 1M: refused up front by the memory estimate, or out of
memory: the row's `error`), and decode at B = 1, 4, 16, 64 at 8K for both.

    python bench/e2e.py --out bench/results      # one H200: ~9 minutes (each 8B model is built once, ~20 s)
    python bench/e2e.py --quick --out /tmp/e2e   # tiny shapes on the CPU: proves the script end to end
    python bench/e2e.py --out bench/results --models minicpm-sala --compile-decode   # decode through torch.compile

It first checks the engine on the model itself (decode vs one full pass; on CUDA, graph decode vs eager),
then times; writes `e2e-<device>-<yyyymmdd>.json` into --out after every row (a run cut short keeps its
numbers) and prints a table last. Times are medians over steps, each bracketed by torch.cuda.synchronize.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time

import torch

from hyloom.blueprint import load_blueprint
from hyloom.inference import DoesNotFit, check_fits
from hyloom.model import build_model

K = 1024
FULL = {"contexts": [8 * K, 128 * K, 256 * K], "million": 1024 * K, "million_steps": 32, "steps": 24,
        "batches": [1, 4, 16, 64], "batch_context": 8 * K, "batch_steps": 16, "chunk": 32 * K, "check_T": 8 * K + 300}
QUICK = {"contexts": [128, 512], "million": 2048, "million_steps": 8, "steps": 6,
         "batches": [1, 2, 4], "batch_context": 128, "batch_steps": 5, "chunk": 256, "check_T": 200}
# the blueprints in miniature for --quick: same layouts and mixer kinds, CPU-sized
SHRINK = {
    "minicpm-sala": ["model.d_model=64", "model.n_layers=4", "model.layout=SLLS", "model.vocab_size=512",
                     "model.mixers.S.heads=4", "model.mixers.S.kv_heads=2", "model.mixers.S.head_dim=16",
                     "model.mixers.S.block_size=16", "model.mixers.S.kernel_size=8", "model.mixers.S.kernel_stride=4",
                     "model.mixers.S.topk=4", "model.mixers.S.window=32", "model.mixers.S.dense_len=128",
                     "model.mixers.S.lse_kernel_size=16", "model.mixers.S.lse_kernel_stride=8",
                     "model.mixers.L.heads=4", "model.mixers.L.head_dim=16", "model.ffn.hidden=128",
                     "model.dim_model_base=16"],
    "llama3-8b": ["model.d_model=64", "model.n_layers=2", "model.layout.times=2", "model.vocab_size=512", "model.mixers.A.heads=4",
                  "model.mixers.A.kv_heads=2", "model.mixers.A.head_dim=16", "model.ffn.hidden=128"],
}
MODELS = ["minicpm-sala", "llama3-8b"]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def build(name: str, quick: bool):
    """The blueprint's model with random weights, made directly in bf16 on the device (no fp32 copy)."""
    blueprint = load_blueprint(f"builtin:{name}", SHRINK[name] if quick else ())
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if DEV == "cuda" else torch.float32)
    try:
        torch.manual_seed(0)
        return build_model(blueprint, device=DEV).eval()
    finally:
        torch.set_default_dtype(previous)


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@torch.no_grad()
def check(model, T: int, steps: int = 4, compile: bool = False) -> dict:
    """Decode against one full pass (last positions); on CUDA graph decode against eager decode; with
    `compile`, the compiled decode step (in graphs on CUDA) against eager decode."""
    ids = torch.randint(0, model.spec.vocab_size, (1, T + steps), device=DEV)
    full = model(ids)[0, T - 1:T + steps - 1]
    out = {}
    ways = {"eager": (False, False)}
    if DEV == "cuda":
        ways["graphs"] = (True, False)
    if compile:
        ways["compiled"] = (DEV == "cuda", True)
    for way, (graphs, compiled) in ways.items():
        logits, cache = model.prefill(ids[:, :T], capacity=T + steps)
        got = [logits[0, -1]] + [model.decode_step(ids[:, t], cache, cuda_graph=graphs, compile=compiled)[0]
                                 for t in range(T, T + steps - 1)]
        out[way] = torch.stack(got)
    result = {"T": T, "decode_vs_full_rel_err": rel(out["eager"], full)}
    for way in ("graphs", "compiled"):
        if way in out:
            result[f"{'graph' if way == 'graphs' else way}_vs_eager_rel_err"] = rel(out[way], out["eager"])
    return result


@torch.no_grad()
def warm_up(model, chunk: int, steps: int = 20, compile: bool = False):
    """Compile the kernels of a chunked prefill (later chunks: q_offset > 0) and of decode steps at both
    parities of the length (Triton specialises integer arguments on divisibility by 16) before any timing."""
    ids = torch.randint(0, model.spec.vocab_size, (1, 2 * chunk + 100), device=DEV)
    logits, cache = model.prefill(ids, chunk_size=chunk, capacity=ids.shape[1] + steps)
    token = logits[:, -1].argmax(-1)
    for _ in range(steps):
        token = model.decode_step(token, cache, compile=compile).argmax(-1)
    sync()


def _timed(fn):
    sync()
    began = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - began


@torch.no_grad()
def measure(model, name: str, T: int, B: int, steps: int, chunk: int, *, prefill_runs: int = 1,
            eager_steps: int = 0, compile: bool = False) -> dict:
    """One row: the best of `prefill_runs` prefills (each into a fresh cache; the first of a new length may
    compile kernels for it), then `steps` decode steps in CUDA graphs (median; the first two, warm-up and
    capture, apart; with `compile` the first also runs torch.compile for the row's cache shapes), then
    `eager_steps` more without graphs and uncompiled on the same cache."""
    row = {"model": name, "T": T, "B": B, "chunk_size": min(chunk, T), "decode_steps": steps,
           "compiled_decode": compile}
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cache = None
    try:
        tokens = T + steps + eager_steps
        row["estimate_GB"] = round(check_fits(model, batch=B, tokens=tokens, chunk_size=chunk).total / 1e9, 1)
        ids = torch.randint(0, model.spec.vocab_size, (B, T), device=DEV)
        runs = []
        for _ in range(prefill_runs):
            cache = None
            gc.collect()
            cache = model.new_cache(B, capacity=tokens)
            (logits, cache), seconds = _timed(lambda: model.prefill(ids, cache=cache, chunk_size=chunk))
            runs.append(round(seconds, 4))
        row["prefill_s"], row["prefill_runs_s"] = min(runs), runs
        token, times = logits[:, -1].argmax(-1), []
        for _ in range(steps):
            token, seconds = _timed(lambda: model.decode_step(token, cache, compile=compile).argmax(-1))
            times.append(seconds)
        warm = min(2, steps - 1)  # the first step compiles and warms up, the second captures the graphs
        row["decode_ms_per_token"] = round(1e3 * statistics.median(times[warm:]), 3)
        row["decode_tokens_per_s"] = round(B / statistics.median(times[warm:]), 1)
        row["decode_first_steps_ms"] = [round(1e3 * t, 1) for t in times[:warm]]
        row["cuda_graphs"] = bool(cache.runner.graphs)
        if eager_steps:
            eager = []
            for _ in range(eager_steps):
                token, seconds = _timed(lambda: model.decode_step(token, cache, cuda_graph=False).argmax(-1))
                eager.append(seconds)
            row["decode_eager_ms_per_token"] = round(1e3 * statistics.median(eager[1:]), 3)
        row["peak_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2) if DEV == "cuda" else None
    except DoesNotFit as exc:
        row["error"] = f"refused before starting: {exc}"
    except torch.OutOfMemoryError as exc:
        row["error"] = f"out of memory: {str(exc).splitlines()[0]}"
    finally:
        cache = None
        gc.collect()
        if DEV == "cuda":
            torch.cuda.empty_cache()
    return row


def plan(sizes) -> list[dict]:
    """measure()'s arguments per row, in order of importance (a run past its budget loses the last ones)."""
    mid = sizes["contexts"][1]
    rows = [dict(T=T, B=1, steps=sizes["steps"], prefill_runs=2, eager_steps=8 if T == mid else 0)
            for T in sorted(sizes["contexts"], key=lambda t: t != mid)]
    rows.append(dict(T=sizes["million"], B=1, steps=sizes["million_steps"]))
    rows += [dict(T=sizes["batch_context"], B=B, steps=sizes["batch_steps"]) for B in sizes["batches"]]
    return rows


def summary(rows, sizes) -> dict:
    """The issue's targets, read from this run's rows (128K, 256K and 1M: the --quick sizes in their place)."""
    mid, big, million = sizes["contexts"][1], sizes["contexts"][-1], sizes["million"]
    def get(model, T, B, key):
        return next((r.get(key) for r in rows if r["model"] == model and r["T"] == T and r["B"] == B), None)
    out = {}
    s_dec, l_dec = (get(m, mid, 1, "decode_ms_per_token") for m in MODELS)
    s_pre, l_pre = (get(m, big, 1, "prefill_s") for m in MODELS)
    if s_dec:
        out["sala_decode_128k_ms"] = s_dec
    if s_dec and l_dec:
        out["decode_128k_speedup_vs_llama"] = round(l_dec / s_dec, 2)
    if s_pre and l_pre:
        out["prefill_256k_speedup_vs_llama"] = round(l_pre / s_pre, 2)
    peak = get("minicpm-sala", million, 1, "peak_GB")
    if peak:
        out["sala_1m_peak_GB"] = peak
    return out


def print_table(rows):
    print(f"{'model':<14}{'T':>9}{'B':>4}{'prefill s':>11}{'decode ms/tok':>15}{'peak GB':>9}  note")
    for r in rows:
        note = r.get("error", "")[:70]
        fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
        print(f"{r['model']:<14}{r['T']:>9}{r['B']:>4}{fmt(r.get('prefill_s'), '.3f'):>11}"
              f"{fmt(r.get('decode_ms_per_token'), '.3f'):>15}{fmt(r.get('peak_GB'), '.1f'):>9}  {note}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for the JSON record")
    p.add_argument("--quick", action="store_true", help="tiny shapes (runs on the CPU in a minute or two)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated blueprints (default: both)")
    p.add_argument("--chunk", type=int, default=None, help="prefill chunk (tokens per row per chunk) at B = 1")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="skip the rows left after this many seconds (each model gets an equal share)")
    p.add_argument("--compile-decode", action="store_true",
                   help="decode steps through torch.compile (HybridLM.decode_step(compile=True)), in CUDA graphs")
    args = p.parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    if DEV == "cpu":
        torch.set_num_threads(1)  # tiny ops: threads only contend (a shared CPU made steps 100x slower)
    if args.chunk is not None:
        if args.chunk < 1:
            p.error(f"--chunk must be a positive integer, not {args.chunk}")
        sizes["chunk"] = args.chunk
    started = time.perf_counter()
    device = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    known = {"H100": "h100", "H200": "h200", "A100": "a100", "B200": "b200"}
    short = next((v for k, v in known.items() if k in device), device.split()[-1].lower()) if DEV == "cuda" else "cpu"
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"e2e-{short}{'-quick' if args.quick else ''}-{datetime.date.today():%Y%m%d}.json")
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    record = {"op": "e2e", "device": device, "torch": torch.__version__.split("+")[0], "triton": triton_version,
              "command": "python " + " ".join(["bench/e2e.py", *sys.argv[1:]]), "date": f"{datetime.date.today()}",
              "dtype": "bfloat16" if DEV == "cuda" else "float32", "quick": args.quick,
              "chunk_size": sizes["chunk"], "compile_decode": args.compile_decode, "checks": {}, "rows": [],
              "summary": {}}

    def save():
        record["summary"] = summary(record["rows"], sizes)
        record["wall_s"] = round(time.perf_counter() - started, 1)
        with open(path, "w") as f:
            json.dump(record, f, indent=1)

    print(f"device: {device} | torch {record['torch']} | triton {triton_version}", flush=True)
    names = args.models.split(",")
    for index, name in enumerate(names):
        # each model gets its share of the budget, so a slow first model cannot take the second's rows
        deadline = args.budget_s * (index + 1) / len(names)
        began = time.perf_counter()
        model = build(name, args.quick)
        record["checks"][name] = {"build_s": round(time.perf_counter() - began, 1),
                                  "parameters": model.num_parameters(),
                                  **check(model, sizes["check_T"], compile=args.compile_decode)}
        record["checks"][name]["warm_up_s"] = round(
            _timed(lambda: warm_up(model, sizes["chunk"], compile=args.compile_decode))[1], 1)
        print(f"{name}: {record['checks'][name]}", flush=True)
        save()
        for spec in plan(sizes):
            T, B = spec.pop("T"), spec.pop("B")
            if time.perf_counter() - started > deadline:
                row = {"model": name, "T": T, "B": B, "error": f"skipped: past this model's share of the "
                                                              f"{args.budget_s:.0f} s budget ({deadline:.0f} s)"}
            else:
                chunk = max(1, sizes["chunk"] // B) if B > 1 else sizes["chunk"]
                row = measure(model, name, T, B, spec.pop("steps"), chunk, compile=args.compile_decode, **spec)
            record["rows"].append(row)
            print(json.dumps(row), flush=True)
            save()
        model = None
        gc.collect()
        if DEV == "cuda":
            torch.cuda.empty_cache()
    save()
    print_table(record["rows"])
    print(f"summary: {json.dumps(record['summary'])}\nrecord: {path} ({record['wall_s']} s)")


if __name__ == "__main__":
    main()
