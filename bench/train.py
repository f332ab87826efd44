"""Training speed on one GPU: a dense and a SALA-style hybrid blueprint of equal parameter count, eager and
compiled (the `lm` trainer's own compile_blocks), with transformers' LlamaForCausalLM of the dense config as the
peer in the same process.

    python bench/train.py --out DIR [--quick] [--sizes 150m,1b] [--lengths 2048,8192,32768,65536] [--budget-s 450]

Each row trains a fresh model (fp32 weights, bf16 autocast, fused AdamW, clipping, as the trainer does) on random
tokens, tokens per step fixed (B = tokens / T, at least 1), and reports tokens/s, MFU, the step split
(forward incl. loss / backward / optimizer incl. clipping, from CUDA events) and peak memory. A row that runs out
of memory (or fails) is recorded with its error and the bench goes on; rows that would start past --budget-s
are recorded as skipped, so the whole run fits its time slot. Rows of other sizes that an earlier run wrote to
the same day's record are kept (run --sizes 150m, then --sizes 1b, in two slots).

MFU = FLOPs per token × tokens/s ÷ the bf16 matmul peak measured in this run (an 8192³ matmul). FLOPs per token:
6·N (N: the weights of matrix products, the tied embedding counted once as the output head) plus the mixers'
token-mixing products, counted causally (each query sees the keys before it, no masked-out work), ×3 for the
backward:
  attention (and InfLLM-V2 below dense_len): 4·H·D per key, (T+1)/2 keys on average;
  InfLLM-V2 at or past dense_len: 4·H·D per attended key (min(t+1, k_total·block) keys at position t), plus the
    block selection (forward only): 2 passes × 2·H·D per compressed key;
  Lightning (chunks of 64): 4·H·D² (state in and out) + 2·H·D·65 (the causal chunk) per token.
Checks first: the peer, given our dense model's weights, computes our loss (so the configs match), and each
compiled row's first loss matches its eager row's.

--quick: toy sizes on the CPU (no MFU, no CUDA memory), compile with aot_eager: proves the script works.
Writes train-<device>-<yyyymmdd>.json into --out and prints a table last.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from hyloom.blueprint import Loaded, validate
from hyloom.model import build_model
from hyloom.plugins.train import lm
from hyloom.train import make_optimizer

# d_model, layers, query heads × head dim, the dense model's KV heads, its SwiGLU hidden size, vocabulary
SIZES = {
    "toy": dict(d_model=64, n_layers=4, heads=4, head_dim=16, kv_heads=2, hidden=192, vocab=512),
    "150m": dict(d_model=1024, n_layers=12, heads=16, head_dim=64, kv_heads=4, hidden=2816, vocab=32000),
    "1b": dict(d_model=2048, n_layers=16, heads=16, head_dim=128, kv_heads=4, hidden=8192, vocab=32000),
}
# sequence lengths of each size (--lengths overrides): the 2K-64K; 4K for the 1B (its MFU target)
LENGTHS = {"toy": [64, 256], "150m": [2048, 8192, 32768, 65536], "1b": [4096, 8192, 32768, 65536]}
# InfLLM-V2 sizes: MiniCPM-SALA's on the GPU; a small copy for the toy so that its longer length runs sparse
SPARSE = {"toy": dict(block_size=16, kernel_size=8, kernel_stride=4, topk=2, init_blocks=1, window=32, dense_len=128),
          "gpu": dict(block_size=64, kernel_size=32, kernel_stride=16, topk=64, init_blocks=1, window=2048,
                      dense_len=8192)}
failures: list[str] = []


# ------------------------------------------------------------------------------------------------ blueprints
def dense_model(size: dict, max_len: int) -> dict:
    return {"d_model": size["d_model"], "n_layers": size["n_layers"], "vocab_size": size["vocab"],
            "max_seq_len": max_len, "position": {"type": "rope", "rope_theta": 10000},
            "mixers": {"A": {"type": "attention", "heads": size["heads"], "kv_heads": size["kv_heads"],
                             "head_dim": size["head_dim"]}},
            "layout": "A" * size["n_layers"], "ffn": {"type": "swiglu", "hidden": size["hidden"]},
            "norm": {"type": "rmsnorm", "eps": 1e-6}, "tie_embeddings": True}


def hybrid_model(size: dict, max_len: int, sparse: dict, hidden: int) -> dict:
    """MiniCPM-SALA's recipe in the dense model's widths: SLLL repeated, InfLLM-V2 (NoPE, output gate, 16 query
    heads per KV head) and Lightning (QK-norm, output norm, gate, ALiBi decay), HyPE positions."""
    H, D = size["heads"], size["head_dim"]
    return {**dense_model(size, max_len), "position": {"type": "hype", "rope_theta": 10000},
            "mixers": {"S": {"type": "infllm_v2", "heads": H, "kv_heads": max(1, H // 16), "head_dim": D,
                             "gate": True, **sparse},
                       "L": {"type": "lightning", "heads": H, "head_dim": D, "decay": "alibi", "qk_norm": True,
                             "output_norm": True, "gate": True}},
            "layout": "SLLL" * (size["n_layers"] // 4), "ffn": {"type": "swiglu", "hidden": hidden}}


def blueprint(model: dict):
    return validate(Loaded({"model": model}, file="<bench/train.py>"))


def params_of(model: dict) -> int:
    return build_model(blueprint(model), device="meta").num_parameters()


def equal_size_hybrid(size: dict, max_len: int, sparse: dict) -> dict:
    """The hybrid with the FFN hidden size (a multiple of 64) that brings it closest to the dense model's
    parameter count: parameters grow linearly in it, so two builds give the line."""
    target = params_of(dense_model(size, max_len))
    at = {h: params_of(hybrid_model(size, max_len, sparse, h)) for h in (size["hidden"], size["hidden"] + 64)}
    per_64 = at[size["hidden"] + 64] - at[size["hidden"]]
    hidden = max(64, size["hidden"] + 64 * round((target - at[size["hidden"]]) / per_64))
    return hybrid_model(size, max_len, sparse, hidden)


# ------------------------------------------------------------------------------------------------ FLOPs
def matmul_params(model) -> int:
    """Weights of matrix products: every ≥2-D parameter except an untied embedding table (a lookup)."""
    hf = hasattr(model, "get_input_embeddings")
    embed = (model.get_input_embeddings() if hf else model.embed_tokens).weight
    head = model.get_output_embeddings() if hf else model.lm_head
    tied = head is None or head.weight is embed
    return sum(p.numel() for p in model.parameters() if p.ndim >= 2 and (tied or p is not embed))


def mixing_flops_per_token(spec, T: int) -> float:
    """Forward + backward FLOPs per token of the mixers' token-mixing products (see the module docstring)."""
    t = torch.arange(T, dtype=torch.float64)
    total = 0.0
    for cfg in spec.layers:
        H, D = cfg.heads, cfg.head_dim or spec.d_model // cfg.heads
        if cfg.type == "lightning":
            total += 3 * (4 * H * D * D + 2 * H * D * 65)
        elif cfg.type == "infllm_v2" and T >= cfg.dense_len:
            sc = cfg.sparse()
            keys = torch.clamp(t + 1, max=sc.k_total * sc.block_size).mean().item()
            kernels = torch.clamp((t + 1 - sc.kernel_size) // sc.kernel_stride + 1, min=0).mean().item()
            total += 3 * 4 * H * D * keys + 2 * 2 * H * D * kernels
        else:  # attention, or InfLLM-V2 running dense
            total += 3 * 4 * H * D * (T + 1) / 2
    return total


def peak_bf16_flops() -> float:
    from triton.testing import do_bench

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = do_bench(lambda: a @ b, return_mode="median")
    return 2 * n ** 3 / (ms * 1e-3)


# ------------------------------------------------------------------------------------------------ timing
class Marks:
    """Timestamps inside a step: CUDA events on the GPU (read after one synchronize), the clock on the CPU."""

    def __init__(self, cuda: bool):
        self.cuda, self.points = cuda, []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points.append(event)
        else:
            self.points.append(time.perf_counter())

    def split_ms(self) -> list[float]:
        p = self.points
        if self.cuda:
            return [p[i].elapsed_time(p[i + 1]) for i in range(len(p) - 1)]
        return [(p[i + 1] - p[i]) * 1e3 for i in range(len(p) - 1)]


def train_row(model, loss_of, opt, batch, device, *, warmup: int, steps: int) -> dict:
    """Warm-up steps (compilation, allocator, optimizer state), then `steps` timed ones."""
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    splits, first_loss = [], None

    def step(marks):
        marks.mark()
        with autocast:
            loss = loss_of(batch)
        marks.mark()
        loss.backward()
        marks.mark()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks.mark()
        return loss

    for _ in range(warmup):
        loss = step(Marks(cuda))
        first_loss = float(loss.detach()) if first_loss is None else first_loss
    if cuda:
        torch.cuda.synchronize()
    began = time.perf_counter()
    all_marks = [Marks(cuda) for _ in range(steps)]
    for marks in all_marks:
        step(marks)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    splits = [m.split_ms() for m in all_marks]
    mean = [sum(s[i] for s in splits) / steps for i in range(3)]
    return {"tok_s": round(batch.shape[0] * (batch.shape[1] - 1) * steps / seconds, 1),
            "step_ms": round(seconds * 1e3 / steps, 2), "fwd_ms": round(mean[0], 2), "bwd_ms": round(mean[1], 2),
            "opt_ms": round(mean[2], 2), "first_loss": first_loss}


def profile_step(model, loss_of, opt, batch, top: int = 10) -> list[dict]:
    """One more training step under torch.profiler: the GPU kernels with the most time (the CPU's ops by self
    time on the CPU), as ms and as a share of the step's total."""
    from torch.profiler import ProfilerActivity, profile

    cuda = batch.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
            loss = loss_of(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    averages = prof.key_averages()
    # an op's device time is its kernels' time, and the kernels are rows of their own: count only those
    kernels_only = cuda and any(str(getattr(e, "device_type", "")).endswith("CUDA") for e in averages)

    def self_us(event) -> float:
        if not cuda:
            return event.self_cpu_time_total
        if kernels_only and not str(event.device_type).endswith("CUDA"):
            return 0
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)

    events = sorted((e for e in averages if self_us(e) > 0), key=self_us, reverse=True)
    total = sum(self_us(e) for e in events) or 1
    return [{"name": e.key[:90], "ms": round(self_us(e) / 1e3, 3), "share": round(self_us(e) / total, 3),
             "calls": e.count} for e in events[:top]]


def ours(model_dict: dict, device, compiled: bool, checkpointed: bool = False):
    """Our model as the lm trainer sets it up (compile_blocks, then checkpoint_blocks) and its loss."""
    torch.manual_seed(0)
    model = build_model(blueprint(model_dict), device=device).train()
    if compiled:
        lm.compile_blocks(model)
    if checkpointed:
        lm.checkpoint_blocks(model)
    objective = lm.NextTokenObjective()
    return model, (lambda batch: objective(model, batch)), model.spec


def peer(model_dict: dict, device, weights_from=None):
    """transformers' LlamaForCausalLM of the dense blueprint's config (SDPA attention), loss as its users get it."""
    import transformers

    from hyloom.plugins.hf.convert import pick_export_format

    fmt, config = pick_export_format(blueprint(model_dict).model)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config, attn_implementation="sdpa"))
    if weights_from is not None:
        missing, unexpected = model.load_state_dict({fmt.to_hf(k): v for k, v in weights_from.state_dict().items()},
                                                    strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        model.tie_weights()
    model.train()

    def loss_of(batch):
        ids = batch[:, :-1]
        return model(input_ids=ids, labels=ids).loss  # transformers shifts the labels itself

    return model, loss_of


def check_peer_matches(dense: dict, device):
    """Same weights, same batch, fp32: the peer's loss is ours (its labels path drops the last target)."""
    model, loss_of, _ = ours(dense, device, compiled=False)
    other, peer_loss_of = peer(dense, device, weights_from=model)
    batch = torch.randint(0, model.spec.vocab_size, (2, 257), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        logits = model(batch[:, :-1])
        ours_loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch[:, 1:-1].flatten()).item()
        theirs = peer_loss_of(batch).item()
    err = abs(ours_loss - theirs) / abs(theirs)
    print(f"  {'ok  ' if err < 1e-4 else 'FAIL'} peer loss with our weights: {theirs:.5f} vs ours {ours_loss:.5f}")
    if err >= 1e-4:
        failures.append("peer loss")
    del model, other


# ------------------------------------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--quick", action="store_true", help="toy sizes on the CPU: proves the script runs")
    ap.add_argument("--sizes", default=None, help="comma list of " + ", ".join(SIZES) + " (default 150m,1b)")
    ap.add_argument("--lengths", default=None, help="comma list of sequence lengths for every size (default: "
                                                    "150m 2048,8192,32768,65536; 1b 4096,8192,32768,65536)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per step (default 32768)")
    ap.add_argument("--budget-s", type=float, default=450, help="start no row after this many seconds")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (default 5)")
    ap.add_argument("--profile", default="8192", help="lengths whose rows also profile one step: the ops with "
                                                      "the most GPU time (comma list; 'none': no profiling; "
                                                      "--quick: its longest length)")
    args = ap.parse_args()
    began = time.perf_counter()
    quick = args.quick
    device = torch.device("cpu" if quick else "cuda")
    if not quick and not torch.cuda.is_available():
        sys.exit("bench/train.py needs a CUDA GPU (or --quick for the CPU toy run)")
    sizes = (args.sizes or ("toy" if quick else "150m,1b")).split(",")
    chosen = [int(x) for x in args.lengths.split(",")] if args.lengths else None
    tokens = args.tokens or (512 if quick else 32768)
    # the toy profiles its longest length
    profile = str(max(chosen or LENGTHS["toy"])) if quick and args.profile == "8192" else args.profile
    profiled = set() if profile == "none" else {int(x) for x in profile.split(",")}
    steps, warmup = args.steps or (2 if quick else 5), (1 if quick else 2)
    if quick:
        lm.COMPILE_BACKEND = "aot_eager"  # tracing and autograd, no code generation: seconds on a CPU
        # toy tensors gain nothing from threads, and on a busy machine spinning threads make the run 5x slower
        torch.set_num_threads(1)
    import transformers

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    versions = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}
    try:
        import triton
        versions["triton"] = triton.__version__
    except ImportError:
        pass
    print(f"device: {name} | " + " | ".join(f"{k} {v}" for k, v in versions.items()))
    peak = peak_bf16_flops() if device.type == "cuda" else None
    if peak:
        print(f"bf16 matmul peak (8192³): {peak / 1e12:.0f} TFLOP/s")
    short = {"H100": "h100", "H200": "h200"}
    dev = "cpu" if device.type == "cpu" else next((v for k, v in short.items() if k in name), name.split()[-1].lower())
    today = datetime.date.today()
    path = os.path.join(args.out, f"train-{dev}-{today:%Y%m%d}.json")
    os.makedirs(args.out, exist_ok=True)
    rows: list[dict] = []
    models: dict[str, dict] = {}
    command = "python " + " ".join(sys.argv)
    earlier: list[str] = []
    if os.path.exists(path):  # a run of other sizes earlier today: its rows stay, this run's sizes are replaced
        with open(path) as f:
            old = json.load(f)
        if old.get("device") == name:
            rows = [r for r in old["rows"] if r.get("size") not in sizes]
            models = {k: v for k, v in old.get("models", {}).items() if k not in sizes}
            earlier = [c for c in old.get("earlier_commands", []) + [old["command"]] if rows]

    def save(goals=None):  # after every row: a run cut short still leaves its numbers
        record = {"op": "train", "device": name, **versions, "command": command, "earlier_commands": earlier,
                  "date": today.isoformat(), "peak_bf16_tflops": peak and round(peak / 1e12, 1),
                  "tokens_per_step": tokens, "timed_steps": steps, "warmup_steps": warmup,
                  "precision": "bf16 autocast, fp32 weights" if device.type == "cuda" else "fp32",
                  "optimizer": "AdamW (fused on CUDA), clip 1.0", "compile": f"per block, {lm.COMPILE_BACKEND}",
                  "models": models, "checks_failed": failures, "targets": goals, "rows": rows}
        with open(path, "w") as f:
            json.dump(record, f, indent=1)

    row_seconds: dict[tuple, float] = {}  # how long a row of each kind took: rows that would overrun are skipped
    for size_name in sizes:
        size, lengths = SIZES[size_name], chosen or LENGTHS[size_name]
        torch._dynamo.reset()  # compiled rows of one size and length share their graphs (compile_blocks)
        max_len = max(lengths)
        sparse = SPARSE["toy" if size_name == "toy" else "gpu"]
        dense, hybrid = dense_model(size, max_len), equal_size_hybrid(size, max_len, sparse)
        print(f"{size_name}: dense {params_of(dense):,} parameters, hybrid {params_of(hybrid):,} "
              f"(FFN hidden {hybrid['ffn']['hidden']})")
        try:
            check_peer_matches(dense, device)
        except Exception as exc:  # noqa: BLE001 (the timings are still worth having)
            failures.append(f"peer check: {type(exc).__name__}: {exc}"[:300])
            traceback.print_exc(limit=4)
        models[size_name] = {"dense": dense, "hybrid": hybrid}
        for T in lengths:
            B = max(1, tokens // T)
            kinds = [("dense", False, False), ("dense", True, False), ("hybrid", False, False),
                     ("hybrid", True, False), ("transformers", False, False)]
            if T == max_len:  # what activation checkpointing saves where memory is tightest
                kinds += [("dense", True, True), ("hybrid", True, True)]
            for kind, compiled, checkpointed in kinds:
                label = f"{'transformers-llama' if kind == 'transformers' else 'hyloom-' + kind}-{size_name}"
                row = {"model": label, "size": size_name, "T": T, "B": B, "compiled": compiled,
                       "activation_checkpointing": checkpointed}
                rows.append(row)
                elapsed = time.perf_counter() - began
                guess = row_seconds.get((size_name, compiled), 0.0)
                if elapsed + guess > args.budget_s:
                    row["error"] = f"skipped: time budget ({args.budget_s:.0f} s) spent"
                    print(f"  {label:26s} T={T:6d} skipped (time budget)")
                    continue
                started = time.perf_counter()
                run_row(row, kind, dense if kind != "hybrid" else hybrid, device, compiled, checkpointed, B, T, peak,
                        warmup=warmup + (1 if compiled else 0), steps=steps,
                        profiled=T in profiled and not checkpointed)
                row_seconds[(size_name, compiled)] = max(row_seconds.get((size_name, compiled), 0.0),
                                                         time.perf_counter() - started)
                save()
    check_compiled_losses(rows)
    goals = targets(rows)
    save(goals)
    print(f"wrote {path} ({time.perf_counter() - began:.0f} s)")
    print_table(rows)
    print_profiles(rows)
    print("\nissue 16 targets (64K memory: compare the peak_GB and errors of the T=65536 rows):")
    for g in goals:
        state = "-   " if g["met"] is None else ("met " if g["met"] else "MISS")
        print(f"  {state} {g['target']}: {g['value']} (goal >= {g['goal']})")
    if failures:
        print("FAILED CHECKS:", failures)
        sys.exit(1)


def run_row(row, kind, model_dict, device, compiled, checkpointed, B, T, peak, *, warmup, steps, profiled=False):
    model = opt = loss_of = batch = None
    try:
        gc.collect()  # the last row's model: the blocks' forward wrappers make it a cycle
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if kind == "transformers":
            model, loss_of = peer(model_dict, device)
            spec = blueprint(model_dict).model
        else:
            model, loss_of, spec = ours(model_dict, device, compiled, checkpointed)
        batch = torch.randint(0, spec.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0)).to(device)
        row["params"] = sum(p.numel() for p in model.parameters())
        row["flops_per_token"] = 6 * matmul_params(model) + mixing_flops_per_token(spec, T)
        # the optimizer as the lm trainer has it
        opt = make_optimizer(model, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, device=device)
        row.update(train_row(model, loss_of, opt, batch, device, warmup=warmup, steps=steps))
        row["mfu"] = round(row["flops_per_token"] * row["tok_s"] / peak, 4) if peak else None
        row["peak_bf16_tflops"] = peak and round(peak / 1e12, 1)  # runs merged into one record measure their own
        row["peak_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.type == "cuda" else None
        if profiled:
            row["profile"] = profile_step(model, loss_of, opt, batch)
        print(f"  {row['model']:26s} T={T:6d} B={B:3d} {mode_of(row):11s} "
              f"{row['tok_s']:12,.0f} tok/s  mfu {row['mfu'] if row['mfu'] is not None else '-'}  "
              f"peak {row['peak_GB'] if row['peak_GB'] is not None else '-'} GB  "
              f"(fwd {row['fwd_ms']} / bwd {row['bwd_ms']} / opt {row['opt_ms']} ms)", flush=True)
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
        print(f"  {row['model']:26s} T={T:6d} out of memory", flush=True)
    except Exception as exc:  # noqa: BLE001 (one failing row must not lose the others)
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        print(f"  {row['model']:26s} T={T:6d} FAILED {row['error']}", flush=True)
        traceback.print_exc(limit=4)
    finally:
        del model, opt, loss_of, batch
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def mode_of(row) -> str:
    return ("compiled" if row["compiled"] else "eager") + ("+ckpt" if row.get("activation_checkpointing") else "")


def check_compiled_losses(rows):
    """A compiled row trains the same model on the same batch as its eager row: the first losses agree."""
    eager = {(r["model"], r["T"]): r["first_loss"] for r in rows if not r["compiled"] and "first_loss" in r}
    for r in rows:
        want = eager.get((r["model"], r["T"]))
        if r["compiled"] and "first_loss" in r and want is not None:
            err = abs(r["first_loss"] - want) / abs(want)
            ok = err < 2e-2 and math.isfinite(r["first_loss"])
            print(f"  {'ok  ' if ok else 'FAIL'} {r['model']} T={r['T']} {mode_of(r)} first loss {r['first_loss']:.4f} "
                  f"vs eager {want:.4f}")
            if not ok:
                failures.append(f"{r['model']} T={r['T']} {mode_of(r)} loss")


def targets(rows) -> list[dict]:
    """Issue 16's targets, each read from this record: the best of eager and compiled for each model."""
    def best(model, T, key="tok_s"):
        got = [r[key] for r in rows if r["model"] == model and r["T"] == T and r.get(key) is not None
               and not r.get("activation_checkpointing")]
        return max(got) if got else None

    found = []

    def target(what, value, goal):
        found.append({"target": what, "value": value, "goal": goal,
                      "met": None if value is None else value >= goal})

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    for size in sorted({r["size"] for r in rows}):
        dense, hybrid, peer_ = (f"hyloom-dense-{size}", f"hyloom-hybrid-{size}", f"transformers-llama-{size}")
        for T in sorted({r["T"] for r in rows if r["size"] == size} & {2048, 8192}):
            target(f"{size} dense / transformers tok/s at T={T}", ratio(best(dense, T), best(peer_, T)), 1.2)
        target(f"{size} hybrid / dense tok/s at T=8192", ratio(best(hybrid, 8192), best(dense, 8192)), 1.0)
        target(f"{size} hybrid / dense tok/s at T=32768", ratio(best(hybrid, 32768), best(dense, 32768)), 2.0)
        if size == "1b":
            target("1b dense MFU at T=4096", best(dense, 4096, "mfu"), 0.45)
    return found


def print_table(rows):
    by = {(r["model"], r["T"], mode_of(r)): r for r in rows}
    print(f"{'model':26s} {'T':>6s} {'B':>3s} {'mode':13s} {'tok/s':>10s} {'MFU':>6s} {'peak GB':>8s} "
          f"{'fwd/bwd/opt ms':>22s} {'vs dense':>8s} {'vs peer':>8s}")
    for r in rows:
        size = r["size"]
        mode = mode_of(r)
        if "tok_s" not in r:
            print(f"{r['model']:26s} {r['T']:6d} {r['B']:3d} {mode:13s} {r.get('error', '')}")
            continue
        dense = by.get((f"hyloom-dense-{size}", r["T"], mode), {}).get("tok_s")
        peer_tok = by.get((f"transformers-llama-{size}", r["T"], "eager"), {}).get("tok_s")
        split = f"{r['fwd_ms']:.1f}/{r['bwd_ms']:.1f}/{r['opt_ms']:.1f}"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        peak = f"{r['peak_GB']:.1f}" if r.get("peak_GB") is not None else "-"
        ratio = lambda ref: f"{r['tok_s'] / ref:.2f}x" if ref else "-"  # noqa: E731
        print(f"{r['model']:26s} {r['T']:6d} {r['B']:3d} {mode:13s} {r['tok_s']:10,.0f} {mfu:>6s} {peak:>8s} "
              f"{split:>22s} {ratio(dense):>8s} {ratio(peer_tok):>8s}")


def print_profiles(rows):
    for r in rows:
        if r.get("profile"):
            print(f"\nprofile {r['model']} T={r['T']} {mode_of(r)}: top ops by self time")
            for p in r["profile"]:
                print(f"  {p['ms']:9.2f} ms {100 * p['share']:5.1f}%  x{p['calls']:<5d} {p['name']}")


if __name__ == "__main__":
    main()
