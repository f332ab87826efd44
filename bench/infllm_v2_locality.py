"""How much neighbouring tokens' InfLLM-V2 block picks overlap on a trained model's activations (issue 13 §3).

    python bench/infllm_v2_locality.py --out DIR [--budget-seconds 150] [--device auto] [--length 32768]
                                       [--checkpoint DIR]   # an existing hyloom checkpoint instead of training
                                       [--tile-tokens 16,32]  # token tiles of the forward timing
    python bench/infllm_v2_locality.py --quick --out DIR     # CPU, a toy model, 10 steps: the pipeline end to end

Trains blueprints/experiments/infllm-v2-locality.yaml (a SALA-style hybrid whose InfLLM-V2 layers run sparse
at the capture length) with the `lm` trainer for --budget-seconds of training, then runs held-out text of
--length tokens through it and captures q and k at every InfLLM-V2 layer exactly as the layer's attention core
receives them (after projections, norms and positions). From those it makes the layer's own picks
(kernels.infllm_v2.select_blocks) and measures:
- pick_overlap: |picks_t ∩ picks_t+1| / |picks_t| for neighbouring tokens (same KV head), averaged; also
  without the forced init/window blocks of each token (pick_overlap_nonforced);
- for tiles of 16 and 64 consecutive tokens, the size of the union of their picks over k_total (what a kernel
  that loads K/V once per tile would read), all picks and the non-forced ones, and load_ratio: the per-token
  kernel's non-forced block loads over the tile kernel's (1: nothing shared, the tile size: all shared).
Only tokens that see more than k_total blocks count (before that a token picks every block it sees). Random q
and k of the same shapes give the contrast.

Then the forward on those activations and picks (rows of case "fwd_tile", per layer, trained and random q/k/v):
the token-tile kernel (kernels/infllm_v2/triton_tile.py, --tile-tokens sizes, num_warps 4 and 8, its union
preparation timed inside and alone: the Triton kernel, union_prep_ms, and the PyTorch reference,
union_prep_ref_ms) against the per-token kernel (both after the same dense tiles of the forced
blocks), SDPA cuDNN dense causal and fla's parallel_nsa if importable; the tile output is checked against the
per-token one first (max_rel_err), and the K/V blocks each loads per tile are counted. On a CPU only the counts.

Writes infllm_v2-locality-<device>-<yyyymmdd>.json into --out and prints a table. Runs go to a temporary
folder, deleted at the end.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/experiment.py, also when loaded by path
from experiment import autocast, make_log, run_main, timed_train_steps, write_json  # noqa: E402

log = make_log("locality")

ROOT = Path(__file__).resolve().parents[1]
BLUEPRINT = ROOT / "blueprints" / "experiments" / "infllm-v2-locality.yaml"
TILES = (16, 64)
QUICK_STEPS = 10
# --quick: the same pipeline on a model, data and length small enough for two CPU cores
QUICK = ["model.d_model=64", "model.n_layers=4", "model.layout=SLLS", "model.vocab_size=1024",
         "model.max_seq_len=1024", "model.mixers.S.heads=4", "model.mixers.S.head_dim=16",
         "model.mixers.S.block_size=16", "model.mixers.S.kernel_size=8", "model.mixers.S.kernel_stride=4",
         "model.mixers.S.topk=4", "model.mixers.S.window=32", "model.mixers.S.dense_len=128",
         "model.mixers.L.heads=4", "model.mixers.L.head_dim=16", "model.ffn.hidden=192",
         "data.source={type: stdlib, max_bytes: 1500000}", "data.seq_len=256", "data.eval_fraction=0.05",
         "train.batch_size=8", "train.eval_batches=2", "train.warmup=5"]


# ---- the measurement: pure functions of the picks -----------------------------------------------------------------

def pick_sets(idx_BKTS, n_blocks: int):
    """bool [B, Hkv, T, n_blocks]: block b is among the token's picks (idx ascending, -1 for none)."""
    import torch

    sets = torch.zeros(*idx_BKTS.shape[:-1], n_blocks + 1, dtype=torch.bool, device=idx_BKTS.device)
    sets.scatter_(-1, idx_BKTS.long().masked_fill(idx_BKTS < 0, n_blocks), True)
    return sets[..., :n_blocks]


def forced_blocks(T: int, n_blocks: int, block_size: int, init_blocks: int, window_blocks: int, device=None):
    """bool [T, n_blocks]: the blocks selection forces for each token (as naive.block_scores_ref): the init blocks
    and the token's own block with the window_blocks before it."""
    import torch

    b = torch.arange(n_blocks, device=device)
    own = torch.arange(T, device=device)[:, None] // block_size
    return (b < init_blocks) | ((b <= own) & (b >= own - window_blocks))


def pick_overlap(sets_BKTN, first: int = 0) -> float:
    """Mean over (row, KV head, token t >= first with a successor) of |P_t ∩ P_t+1| / |P_t|; tokens without a
    pick are left out. nan when no token counts."""
    now, nxt = sets_BKTN[:, :, first:-1], sets_BKTN[:, :, first + 1:]
    size = now.sum(-1)
    shared = (now & nxt).sum(-1)
    has = size > 0
    return (shared[has].double() / size[has].double()).mean().item() if has.any() else math.nan


def tile_union(sets_BKTN, tile: int, first: int = 0) -> tuple[float, float]:
    """(mean size of the union of a tile's picks, mean sum of its tokens' pick counts), over the whole tiles of
    `tile` consecutive tokens from `first` on."""
    B, K, T, N = sets_BKTN.shape
    n = (T - first) // tile
    if n <= 0:
        return math.nan, math.nan
    tiles = sets_BKTN[:, :, first:first + n * tile].reshape(B, K, n, tile, N)
    return tiles.any(3).sum(-1).double().mean().item(), tiles.sum((3, 4)).double().mean().item()


def locality(idx_BKTS, block_size: int, init_blocks: int, window_blocks: int, k_total: int) -> dict:
    """The numbers of one layer's picks [B, Hkv, T, k_total] (queries at positions 0 .. T-1)."""
    T = idx_BKTS.shape[2]
    n_blocks = -(-T // block_size)
    first = k_total * block_size  # from here on a token sees more blocks than it picks
    every = pick_sets(idx_BKTS, n_blocks)
    own = every & ~forced_blocks(T, n_blocks, block_size, init_blocks, window_blocks, idx_BKTS.device)
    out = {"tokens_counted": max(0, T - first), "pick_overlap": pick_overlap(every, first),
           "pick_overlap_nonforced": pick_overlap(own, first),
           "nonforced_picks_per_token": own[:, :, first:].sum(-1).double().mean().item() if T > first else math.nan}
    for tile in TILES:
        union, _ = tile_union(every, tile, first)
        own_union, own_sum = tile_union(own, tile, first)
        out[f"tile{tile}_union_over_k_total"] = union / k_total
        out[f"tile{tile}_nonforced_union_over_k_total"] = own_union / k_total
        out[f"tile{tile}_load_ratio"] = own_sum / own_union if own_union > 0 else math.nan
    return out


# ---- the model: train or load, capture q/k ----------------------------------------------------------------------

def load(overrides: list[str]):
    from hyloom.blueprint import load_blueprint

    return load_blueprint(str(BLUEPRINT), list(overrides))


def plan_steps(bp, device, budget: float) -> tuple[int, float]:
    """(steps that fit in budget seconds of training, seconds per step): a few timed steps of random tokens of
    the blueprint's shape (bf16 autocast on CUDA, after warm-up steps that compile the Triton kernels). x1.1:
    the trainer's own work (data, clipping, logging, held-out evaluations, the checkpoint)."""
    import torch

    from hyloom.model import build_model

    torch.manual_seed(0)
    model = build_model(bp, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(2, bp.model.vocab_size, (bp.train.batch_size, bp.data.seq_len + 1), device=device)
    warm = 2
    times = timed_train_steps(model, opt, batch, warm + 3, device)
    del model, opt, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    step_s = sorted(times[warm:])[1]
    return max(50, int(budget / (1.1 * step_s))), step_s


def train_model(bp_overrides: list[str], steps: int, work: Path):
    from hyloom.train import RunDir, train

    schedule = [f"train.steps={steps}", f"train.eval_every={max(1, steps // 4)}", f"train.out_dir={work / 'run'}",
                f"train.warmup={min(50, max(1, steps // 10))}"]
    bp = load(bp_overrides + schedule)
    result = train(bp, bp.model_dump(mode="json"), progress=False, overwrite=True)
    curve = [{k: r[k] for k in ("step", "tokens", "loss", "eval_loss", "tokens_per_s") if k in r}
             for r in RunDir(work / "run").metrics()]
    return result, curve


def capture_qk(model, ids_BT, device) -> tuple[dict, float]:
    """({layer: (q [B, T, H, D], k, v [B, T, Hkv, D], its SparseConfig)} at every InfLLM-V2 layer, as its
    attention core receives them, mean next-token loss of the pass). The core is wrapped on the instance;
    the class's method comes back afterwards."""
    import torch
    import torch.nn.functional as F

    from hyloom.errors import SetupError
    from hyloom.plugins.infllm_v2.mixer import InfLLMv2

    got = {}
    sparse = [(i, block.mixer) for i, block in enumerate(model.layers) if isinstance(block.mixer, InfLLMv2)]
    if not sparse:
        raise SetupError("the model has no InfLLM-V2 layer: nothing to measure")
    for i, mixer in sparse:
        def core(q, k, v, ctx, i=i, mixer=mixer, original=mixer.decode_core):
            got[i] = (q.detach(), k.detach(), v.detach(), mixer.sparse)
            return original(q, k, v, ctx)
        mixer.decode_core = core
    try:
        model.eval()
        with torch.no_grad(), autocast(device):
            hidden = model.hidden(ids_BT)
            nll, count = 0.0, 0
            for s in range(0, ids_BT.shape[1] - 1, 4096):  # the head in pieces: no [T, vocab] logits at once
                e = min(s + 4096, ids_BT.shape[1] - 1)
                logits = model.logits(hidden[:, s:e]).float()
                nll += F.cross_entropy(logits.flatten(0, 1), ids_BT[:, s + 1:e + 1].flatten(), reduction="sum").item()
                count += logits.shape[0] * logits.shape[1]
    finally:
        for _, mixer in sparse:
            del mixer.decode_core
    return got, nll / count


def measure(q, k, cfg) -> tuple[dict, object]:
    """(the locality numbers of the layer's picks, the picks [B, Hkv, T, k_total])."""
    from hyloom.kernels.infllm_v2 import compress_keys, select_blocks

    idx = select_blocks(q, compress_keys(k, cfg), cfg)
    return locality(idx, cfg.block_size, cfg.init_blocks, cfg.window // cfg.block_size, cfg.k_total), idx


# ---- the forward: per-token kernel vs token tiles on the same picks ---------------------------------------------

def blocks_loaded(idx_BKTS, cfg, tile: int) -> dict:
    """Mean K/V blocks one tile of `tile` tokens loads for its scored picks (those after _local_fwd's forced
    blocks): the tile kernel once per block of the union, the per-token kernel once per token and pick."""
    from hyloom.kernels.infllm_v2.ops import tile_unions

    local = (cfg.init_blocks, cfg.window // cfg.block_size)
    T = idx_BKTS.shape[2]
    _, _, count = tile_unions(idx_BKTS, tile, cfg.block_size, cfg.n_blocks(T), 0, local)
    window_lo = (idx_BKTS.new_tensor(range(T)) // cfg.block_size - local[1]).clamp_min(local[0]).view(1, 1, T, 1)
    scored = ((idx_BKTS >= local[0]) & (idx_BKTS < window_lo)).sum().item()
    tile_blocks = count.double().mean().item()
    per_token = scored / count.numel()
    return {"tile": tile_blocks, "per_token": per_token, "ratio": per_token / tile_blocks if tile_blocks else None}


def time_forward(q, k, v, idx, cfg, tiles, peers_too: bool, smoke=False) -> list[dict]:
    """One "fwd_tile" row per tile size: the tile forward (median ms over num_warps 4 and 8, best kept) against
    the per-token forward and the peers; its union preparation alone (Triton and the PyTorch reference);
    max_rel_err of its bf16 output against the per-token kernel's (max |diff| over max |per-token|), checked
    before any timing. CUDA; smoke (the tests: the
    Triton interpreter on a CPU) times single calls."""
    import torch
    from torch.nn.attention import SDPBackend

    from hyloom.kernels.infllm_v2 import naive, ops
    from infllm_v2 import bench, sdpa_peer

    median_ms = lambda fn, _smoke: bench(fn, smoke)  # noqa: E731

    q, k, v, idx = (x.contiguous() for x in (q, k, v, idx.to(torch.int32)))
    local, scale = (cfg.init_blocks, cfg.window // cfg.block_size), q.shape[-1] ** -0.5
    fwd = lambda tile: ops._sparse_fwd(q, k, v, idx, cfg.block_size, scale, 0, local=local, tile_tokens=tile)  # noqa: E731
    want_o, want_lse = fwd(0)
    per_token_ms = median_ms(lambda: fwd(0), False)
    peers, peer_errors = {"per_token": per_token_ms}, {}
    if peers_too:
        G = q.shape[2] // k.shape[2]
        k_rep, v_rep = (x.repeat_interleave(G, dim=2) for x in (k, v))
        try:
            peers["sdpa.cudnn"] = median_ms(sdpa_peer(q, k_rep, v_rep, SDPBackend.CUDNN_ATTENTION), False)
        except Exception as e:  # a backend missing on this build is reported, not fatal
            peer_errors["sdpa.cudnn"] = f"{type(e).__name__}: {str(e)[:200]}"
        del k_rep, v_rep
        try:  # the call of bench/infllm_v2.py, with this layer's block count and size
            from fla.ops.nsa import parallel_nsa
            g_cmp, g_slc = (torch.rand(q.shape[:3], device=q.device, dtype=q.dtype) for _ in range(2))
            peers["fla.parallel_nsa"] = median_ms(lambda: parallel_nsa(q, k, v, g_cmp, g_slc, block_counts=cfg.k_total,
                                                                       block_size=cfg.block_size), False)
        except Exception as e:
            peer_errors["fla.parallel_nsa"] = f"{type(e).__name__}: {str(e)[:200]}"
    rows = []
    for tile in tiles:
        got_o, got_lse = fwd(tile)
        err = ((got_o.float() - want_o.float()).abs().max() / want_o.float().abs().max()).item()
        lse_err = (got_lse - want_lse).nan_to_num(posinf=0.0, neginf=0.0).abs().max().item()
        if not err < 2e-2:  # bf16 rounding of the same sums stays far below; report, keep timing
            log(f"tile {tile}: max_rel_err {err:.3g} against the per-token forward")
        by_warps, tuned = {}, ops.TUNE["tile"]
        try:
            for warps in (4, 8):
                ops.TUNE["tile"] = dict(tuned, num_warps=warps)
                by_warps[warps] = median_ms(lambda: fwd(tile), False)
        finally:
            ops.TUNE["tile"] = tuned
        best = min(by_warps, key=by_warps.get)
        prep_args = (idx, tile, cfg.block_size, cfg.n_blocks(q.shape[1]), 0, local)
        prep_ms = median_ms(lambda: ops.tile_unions(*prep_args, backend="triton"), False)
        prep_ref_ms = median_ms(lambda: naive.tile_unions_ref(*prep_args), False)
        rows.append({"case": "fwd_tile", "tile_tokens": tile, "ours_ms": by_warps[best],
                     "ours_is": "forced-block tiles + union preparation + tile kernel", "num_warps": best,
                     "ms_by_num_warps": by_warps, "union_prep_ms": prep_ms, "union_prep_ref_ms": prep_ref_ms,
                     "peers": dict(peers),
                     "peer_errors": peer_errors, "speedup_vs_per_token": per_token_ms / by_warps[best],
                     "max_rel_err": err, "lse_max_abs_diff": lse_err, "blocks_loaded": blocks_loaded(idx, cfg, tile)})
    return rows


def forward_rows(q, k, v, idx, cfg, tiles, device, inputs: str, layer) -> list[dict]:
    """time_forward's rows on CUDA; on a CPU the rows carry only the block counts."""
    if device.type == "cuda":
        rows = time_forward(q, k, v, idx, cfg, tiles, peers_too=True)
    else:
        rows = [{"case": "fwd_tile", "tile_tokens": t, "ours_ms": None, "timing": "skipped: no GPU",
                 "blocks_loaded": blocks_loaded(idx, cfg, t)} for t in tiles]
    shape = {"q": list(q.shape), "k": list(k.shape), "dtype": str(q.dtype)}
    return [{"layer": layer, "inputs": inputs, "shapes": shape, **row} for row in rows]


# ---- the run ------------------------------------------------------------------------------------------------------

def short_device(device) -> str:
    import torch

    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in {"H100": "h100", "H200": "h200"}.items() if k in name), name.split()[-1].lower())


def table(record: dict) -> str:
    keys = ["pick_overlap", "pick_overlap_nonforced", "nonforced_picks_per_token"] + [
        f"tile{t}_{m}" for t in TILES for m in ("union_over_k_total", "nonforced_union_over_k_total", "load_ratio")]
    heads = ["overlap", "ovl nonf", "nonf/tok"] + [f"t{t} {m}" for t in TILES for m in ("U/k", "Unf/k", "ratio")]
    lines = [f"{'layer':>10} " + " ".join(f"{h:>9}" for h in heads)]
    for row in record["layers"]:
        for name, stats in (("", row), (" random", row["random"])):
            lines.append(f"{str(row['layer']) + name:>10} " + " ".join(f"{stats[k]:>9.3f}" for k in keys))
    lines.append(f"{'all':>10} " + " ".join(f"{record['overall'][k]:>9.3f}" for k in keys))
    lines.append(f"{'all random':>10} " + " ".join(f"{record['overall_random'][k]:>9.3f}" for k in keys))
    lines.append(f"{'layer':>10} {'inputs':>8} {'tile':>5} {'tile ms':>9} {'prep ms':>9} {'prep ref':>9} "
                 f"{'token ms':>9} {'cudnn ms':>9} {'nsa ms':>9} {'rel err':>9} {'blk/tile':>9} {'blk/tok':>9}")
    fmt = lambda x: f"{x:>9.3f}" if isinstance(x, float) else f"{'-':>9}"  # noqa: E731
    for row in record.get("forward", []):
        peers, loads = row.get("peers", {}), row["blocks_loaded"]
        lines.append(f"{row['layer']:>10} {row['inputs']:>8} {row['tile_tokens']:>5} {fmt(row['ours_ms'])} "
                     f"{fmt(row.get('union_prep_ms'))} {fmt(row.get('union_prep_ref_ms'))} "
                     f"{fmt(peers.get('per_token'))} {fmt(peers.get('sdpa.cudnn'))} "
                     f"{fmt(peers.get('fla.parallel_nsa'))} "
                     f"{fmt(row.get('max_rel_err'))} {fmt(loads['tile'])} {fmt(loads['per_token'])}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the JSON record")
    p.add_argument("--budget-seconds", type=float, default=150.0,
                   help="seconds of training (sets the steps; default 150; --quick trains 10 steps)")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    p.add_argument("--length", type=int, default=None, help="held-out tokens of the capture (default 32768; "
                                                            "--quick 1024)")
    p.add_argument("--checkpoint", default=None, help="a hyloom checkpoint with InfLLM-V2 layers: no training")
    p.add_argument("--quick", action="store_true", help="a toy model on the CPU, end to end in under two minutes")
    p.add_argument("--seed", type=int, default=0, help="of the random q/k contrast")
    p.add_argument("--tile-tokens", default="16,32", help="token tiles of the forward timing (powers of two <= 32)")
    args = p.parse_args(argv)
    tiles = [int(t) for t in args.tile_tokens.split(",") if t]
    budget = args.budget_seconds
    length = args.length or (1024 if args.quick else 32768)
    if budget <= 0 or length < 2:
        p.error("--budget-seconds must be positive and --length at least 2")
    began = time.perf_counter()

    import numpy as np
    import torch
    import triton

    from hyloom import __version__
    from hyloom.checkpoint import load_checkpoint
    from hyloom.data import DataError, prepare
    from hyloom.eval import heldout_reader
    from hyloom.train import pick_device

    device = pick_device("cpu" if args.quick and args.device == "auto" else args.device, "--device")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="infllm-v2-locality-"))
    record = {"op": "infllm_v2_locality", "device": short_device(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "versions": {"hyloom": __version__, "torch": torch.__version__, "triton": triton.__version__,
                           "python": platform.python_version()},
              "command": " ".join(["python3 bench/infllm_v2_locality.py",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "date": str(datetime.date.today())}
    try:
        if args.checkpoint:
            model, bp = load_checkpoint(args.checkpoint, device=str(device))
            record["model"] = {"checkpoint": str(args.checkpoint)}
        else:
            overrides = (QUICK if args.quick else []) + [f"train.device={device}"]
            bp = load(overrides)
            prepared = prepare(bp.data, progress=False)
            log(f"data ready ({time.perf_counter() - began:.0f} s): {prepared.dir}")
            if args.quick:  # a smoke run: a fixed few steps, no timing
                steps, step_s = QUICK_STEPS, None
            else:
                steps, step_s = plan_steps(bp, device, budget)
                log(f"{step_s:.3f} s per step: {steps} steps in {budget:.0f} s")
            result, curve = train_model(overrides, steps, work)
            tokens = steps * bp.train.batch_size * bp.data.seq_len
            log(f"trained {steps} steps, {tokens:,} tokens in {result['seconds']} s: loss {result['train_loss']:.3f}, "
                f"held-out {result['eval_loss']}")
            model, bp = load_checkpoint(result["checkpoint"], device=str(device))
            record["model"] = {"blueprint": str(BLUEPRINT.relative_to(ROOT)), "overrides": overrides}
            record["training"] = {"steps": steps, "batch_size": bp.train.batch_size, "seq_len": bp.data.seq_len,
                                  "tokens": tokens, "seconds": result["seconds"],
                                  "budget_seconds": None if args.quick else budget,
                                  "step_s_planned": step_s, "train_loss": result["train_loss"],
                                  "eval_loss": result["eval_loss"], "unigram_loss": result["unigram_loss"],
                                  "curve": curve}
        record["model"].update(layout="".join(bp.model.layout), parameters=sum(p.numel() for p in model.parameters()))
        heldout = heldout_reader(prepare(bp.data, progress=False).dir)()
        if len(heldout) < length:
            raise DataError(f"the held-out split holds {len(heldout)} tokens, fewer than --length {length}")
        ids = torch.from_numpy(heldout[:length].astype(np.int64))[None].to(device)
        captured, loss = capture_qk(model, ids, device)
        log(f"captured q/k of layers {sorted(captured)} at {length} tokens; held-out loss there {loss:.3f}")
        del model
        layers, forward, gen = [], [], torch.Generator(device=device).manual_seed(args.seed)
        for i, (q, k, v, cfg) in sorted(captured.items()):
            real, idx = measure(q, k, cfg)
            rand_q, rand_k, rand_v = (torch.randn(x.shape, generator=gen, device=device).to(x.dtype) for x in (q, k, v))
            rand, rand_idx = measure(rand_q, rand_k, cfg)
            if length >= cfg.dense_len:  # the layer runs sparse at this length: time its forward
                forward += forward_rows(q, k, v, idx, cfg, tiles, device, "trained", i)
                forward += forward_rows(rand_q, rand_k, rand_v, rand_idx, cfg, tiles, device, "random", i)
            layers.append({"layer": i, **real, "random": rand,
                           "config": {f: getattr(cfg, f) for f in ("block_size", "kernel_size", "kernel_stride",
                                                                   "topk", "init_blocks", "window", "dense_len")},
                           "k_total": cfg.k_total, "ran_sparse": length >= cfg.dense_len,
                           "shapes": {"q": list(q.shape), "k": list(k.shape), "dtype": str(q.dtype)}})
        mean = lambda rows, key: float(np.nanmean([r[key] for r in rows]))  # noqa: E731
        keys = [key for key, value in layers[0].items() if isinstance(value, float)]
        record.update(capture={"length": length, "heldout_tokens": int(len(heldout)), "heldout_loss_at_length": loss},
                      layers=layers, forward=forward, overall={key: mean(layers, key) for key in keys},
                      overall_random={key: mean([r["random"] for r in layers], key) for key in keys})
        record["pick_overlap"] = record["overall"]["pick_overlap"]
        record["pick_overlap_nonforced"] = record["overall"]["pick_overlap_nonforced"]
        record["pick_overlap_random"] = record["overall_random"]["pick_overlap"]
        record["seconds"] = round(time.perf_counter() - began, 1)
        path = out / f"infllm_v2-locality-{record['device']}-{datetime.date.today().strftime('%Y%m%d')}.json"
        write_json(path, record)
        print(table(record), end="")
        log(f"pick_overlap {record['pick_overlap']:.3f} (non-forced {record['pick_overlap_nonforced']:.3f}; "
            f"random q/k {record['pick_overlap_random']:.3f}); wrote {path} in {record['seconds']} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    run_main(main, "infllm_v2_locality")
