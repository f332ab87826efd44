"""Public InfLLM-V2 operations: Triton on CUDA tensors, the PyTorch reference elsewhere.

backend=None picks by device; "torch" forces the reference; "triton" forces the kernels (on CPU tensors it
needs TRITON_INTERPRET=1, as the tests use it). The training path's Triton work runs as torch custom ops
(hyloom::infllm_v2_select, hyloom::infllm_v2_sparse_fwd / _bwd), which torch.compile keeps whole.
"""
import dataclasses
import os
from typing import Optional  # the custom ops' annotations: torch.library reads them

import torch
import torch.nn.functional as F

from . import naive
from .config import SparseConfig

try:
    import triton
    from . import triton_attn, triton_select
except ImportError:  # the package must import without triton; the reference path still works
    triton = None

LOG2E = 1.4426950408889634
# Launch settings, one dict per kernel (num_warps, num_stages, and for the dK/dV kernels the orientation of
# their products) plus tile sizes; bench/infllm_v2.py sweeps them.
TUNE = {"lse": {"num_warps": 4, "num_stages": 2}, "scores": {"num_warps": 4, "num_stages": 2},
        "fwd": {"num_warps": 2, "num_stages": 3}, "dq": {"num_warps": 2, "num_stages": 3},
        "dkdv": {"num_warps": 4, "num_stages": 2, "KEYS_AS_M": False}, "topk": {"num_warps": 4, "num_stages": 1},
        "local": {"num_warps": 8, "num_stages": 3}, "local_dq": {"num_warps": 8, "num_stages": 3},
        "local_dkdv": {"num_warps": 4, "num_stages": 2, "KEYS_AS_M": True},
        "select_rows": 128, "select_blocks": 16, "lse_kernels": 64, "lse_min_programs": 264,
        "dkdv_chunk": 16, "dkdv_rows": 64, "local_rows": 128, "local_dkdv_rows": 64,
        "triton_topk": True, "local_split": True}
_empty = torch.empty  # every kernel output is allocated here; tests swap in NaN-filled buffers to catch unwritten cells


TRITON_ON_CPU = False  # let backend=None run the interpreter on CPU tensors too (bench --smoke sets it)


def _use_triton(x: torch.Tensor, backend) -> bool:
    if backend == "torch":
        return False
    # On CPU the interpreter runs only when asked for: a test module that sets TRITON_INTERPRET=1 must not
    # send every other CPU test of the same pytest process through it (minutes instead of seconds).
    interpret = os.environ.get("TRITON_INTERPRET") == "1" and (backend == "triton" or TRITON_ON_CPU)
    usable = triton is not None and (x.is_cuda or interpret)
    if backend == "triton" and not usable:
        raise RuntimeError("backend='triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1)")
    return usable


def _pow2(n: int, at_least: int = 1) -> int:
    return max(at_least, 1 << (n - 1).bit_length())


def compress_keys(k_BTKD: torch.Tensor, cfg: SparseConfig) -> torch.Tensor:
    """[B, n_kernels, Hkv, D]: mean of each full kernel of keys (a strided view and a mean; no Triton needed)."""
    return naive.compress_keys_ref(k_BTKD, cfg)


def update_compressed_keys(k_cache, kc_cache, prev_len: int, cache_len: int, cfg: SparseConfig) -> int:
    """Write the kernels completed by keys prev_len .. cache_len-1 into kc_cache; returns the kernel count.

    A new kernel appears every kernel_stride tokens once kernel_size keys exist; trailing keys wait uncompressed.
    """
    n_old, n_new = cfg.n_kernels(prev_len), cfg.n_kernels(cache_len)
    if n_new > n_old:
        start = n_old * cfg.kernel_stride
        stop = (n_new - 1) * cfg.kernel_stride + cfg.kernel_size
        kc_cache[:, n_old:n_new] = naive.compress_keys_ref(k_cache[:, start:stop], cfg)
    return n_new


def select_blocks(q_BTHD, kc_BNKD, cfg: SparseConfig, scale=None, q_offset=0, backend=None) -> torch.Tensor:
    """[B, Hkv, T, k_total] int32 selected blocks (ascending, -1 last) for queries at q_offset + 0..T-1."""
    q_BTHD, kc_BNKD = q_BTHD.detach(), kc_BNKD.detach()  # selection is discrete: no gradient
    if not _use_triton(q_BTHD, backend):
        return naive.select_blocks_ref(q_BTHD, kc_BNKD, cfg, scale, q_offset)
    scale = q_BTHD.shape[-1] ** -0.5 if scale is None else scale
    return select_op(q_BTHD, kc_BNKD, list(dataclasses.astuple(cfg)), float(scale), q_offset)


@torch.library.custom_op("hyloom::infllm_v2_select", mutates_args=())
def select_op(q: torch.Tensor, kc: torch.Tensor, cfg: list[int], scale: float, q_offset: int) -> torch.Tensor:
    """select_blocks on the Triton kernels; cfg: the SparseConfig's fields in order (an op takes no dataclass)."""
    sparse = SparseConfig(*cfg)
    scores = block_scores(q, kc, sparse, scale, q_offset)
    return topk_blocks(scores, sparse.k_total, backend="triton")


@select_op.register_fake
def _(q, kc, cfg, scale, q_offset):
    B, T, H, _ = q.shape
    return q.new_empty((B, kc.shape[2], T, SparseConfig(*cfg).k_total), dtype=torch.int32)


def topk_blocks(scores, k_total: int, backend=None) -> torch.Tensor:
    """Top-k_total blocks of each row of block scores (see naive.topk_blocks for the tie rule)."""
    if not _use_triton(scores, backend) or not TUNE["triton_topk"]:
        return naive.topk_blocks(scores, k_total)
    n_blocks = scores.shape[-1]
    rows = scores.reshape(-1, n_blocks)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    idx = _empty(*scores.shape[:-1], k_total, device=scores.device, dtype=torch.int32)
    if rows.shape[0]:
        triton_select._topk_blocks[(rows.shape[0],)](
            rows, idx, n_blocks, rows.stride(0), k_total, K=k_total, K_P=_pow2(k_total), NB_P=_pow2(n_blocks, 16),
            **TUNE["topk"])
    return idx


def block_scores(q_BTHD, kc_BNKD, cfg: SparseConfig, scale=None, q_offset=0) -> torch.Tensor:
    """Triton stage 1: [B, Hkv, T, n_blocks] fp32 pooled, group-summed scores (+inf forced, -inf future)."""
    q = q_BTHD.contiguous()
    kc = kc_BNKD.to(q.dtype).contiguous()
    B, T, H, D = q.shape
    N, Hkv = kc.shape[1], kc.shape[2]
    G = H // Hkv
    GP = _pow2(G)
    scale = D ** -0.5 if scale is None else scale
    n_blocks = cfg.n_blocks(q_offset + T)
    out = _empty(B, Hkv, T, n_blocks, device=q.device, dtype=torch.float32)
    block_t = max(1, min(TUNE["select_rows"] // GP, _pow2(T)))  # rows of a tile: tokens × heads
    if N == 0:  # no kernel yet: skip pass 1, pass 2 only writes forced / future marks
        lse = torch.full((1, B, H, T), float("-inf"), device=q.device)
    elif not cfg.approx_lse:
        lse = _kernel_lse(q, kc, cfg.kernel_size, cfg.kernel_stride, q_offset, scale, block_t)
    else:  # normaliser over coarse kernels; queries that see none of them yet keep the exact one
        lse = _kernel_lse(q, naive.coarse_keys(kc, cfg).contiguous(), cfg.lse_kernel_size, cfg.lse_kernel_stride,
                          q_offset, scale, block_t)
        early = min(T, max(0, cfg.lse_kernel_size - 1 - q_offset))
        if early:  # every split of the coarse pass left these rows at -inf, so split 0 may take the exact value
            _kernel_lse(q[:, :early], kc, cfg.kernel_size, cfg.kernel_stride, q_offset, scale, block_t,
                        out=lse[:1, :, :, :early])
    block_b = TUNE["select_blocks"]
    pow2_stride = (cfg.pool_stride & (cfg.pool_stride - 1)) == 0
    triton_select._block_scores[(triton.cdiv(T, block_t), B * Hkv)](
        q, kc, lse, out, T, N, Hkv, n_blocks, q_offset, scale * LOG2E, lse.shape[0],
        q.stride(0), q.stride(1), q.stride(2), kc.stride(0), kc.stride(1), kc.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2), out.stride(0), out.stride(1), out.stride(2),
        G=G, GP=GP, BLOCK_T=block_t, BLOCK_B=block_b, D=D, KSIZE=cfg.kernel_size, KSTRIDE=cfg.kernel_stride,
        BS=cfg.block_size, POOL_W=cfg.pool_window, POOL_S=cfg.pool_stride, POOL_P=cfg.pool_padding,
        CONTIG_W=min(cfg.pool_stride, cfg.pool_window) if pow2_stride else 0,
        INIT=cfg.init_blocks, WIN_BLOCKS=cfg.window // cfg.block_size, **TUNE["scores"])
    return out


def _kernel_lse(q, keys, ksize, kstride, q_offset, scale, block_t, out=None):
    """Pass 1: [splits, B, H, T] partial LSEs (log2 units) of q·keys*scale over the keys (kernels of ksize,
    kstride) each query sees; pass 2 merges the splits. When the tiles alone would leave most of the GPU idle
    (decode), the kernels are split among programs. out: write one split there instead.
    """
    B, T, H, D = q.shape
    N, Hkv = keys.shape[1], keys.shape[2]
    tiles = triton.cdiv(T, block_t) * B * Hkv
    splits = max(1, min(TUNE["lse_min_programs"] // tiles, triton.cdiv(N, TUNE["lse_kernels"])))
    if out is None:
        out = _empty(splits, B, H, T, device=q.device, dtype=torch.float32)
    else:
        splits = 1
    triton_select._kernel_lse[(triton.cdiv(T, block_t), B * Hkv, splits)](
        q, keys, out, T, N, Hkv, q_offset, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        G=H // Hkv, GP=_pow2(H // Hkv), BLOCK_T=block_t, BLOCK_N=TUNE["lse_kernels"], D=D, KSIZE=ksize,
        KSTRIDE=kstride, **TUNE["lse"])
    return out


def _sparse_fwd(q, k, v, idx, block_size, scale, q_offset, splits=1, local=None):
    """Launch the forward kernel(s); returns (o [B,T,H,D], lse [B,H,T] in log2 units).

    local = (init_blocks, window_blocks) says that idx holds those forced blocks (as select_blocks makes it):
    they then run as dense tiles in _local_fwd and _sparse_fwd only walks the remaining picks.
    """
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    GP = _pow2(G, 16)
    ksel = idx.shape[-1]
    if splits == 1:
        o = _empty(q.shape, device=q.device, dtype=q.dtype)
        lse = _empty(B, H, T, device=q.device, dtype=torch.float32)
        o_s, lse_s = o.unsqueeze(0), lse.unsqueeze(0)
    else:  # split-K over the block list (decode): fp32 partials merged by their LSE
        o_s = _empty(splits, B, T, H, D, device=q.device, dtype=torch.float32)
        lse_s = _empty(splits, B, H, T, device=q.device, dtype=torch.float32)
    o_in, extra = o_s, {}
    if local is not None and splits == 1:
        init_blocks, win_blocks = local
        o_in = _empty(q.shape, device=q.device, dtype=torch.float32)
        gp_local = _pow2(G)
        tm = max(1, TUNE["local_rows"] // gp_local)
        triton_attn._local_fwd[(triton.cdiv(T, tm), B * Hkv)](
            q, k, v, o_in, lse, T, Hkv, q_offset, scale * LOG2E,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o_in.stride(0), o_in.stride(1), o_in.stride(2),
            lse.stride(0), lse.stride(1),
            G=G, GP=gp_local, D=D, BS=block_size, TM=tm, INIT=init_blocks, WIN_BLOCKS=win_blocks, **TUNE["local"])
        extra = dict(FROM_LOCAL=True, INIT=init_blocks, WIN_BLOCKS=win_blocks)
    triton_attn._sparse_fwd[(T, B * Hkv, splits)](
        q, k, v, idx, o_in, o_s, lse_s, Hkv, q_offset, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), idx.stride(0), idx.stride(1), idx.stride(2),
        o_s.stride(0), o_s.stride(1), o_s.stride(2), o_s.stride(3), lse_s.stride(0), lse_s.stride(1), lse_s.stride(2),
        G=G, GP=GP, D=D, BS=block_size, KSEL=ksel, KSEL_P=_pow2(ksel), SPLITS=splits, **extra, **TUNE["fwd"])
    if splits > 1:
        o = _empty(q.shape, device=q.device, dtype=q.dtype)
        lse = _empty(B, H, T, device=q.device, dtype=torch.float32)
        triton_attn._merge_splits[(T, B)](
            o_s, lse_s, o, lse, splits, o_s.stride(0), o_s.stride(1), o_s.stride(2), o_s.stride(3),
            lse_s.stride(0), lse_s.stride(1), lse_s.stride(2), o.stride(0), o.stride(1), o.stride(2),
            lse.stride(0), lse.stride(1), H=H, HP=_pow2(H), D=D)
    return o, lse


def _dkdv_work(idx, n_blocks: int, chunk: int, valid):
    """Reverse the block lists: for each (b*Hkv+kvh, block), the query tokens whose valid picks hold it, in chunks."""
    B, Hkv, T, S = idx.shape
    bk = torch.arange(B * Hkv, device=idx.device).view(B, Hkv, 1, 1)
    key = (bk * n_blocks + idx.long())[valid]
    tok = torch.arange(T, device=idx.device, dtype=torch.int32).view(1, 1, T, 1).expand(B, Hkv, T, S)[valid]
    key_sorted, order = torch.sort(key, stable=True)
    tok_list = tok[order].contiguous()
    counts = torch.bincount(key_sorted, minlength=B * Hkv * n_blocks)
    starts = torch.cumsum(counts, 0) - counts
    n_chunks = (counts + chunk - 1) // chunk
    work_key = torch.repeat_interleave(torch.arange(counts.numel(), device=idx.device), n_chunks)
    first_chunk = torch.cumsum(n_chunks, 0) - n_chunks
    chunk_no = torch.arange(work_key.numel(), device=idx.device) - first_chunk[work_key]
    lo = starts[work_key] + chunk_no * chunk
    hi = torch.minimum(lo + chunk, starts[work_key] + counts[work_key])
    as32 = lambda x: x.to(torch.int32).contiguous()
    return as32(work_key // n_blocks), as32(work_key % n_blocks), as32(lo), as32(hi), tok_list


def _sparse_bwd(q, k, v, idx, o, lse, do, bs, scale, q_offset, local):
    B, T, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G, GP = H // Hkv, _pow2(H // Hkv, 16)
    delta = (o.float() * do.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, T]
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2))
    dq = _empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
    dv = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
    picks = idx >= 0  # the (token, block) pairs left to the per-token kernels
    dq_in, extra = dq, {}
    if local is not None:  # forced blocks as dense tiles (see _sparse_fwd); the init blocks' dK/dV stay per token
        init_blocks, win_blocks = local
        dq_in = _empty(q.shape, device=q.device, dtype=torch.float32)
        gp_local = _pow2(G)
        tm = max(1, TUNE["local_rows"] // gp_local)
        triton_attn._local_bwd_dq[(triton.cdiv(T, tm), B * Hkv)](
            q, k, v, do, lse, delta, dq_in, T, Hkv, q_offset, scale * LOG2E, *strides, lse.stride(0), lse.stride(1),
            G=G, GP=gp_local, D=D, BS=bs, TM=tm, INIT=init_blocks, WIN_BLOCKS=win_blocks, **TUNE["local_dq"])
        n_key_blocks = -(-Tk // bs)
        if n_key_blocks > init_blocks:
            tq = max(1, TUNE["local_dkdv_rows"] // gp_local)
            triton_attn._local_bwd_dkdv[(n_key_blocks - init_blocks, B * Hkv)](
                q, k, v, do, lse, delta, dk, dv, T, Tk, Hkv, q_offset, scale * LOG2E, scale, *strides,
                lse.stride(0), lse.stride(1),
                G=G, GP=gp_local, D=D, BS=bs, TQ=tq, INIT=init_blocks, WIN_BLOCKS=win_blocks,
                **TUNE["local_dkdv"])
        qblk = (torch.arange(T, device=idx.device) + q_offset) // bs
        window_lo = (qblk - win_blocks).clamp_min(init_blocks).view(1, 1, T, 1)
        picks = picks & (idx < window_lo)
        extra = dict(FROM_LOCAL=True, INIT=init_blocks, WIN_BLOCKS=win_blocks)
    ksel = idx.shape[-1]
    triton_attn._sparse_bwd_dq[(T, B * Hkv)](
        q, k, v, do, lse, delta, idx, dq_in, dq, Hkv, q_offset, scale * LOG2E, scale, *strides,
        idx.stride(0), idx.stride(1), idx.stride(2), lse.stride(0), lse.stride(1),
        G=G, GP=GP, D=D, BS=bs, KSEL=ksel, KSEL_P=_pow2(ksel), **extra, **TUNE["dq"])
    tq = max(1, TUNE["dkdv_rows"] // GP)
    work_bk, work_blk, lo, hi, tok_list = _dkdv_work(idx, -(-Tk // bs), TUNE["dkdv_chunk"] * tq, picks)
    if work_bk.numel():
        triton_attn._sparse_bwd_dkdv[(work_bk.numel(),)](
            q, k, v, do, lse, delta, dk, dv, work_bk, work_blk, lo, hi, tok_list, Hkv, Tk, q_offset,
            scale * LOG2E, scale, *strides, lse.stride(0), lse.stride(1),
            G=G, GP=GP, D=D, BS=bs, TQ=tq, **TUNE["dkdv"])
    return dq, dk.to(k.dtype), dv.to(v.dtype)


@torch.library.custom_op("hyloom::infllm_v2_sparse_fwd", mutates_args=())
def sparse_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, block_size: int, scale: float,
                  q_offset: int, local: Optional[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, H, D], lse [B, H, T] fp32 in log2 units); local: (init_blocks, window_blocks) or None."""
    q, k, v, idx = q.contiguous(), k.contiguous(), v.contiguous(), idx.contiguous()
    return _sparse_fwd(q, k, v, idx, block_size, scale, q_offset, local=tuple(local) if local else None)


@sparse_fwd_op.register_fake
def _(q, k, v, idx, block_size, scale, q_offset, local):
    B, T, H, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("hyloom::infllm_v2_sparse_bwd", mutates_args=())
def sparse_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, do: torch.Tensor, block_size: int, scale: float, q_offset: int,
                  local: Optional[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of the block-sparse attention whose forward gave o and lse."""
    q, k, v, idx, o, do = (x.contiguous() for x in (q, k, v, idx, o, do.to(q.dtype)))
    return _sparse_bwd(q, k, v, idx, o, lse.contiguous(), do, block_size, scale, q_offset,
                       tuple(local) if local else None)


@sparse_bwd_op.register_fake
def _(q, k, v, idx, o, lse, do, block_size, scale, q_offset, local):
    like = lambda x: torch.empty_like(x, memory_format=torch.contiguous_format)  # noqa: E731
    return like(q), like(k), like(v)


def _sparse_setup(ctx, inputs, output):
    q, k, v, idx, block_size, scale, q_offset, local = inputs
    ctx.save_for_backward(q, k, v, idx, *output)
    ctx.args = (block_size, scale, q_offset, local)


def _sparse_backward(ctx, do, _dlse):
    q, k, v, idx, o, lse = ctx.saved_tensors
    dq, dk, dv = sparse_bwd_op(q, k, v, idx, o, lse, do, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


sparse_fwd_op.register_autograd(_sparse_backward, setup_context=_sparse_setup)


def block_sparse_attn(q_BTHD, k_BTKD, v_BTKD, idx_BKTS, block_size: int, scale=None, backend=None, q_offset=0,
                      forced=None):
    """Causal attention of each query over the real K/V of its selected blocks; differentiable in q, k, v.

    forced = (init_blocks, window_blocks) promises that every row of idx holds its init and local blocks (as
    select_blocks guarantees); the forward then runs those as dense tiles. Without it any idx is fine.
    """
    scale = q_BTHD.shape[-1] ** -0.5 if scale is None else scale
    if not _use_triton(q_BTHD, backend):
        return naive.sparse_attn_ref(q_BTHD, k_BTKD, v_BTKD, idx_BKTS, block_size, scale, q_offset)
    local = list(forced) if forced is not None and TUNE["local_split"] else None
    o, _ = sparse_fwd_op(q_BTHD, k_BTKD, v_BTKD, idx_BKTS.to(torch.int32), block_size, float(scale), q_offset, local)
    return o


def dense_causal_attn(q_BTHD, k_BTKD, v_BTKD, scale=None):
    """Plain causal GQA attention through PyTorch SDPA (the layer below dense_len)."""
    q, k, v = (x.transpose(1, 2) for x in (q_BTHD, k_BTKD, v_BTKD))
    G = q.shape[1] // k.shape[1]
    if G > 1:  # repeat rather than enable_gqa: not every SDPA backend takes it
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(1, 2)


def _padded_dense(q_BTHD, k_BTKD, v_BTKD, spans, length: int, scale, backend):
    """Causal attention of the packed sequences spans (start, end) as one batch padded to length: the padding
    sits after every real token, so causal attention never lets a real query see it."""
    pad = lambda x, s, e: F.pad(x[0, s:e], (0, 0, 0, 0, 0, length - (e - s)))
    q, k, v = (torch.stack([pad(x, s, e) for s, e in spans]) for x in (q_BTHD, k_BTKD, v_BTKD))
    if backend == "torch":
        return naive.dense_causal_ref(q, k, v, scale)
    return dense_causal_attn(q, k, v, scale)


def infllm_v2_attn(q_BTHD, k_BTKD, v_BTKD, cfg: SparseConfig, scale=None, cu_seqlens=None, backend=None):
    """The whole layer. Dense causal attention when the key length is < dense_len, else compress -> select -> attend.

    cu_seqlens (int tensor [N+1], batch of 1, sequences packed along T): each sequence decides dense or sparse
    by its own length. A sparse one (>= dense_len keys) runs on its own; the dense ones run as a few padded
    batches, one per power-of-two length bucket.
    """
    if cu_seqlens is not None:
        if q_BTHD.shape[0] != 1:
            raise ValueError("cu_seqlens needs a batch of 1 with the sequences packed along T")
        bounds = cu_seqlens.tolist()
        spans = [(s, e) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
        out = {}
        for s, e in spans:
            if e - s >= cfg.dense_len:
                out[s] = infllm_v2_attn(q_BTHD[:, s:e], k_BTKD[:, s:e], v_BTKD[:, s:e], cfg, scale, None, backend)
        buckets = {}
        for s, e in spans:
            if e - s < cfg.dense_len:
                buckets.setdefault(_pow2(e - s), []).append((s, e))
        for length, group in buckets.items():
            o = _padded_dense(q_BTHD, k_BTKD, v_BTKD, group, length, scale, backend)
            out.update({s: o[i:i + 1, :e - s] for i, (s, e) in enumerate(group)})
        return torch.cat([out[s] for s, _ in spans], dim=1) if spans else q_BTHD[:, :0].clone()
    if k_BTKD.shape[1] < cfg.dense_len:
        if backend == "torch":
            return naive.dense_causal_ref(q_BTHD, k_BTKD, v_BTKD, scale)
        return dense_causal_attn(q_BTHD, k_BTKD, v_BTKD, scale)
    kc = compress_keys(k_BTKD, cfg)
    idx = select_blocks(q_BTHD, kc, cfg, scale, backend=backend)
    return block_sparse_attn(q_BTHD, k_BTKD, v_BTKD, idx, cfg.block_size, scale, backend,
                             forced=(cfg.init_blocks, cfg.window // cfg.block_size))


def infllm_v2_decode(q_BHD, k_cache, v_cache, kc_cache, cache_len: int, cfg: SparseConfig, scale=None,
                     backend=None, splits=16):
    """One new query token per sequence over a KV cache that already holds it (positions 0 .. cache_len-1).

    kc_cache holds cfg.n_kernels(cache_len) valid kernels (keep it with update_compressed_keys). Below
    dense_len: dense attention over the cache. Above: selection for the single query (stage 1 with its
    kernels split among programs), then the block-sparse kernel split over the block list.
    """
    B, H, D = q_BHD.shape
    q = q_BHD.unsqueeze(1)  # [B, 1, H, D]
    k, v = k_cache[:, :cache_len], v_cache[:, :cache_len]
    scale = D ** -0.5 if scale is None else scale
    q_offset = cache_len - 1
    if cache_len < cfg.dense_len:
        every_block = torch.arange(cfg.n_blocks(cache_len), device=q.device, dtype=torch.int32)
        idx = every_block.expand(B, k.shape[2], 1, every_block.numel())
    else:
        kc = kc_cache[:, :cfg.n_kernels(cache_len)]
        idx = select_blocks(q, kc, cfg, scale, q_offset, backend)
    if not _use_triton(q, backend):
        return naive.sparse_attn_ref(q, k, v, idx, cfg.block_size, scale, q_offset)[:, 0]
    o, _ = _sparse_fwd(q.contiguous(), k, v, idx.contiguous(), cfg.block_size, scale, q_offset, splits)
    return o[:, 0]
