"""Lightning Attention on the GPU: correctness first, then timings against fla and SDPA (cuDNN).

    python bench/lightning.py [--out DIR] [--tune] [--quick]

Checks (bf16 unless noted; relative error = ‖ours − ref‖ / ‖ref‖):
  ours vs the PyTorch reference on fp32-upcast inputs (fwd, grads, states, varlen, non-causal, decode, D 48/96/256),
  ours in fp32 vs the reference, ours vs fla `chunk_simple_gla` on every timed row (≤ 1e-2).
Then times medians with triton.testing.do_bench, writes bench/results-style JSON
(`lightning-<device>-<yyyymmdd>.json`, into --out) and prints a short table last.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import triton
from triton.testing import do_bench

from hyloom.kernels.lightning import decay_alibi, lightning_attn, lightning_attn_decode, naive
from hyloom.kernels.lightning import triton_impl

DEV = "cuda"
BF16 = torch.bfloat16
failures: list[str] = []


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(name, err, tol):
    ok = err <= tol and err == err
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: rel err {err:.2e} (tol {tol:.0e})")
    if not ok:
        failures.append(name)


def rand(*shape, dtype=BF16, grad=False):
    return torch.randn(*shape, device=DEV, dtype=dtype).requires_grad_(grad)


# ------------------------------------------------------------------------------------------------- checks
def check_against_reference():
    print("correctness vs reference (fp32 upcast):")
    triton_impl.POISON_OUTPUTS = True
    for D, T, cu, dtype in [(128, 4096, None, BF16), (128, 1000, [0, 100, 100, 777, 1000], BF16),
                            (48, 300, None, BF16), (96, 300, [0, 130, 300], BF16), (256, 300, None, BF16),
                            (128, 2000, [0, 900, 2000], torch.float32)]:
        H = 32 if T >= 4096 else 4
        cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEV)
        N = 1 if cu is None else len(cu) - 1
        q, k, v = (rand(1, T, H, D, dtype=dtype, grad=True) for _ in range(3))
        h0 = torch.randn(N, H, D, D, device=DEV, requires_grad=True)
        g = decay_alibi(H).to(DEV)
        o, hT = lightning_attn(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu_t)
        do, dht = torch.randn_like(o), torch.randn_like(hT)
        grads = torch.autograd.grad((o.float() * do.float()).sum() + (hT * dht).sum(), (q, k, v, h0))
        up = [x.detach().double().float().requires_grad_() for x in (q, k, v)]
        h0r = h0.detach().clone().requires_grad_()
        o_r, hT_r = naive.causal(*up, g, initial_state=h0r, output_final_state=True, cu_seqlens=cu_t)
        ref = torch.autograd.grad((o_r * do.float()).sum() + (hT_r * dht).sum(), (*up, h0r))
        tol = 1e-4 if dtype == torch.float32 else 1e-2
        tag = f"D={D} T={T} {'varlen' if cu else 'dense'} {str(dtype)[6:]}"
        check(f"{tag} o", rel(o, o_r), tol)
        check(f"{tag} final state", rel(hT, hT_r), tol)
        for n, a, b in zip(("dq", "dk", "dv", "dh0"), grads, ref):
            check(f"{tag} {n}", rel(a, b), tol)
    # non-causal
    q, k, v = (rand(1, 700, 4, 128, grad=True) for _ in range(3))
    g = decay_alibi(4).to(DEV)
    o, _ = lightning_attn(q, k, v, g, causal=False)
    do = torch.randn_like(o)
    grads = torch.autograd.grad((o.float() * do.float()).sum(), (q, k, v))
    up = [x.detach().float().requires_grad_() for x in (q, k, v)]
    o_r = naive.parallel_noncausal(*up, g)
    ref = torch.autograd.grad((o_r * do.float()).sum(), up)
    check("non-causal o", rel(o, o_r), 1e-2)
    for n, a, b in zip(("dq", "dk", "dv"), grads, ref):
        check(f"non-causal {n}", rel(a, b), 1e-2)
    # decode
    for B in (1, 64):
        q, k, v = (rand(B, 32, 128) for _ in range(3))
        S = torch.randn(B, 32, 128, 128, device=DEV)
        g = decay_alibi(32).to(DEV)
        o, S1 = lightning_attn_decode(q, k, v, g, S)
        o_r, S1_r = naive.decode(q.float(), k.float(), v.float(), g, S)
        check(f"decode B={B} o", rel(o, o_r), 1e-2)
        check(f"decode B={B} state", rel(S1, S1_r), 1e-5)
    triton_impl.POISON_OUTPUTS = False


# ------------------------------------------------------------------------------------------------- peers
def fla_ops():
    try:
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
    except Exception as e:  # noqa: BLE001
        print("fla unavailable:", e)
        return None, None
    return chunk_simple_gla, fused_recurrent_simple_gla


def sdpa_cudnn(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def bench_ms(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def fwd_bwd(fn, inputs, do):
    def run():
        for x in inputs:
            x.grad = None
        o = fn()
        o = o[0] if isinstance(o, tuple) else o
        o.backward(do)
    return run


# ------------------------------------------------------------------------------------------------- rows
def seq_row(case, B, H, T, D, chunk_fla, rows, bw, cu=None, with_sdpa=True):
    g = decay_alibi(H).to(DEV)
    grad = case.endswith("fwd_bwd")
    q, k, v = (rand(B, T, H, D, grad=grad) for _ in range(3))
    cu_gpu = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEV)
    cu_cpu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    ours = lambda: lightning_attn(q, k, v, g, cu_seqlens=cu_cpu)[0]  # noqa: E731
    peers, err = {}, None
    fla_fns = {}
    if chunk_fla is not None:
        kw = {} if cu is None else {"cu_seqlens": cu_gpu.long(), "cu_seqlens_cpu": cu_cpu.long()}
        fla_fns["fla.chunk_simple_gla"] = lambda: chunk_simple_gla(q, k, v, g_gamma=g, **kw)[0]
        with torch.no_grad():
            err = rel(ours(), fla_fns["fla.chunk_simple_gla"]())
        check(f"{case} T={T} B={B} vs fla", err, 1e-2)
    do = torch.randn(B, T, H, D, device=DEV, dtype=BF16)
    wrap = (lambda f: fwd_bwd(f, (q, k, v), do)) if grad else (lambda f: f)
    ms = bench_ms(wrap(ours))
    for name, f in fla_fns.items():
        peers[name] = bench_ms(wrap(f))
    sdpa_limit = 16384 if grad else 131072
    if with_sdpa and cu is None and T <= sdpa_limit:
        qs = rand(B, H, T, D, grad=grad)
        ks, vs = (rand(B, 2, T, D, grad=grad) for _ in range(2))
        f = lambda: sdpa_cudnn(qs, ks, vs)  # noqa: E731
        peers["sdpa.cudnn(Hkv=2)"] = bench_ms(fwd_bwd(f, (qs, ks, vs), torch.randn_like(qs)) if grad else f)
        del qs, ks, vs
    units = 11 if grad else 4  # fwd: q,k,v,o; bwd adds q,k,v,do read and dq,dk,dv written
    floor_bytes = units * B * T * H * D * 2
    rows.append({"case": case, "B": B, "H": H, "Hkv": H, "D": D, "T": T, "dtype": "bfloat16", "ours_ms": ms,
                 "peers": peers, "max_rel_err_vs_peer": err, "floor_ms": floor_bytes / bw * 1e3,
                 "achieved_GBps": floor_bytes / ms / 1e6,
                 **({"num_seqs": len(cu) - 1} if cu else {})})
    print(f"  {case:15s} B={B} T={T:7d}: ours {ms:8.3f} ms | " +
          " | ".join(f"{n} {t:.3f}" for n, t in peers.items()), flush=True)


def decode_row(B, rows, bw, fused_fla):
    H, D = 32, 128
    g = decay_alibi(H).to(DEV)
    q, k, v = (rand(B, H, D) for _ in range(3))
    S = torch.randn(B, H, D, D, device=DEV)
    ms = bench_ms(lambda: lightning_attn_decode(q, k, v, g, S))
    peers, err = {}, None
    if fused_fla is not None:
        f = lambda: fused_recurrent_simple_gla(q[:, None], k[:, None], v[:, None], g_gamma=g,  # noqa: E731
                                               initial_state=S, output_final_state=True)
        o_f, S_f = f()
        o, S1 = lightning_attn_decode(q, k, v, g, S)
        err = max(rel(o, o_f[:, 0]), rel(S1, S_f))
        check(f"decode B={B} vs fla", err, 1e-2)
        peers["fla.fused_recurrent_simple_gla"] = bench_ms(f)
    floor_bytes = 2 * B * H * D * D * 4
    rows.append({"case": "decode", "B": B, "H": H, "Hkv": H, "D": D, "T": 1, "dtype": "bfloat16", "ours_ms": ms,
                 "peers": peers, "max_rel_err_vs_peer": err, "floor_ms": floor_bytes / bw * 1e3,
                 "achieved_GBps": floor_bytes / ms / 1e6})
    print(f"  decode B={B}: ours {ms:.4f} ms | " + " | ".join(f"{n} {t:.4f}" for n, t in peers.items()))


def copy_bandwidth():
    x = torch.empty(2 ** 30, dtype=torch.uint8, device=DEV)  # 1 GiB
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x))
    return 2 * x.numel() / (ms * 1e-3)


def tune():
    """Sweep launch settings at T=128K (B=1, H=32, D=128), keep the fastest; returns per-kernel times."""
    H, T, D = 32, 131072, 128
    g = decay_alibi(H).to(DEV)
    q, k, v = (rand(1, T, H, D, grad=True) for _ in range(3))
    do = torch.randn_like(q)
    fwd = lambda: lightning_attn(q, k, v, g)[0]  # noqa: E731
    T_ = triton_impl.TUNE

    def sweep(keys, configs, fn):
        best = (float("inf"), None)
        for cfg in configs:
            T_.update(dict(zip(keys, cfg)))
            try:
                ms = bench_ms(fn)
            except Exception as e:  # noqa: BLE001
                print(f"  tune {cfg}: {type(e).__name__} {str(e)[:200]}")
                continue
            print(f"  tune {dict(zip(keys, cfg))}: {ms:.3f} ms", flush=True)
            best = min(best, (ms, cfg), key=lambda x: x[0])
        T_.update(dict(zip(keys, best[1])))

    sweep(("fwd_chunk", "fwd_bv", "fwd_warps", "fwd_stages", "sum_chunk", "sum_stages"),
          [(64, 128, 8, 3, 64, 3), (64, 128, 8, 3, 128, 2), (128, 128, 8, 1, 128, 2), (128, 64, 8, 2, 128, 2),
           (128, 64, 4, 2, 128, 2), (64, 64, 4, 2, 128, 2)], fwd)
    sweep(("bwd_chunk", "bwd_warps", "bwd_stages"), [(64, 8, 3), (64, 8, 2), (128, 8, 1)],
          fwd_bwd(fwd, (q, k, v), do))
    # where the time goes, with the chosen settings
    x = [t.detach().reshape(T, H, D) for t in (q, k, v)]
    dox = do.reshape(T, H, D)
    segs = triton_impl.make_segments(1, T, H, None, q.device)
    o, _, states = triton_impl.forward(*x, g, None, D ** -0.5, False, segs)
    parts = {
        "fwd.segment_sum": lambda: triton_impl._segment_sum(x[1], x[2], g, segs, 1.0, True, False),
        "fwd.total": lambda: triton_impl.forward(*x, g, None, D ** -0.5, False, segs),
        "bwd.segment_sum": lambda: triton_impl._segment_sum(x[0], dox, g, segs, 1.0, False, False),
        "bwd.total": lambda: triton_impl.backward(*x, g, dox, None, states, D ** -0.5, False, segs),
    }
    try:
        times = {n: bench_ms(f) for n, f in parts.items()}
    except Exception as e:  # noqa: BLE001  (diagnostics only)
        print("  components failed:", type(e).__name__, str(e)[:200])
        times = {}
    print("  components at 128K:", {n: round(t, 3) for n, t in times.items()}, flush=True)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--quick", action="store_true", help="checks and the 128K rows only")
    args = ap.parse_args()
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    print(f"device: {name} | torch {torch.__version__} | triton {triton.__version__}")
    components = tune() if args.tune else {}
    check_against_reference()
    global chunk_simple_gla, fused_recurrent_simple_gla
    chunk_simple_gla, fused_recurrent_simple_gla = fla_ops()
    bw = copy_bandwidth()
    print(f"device copy bandwidth: {bw / 1e12:.2f} TB/s (read + write)")
    rows: list[dict] = []
    short = {"H100": "h100", "H200": "h200"}
    dev = next((v for k, v in short.items() if k in name), name.split()[-1].lower())
    today = datetime.date.today()
    path = os.path.join(args.out, f"lightning-{dev}-{today:%Y%m%d}.json")
    os.makedirs(args.out, exist_ok=True)

    def save():  # after every row, so that a run cut short still leaves its numbers
        record = {"op": "lightning", "device": name, "torch": torch.__version__.split("+")[0],
                  "triton": triton.__version__, "command": "python " + " ".join(sys.argv),
                  "date": today.isoformat(), "copy_TBps": bw / 1e12,
                  "settings": {"chunk": triton_impl.CHUNK, "programs_per_sm": triton_impl.PROGRAMS_PER_SM,
                               **triton_impl.TUNE},
                  "components_ms_128k": components, "checks_failed": failures, "rows": rows}
        with open(path, "w") as f:
            json.dump(record, f, indent=1)

    print("timings (median ms):")
    Ts = [131072] if args.quick else [4096, 16384, 65536, 131072, 524288]
    for T in Ts:
        seq_row("fwd", 1, 32, T, 128, chunk_simple_gla, rows, bw, with_sdpa=T <= 131072)
        save()
        torch.cuda.empty_cache()
    for T in Ts:
        if T <= 131072:
            seq_row("fwd_bwd", 1, 32, T, 128, chunk_simple_gla, rows, bw)
            save()
            torch.cuda.empty_cache()
    if not args.quick:
        seq_row("fwd", 8, 16, 4096, 128, chunk_simple_gla, rows, bw)
        seq_row("fwd_bwd", 8, 16, 4096, 128, chunk_simple_gla, rows, bw)
    for B in (1, 64):
        decode_row(B, rows, bw, fused_recurrent_simple_gla)
    save()
    gen = torch.Generator().manual_seed(1)
    cuts = torch.randperm(65535, generator=gen)[:15].add(1).sort().values.tolist()
    cu = [0, *cuts, 65536]
    seq_row("varlen_fwd", 1, 32, 65536, 128, chunk_simple_gla, rows, bw, cu=cu)
    seq_row("varlen_fwd_bwd", 1, 32, 65536, 128, chunk_simple_gla, rows, bw, cu=cu)
    save()
    print(f"wrote {path}")
    print_table(rows)
    if failures:
        print("FAILED CHECKS:", failures)
        sys.exit(1)


def print_table(rows):
    print(f"{'case':15s} {'B':>2s} {'T':>7s} {'ours ms':>9s} {'fla ms':>9s} {'fla/ours':>8s} {'GB/s':>6s} "
          f"{'floor':>7s} {'sdpa':>8s}")
    for r in rows:
        fla = [t for n, t in r["peers"].items() if n.startswith("fla")]
        best = min(fla) if fla else float("nan")
        sd = r["peers"].get("sdpa.cudnn(Hkv=2)")
        print(f"{r['case']:15s} {r['B']:2d} {r['T']:7d} {r['ours_ms']:9.4f} {best:9.4f} {best / r['ours_ms']:8.2f} "
              f"{r['achieved_GBps']:6.0f} {r['floor_ms']:7.3f} {sd if sd is None else round(sd, 3)!s:>8s}")


if __name__ == "__main__":
    main()
