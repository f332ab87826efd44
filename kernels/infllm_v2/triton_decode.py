"""InfLLM-V2's decode step in Triton with the lengths on the device (ops.infllm_v2_decode_static).

One query per row, at position lens[b] - 1, over caches whose shapes are set by their capacity: every launch has
the same grid at every step and no length reaches the host, so the step can be captured in a CUDA graph
(hyloom.decode). A program owns one (row, KV head) and the G query heads of the group as GP >= 16 rows (tl.dot's
minimum); it reads its row's length and masks whatever lies past it.
- `_decode_lse`: the softmax normaliser of the kernel scores, the kernels split among programs (partial LSEs).
- `_decode_block_scores`: blocks split among programs, each pooling its kernels' group-summed probabilities.
  The top-k is triton_select._topk_blocks over the capacity's blocks (those past a row's length are -inf).
- `_decode_attn`: split-K attention over the picks; triton_attn._merge_splits merges the splits.
Logits are in log2 units (scale * log2 e), as in the other kernels.
"""
import triton
import triton.language as tl

from .triton_attn import attend_step, load_kv
from .triton_select import _kernel_probs, load_group_queries, merge_lse


@triton.jit
def decode_row(pid_bk, lens_ptr, Hkv, GP: tl.constexpr, G: tl.constexpr):
    """Program pid_bk = b * Hkv + kvh: returns b, kvh, g (head in the group, GP rows), row_ok, the query's position."""
    b = pid_bk // Hkv
    g = tl.arange(0, GP)
    return b, pid_bk % Hkv, g, g < G, tl.load(lens_ptr + b) - 1


@triton.jit
def _decode_lse(q_ptr, kc_ptr, lens_ptr, lse_ptr, N, Hkv, qk_scale, pos_limit,
                s_qb, s_qh, s_kb, s_kn, s_kh, s_ls, s_lb, s_lh,
                G: tl.constexpr, GP: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, SIZE: tl.constexpr,
                STRIDE: tl.constexpr, PARTS: tl.constexpr, CSTEP: tl.constexpr, PSTEP: tl.constexpr):
    """Split program_id(1)'s partial LSE over the kernels (SIZE keys, STRIDE apart, N slots) complete at the row's
    position: fine kernels of kc (PARTS 1), or coarse ones, each the mean of PARTS fine kernels (coarse n: fine
    n * CSTEP + p * PSTEP, as naive.coarse_keys), averaged here instead of stored. A row at pos >= pos_limit
    sees none: its partials stay -inf."""
    b, kvh, g, row_ok, pos = decode_row(tl.program_id(0), lens_ptr, Hkv, GP, G)
    q = load_group_queries(q_ptr, b, kvh, tl.zeros_like(g), g, row_ok, s_qb, 0, s_qh, G, D)
    d = tl.arange(0, D)
    n_vis = tl.minimum(tl.maximum(pos - SIZE + 1 + STRIDE, 0) // STRIDE, N)
    n_vis = tl.where(pos < pos_limit, n_vis, 0)
    per_split = tl.cdiv(tl.cdiv(n_vis, tl.num_programs(1)), BLOCK_N) * BLOCK_N
    lo = tl.program_id(1) * per_split
    m = tl.full([GP], float("-inf"), tl.float32)
    l = tl.zeros([GP], tl.float32)
    for n0 in range(lo, tl.minimum(lo + per_split, n_vis), BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        ok = n < n_vis
        keys = tl.zeros([BLOCK_N, D], tl.float32)
        for p in tl.static_range(PARTS):
            fine = n * CSTEP + p * PSTEP
            keys += tl.load(kc_ptr + b * s_kb + fine[:, None] * s_kn + kvh * s_kh + d[None, :], mask=ok[:, None],
                            other=0.0).to(tl.float32)
        keys = (keys / PARTS).to(q.dtype)  # rounded to the cache's dtype, as naive.coarse_keys stores them
        s = tl.where(ok[None, :], tl.dot(q, tl.trans(keys)) * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m = m_new
    lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
    tl.store(lse_ptr + tl.program_id(1) * s_ls + b * s_lb + (kvh * G + g) * s_lh, lse, mask=row_ok)


@triton.jit
def _decode_block_scores(q_ptr, kc_ptr, lens_ptr, lse_ptr, out_ptr, N, Hkv, NBLK, qk_scale, LSE_SPLITS,
                         s_qb, s_qh, s_kb, s_kn, s_kh, s_ls, s_lb, s_lh, s_ob, s_oh,
                         G: tl.constexpr, GP: tl.constexpr, BLOCK_B: tl.constexpr, D: tl.constexpr,
                         KSIZE: tl.constexpr, KSTRIDE: tl.constexpr, BS: tl.constexpr, POOL_W: tl.constexpr,
                         POOL_S: tl.constexpr, POOL_P: tl.constexpr, INIT: tl.constexpr, WIN_BLOCKS: tl.constexpr):
    """Scores of blocks program_id(0) * BLOCK_B + [0, BLOCK_B) for the row's query: the max over the pool window of
    its kernels' probabilities summed over the G heads; forced blocks +inf, blocks past the query's -inf (the
    values of triton_select._block_scores for one token)."""
    b, kvh, g, row_ok, pos = decode_row(tl.program_id(1), lens_ptr, Hkv, GP, G)
    qblk = pos // BS
    blk = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    best = tl.zeros([BLOCK_B], tl.float32)
    if tl.program_id(0) * BLOCK_B < qblk - WIN_BLOCKS:  # from the local window on, every block is forced or future
        q = load_group_queries(q_ptr, b, kvh, tl.zeros_like(g), g, row_ok, s_qb, 0, s_qh, G, D)
        lse = merge_lse(lse_ptr + b * s_lb + (kvh * G + g) * s_lh, row_ok, LSE_SPLITS, s_ls)
        pos_r = tl.zeros([GP], tl.int32) + pos
        for w in tl.static_range(POOL_W):
            p = _kernel_probs(q, kc_ptr, blk * POOL_S - POOL_P + w, b, kvh, pos_r, row_ok, lse, N, qk_scale,
                              s_kb, s_kn, s_kh, D, KSIZE, KSTRIDE)
            best = tl.maximum(best, tl.sum(p, 0))
    forced = (blk < INIT) | ((blk <= qblk) & (blk >= qblk - WIN_BLOCKS))
    best = tl.where(forced, float("inf"), best)
    best = tl.where(blk > qblk, float("-inf"), best)
    tl.store(out_ptr + b * s_ob + kvh * s_oh + blk, best, mask=blk < NBLK)


@triton.jit
def _decode_attn(q_ptr, k_ptr, v_ptr, idx_ptr, lens_ptr, o_ptr, lse_ptr, Hkv, qk_scale,
                 s_qb, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ib, s_ih, s_os, s_ob, s_oh, s_ls, s_lb, s_lh,
                 G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                 KSEL: tl.constexpr, KSEL_P: tl.constexpr):
    """Split program_id(1) of the row's picks (ascending, -1 last): the normalised fp32 partial output of the G
    heads and its LSE (-inf for an empty split), for triton_attn._merge_splits."""
    b, kvh, g, row_ok, pos = decode_row(tl.program_id(0), lens_ptr, Hkv, GP, G)
    heads = kvh * G + g
    d = tl.arange(0, D)
    q = load_group_queries(q_ptr, b, kvh, tl.zeros_like(g), g, row_ok, s_qb, 0, s_qh, G, D)
    idx_row = idx_ptr + b * s_ib + kvh * s_ih
    sel = tl.load(idx_row + tl.arange(0, KSEL_P), mask=tl.arange(0, KSEL_P) < KSEL, other=-1)
    n = tl.sum((sel >= 0).to(tl.int32), 0)
    per_split = tl.cdiv(n, tl.num_programs(1))
    lo = tl.program_id(1) * per_split
    m = tl.full([GP], float("-inf"), tl.float32)
    l = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for i in range(lo, tl.minimum(lo + per_split, n)):
        kpos = tl.load(idx_row + i) * BS + tl.arange(0, BS)
        seen = kpos <= pos  # the row's last block may be partial
        k, v = load_kv(k_ptr, v_ptr, b, kvh, kpos, seen, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, D)
        m, l, acc = attend_step(q, k, v, seen[None, :], m, l, acc, qk_scale)
    l_safe = tl.where(l > 0, l, 1.0)
    split = tl.program_id(1)
    tl.store(o_ptr + split * s_os + b * s_ob + heads[:, None] * s_oh + d[None, :], acc / l_safe[:, None],
             mask=row_ok[:, None])
    tl.store(lse_ptr + split * s_ls + b * s_lb + heads * s_lh, tl.where(l > 0, m + tl.log2(l_safe), float("-inf")),
             mask=row_ok)
