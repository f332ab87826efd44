"""Token-tile block-sparse forward (issue 13 §3): one program per (tile of TT consecutive tokens, KV head).

Its rows are the tile's TT tokens × the group's GP heads (row = token * GP + head, as _local_fwd). Neighbouring
tokens pick mostly the same blocks on trained activations, so the program walks the UNION of its tokens' picks
and loads each K/V block once for the whole tile, where _sparse_fwd (one token per program) loads it once per
token. A row takes a block only if its own token picked it (a bit in the union entry's token mask) and only up
to its own position; a row skipping a block keeps its online-softmax state exactly (alpha = 1, p = 0), and the
union is ascending like every token's list, so each row sees the same sequence of updates as in _sparse_fwd.
The price: every row computes scores for every union block (masked), about TT / load_ratio times the FLOPs.

The union is prepared by _tile_unions_kernel (ops.tile_unions; PyTorch reference naive.tile_unions_ref): one
program per tile lists the distinct blocks of its TT * KSEL picks in ascending order, on the device, no host
sync; the bench times it with the kernel. With FROM_LOCAL the forced blocks are left to _local_fwd as in the
per-token path and the union holds only each token's picks between its init blocks and its local window. Forward
only, non-varlen, no split-K: ops._sparse_fwd uses it for tile_tokens > 0 in exactly that case and falls back to
the per-token kernel otherwise. Each token's picks must be distinct (select_blocks makes them so; the per-token
kernel would attend a repeated pick twice).
"""
import triton
import triton.language as tl

from .triton_attn import attend_step, load_kv
from .triton_select import group_tile, load_group_queries

MAX_TILE_TOKENS = 32  # one int32 of token bits per union entry


@triton.jit
def _tile_fwd(q_ptr, k_ptr, v_ptr, blocks_ptr, members_ptr, count_ptr, oin_ptr, o_ptr, lse_ptr, T, Hkv, q_offset,
              qk_scale, s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ub, s_ut, s_cb,
              s_ob, s_ot, s_oh, s_lb, s_lh,
              G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, TT: tl.constexpr,
              FROM_LOCAL: tl.constexpr = False):
    # blocks and members share strides (s_ub, s_ut); o and the fp32 oin share theirs (s_o*)
    pid_t = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b, kvh, tok, g, row_ok = group_tile(pid_t, pid_bk, T, Hkv, TT, GP, G)
    heads = kvh * G + g
    pos = tok + q_offset
    member = (tl.zeros_like(tok) + 1) << (tok - pid_t * TT)  # the row's token's bit
    last_pos = tl.minimum(pid_t * TT + TT - 1, T - 1) + q_offset
    d = tl.arange(0, D)
    q = load_group_queries(q_ptr, b, kvh, tok, g, row_ok, s_qb, s_qt, s_qh, G, D)
    m = tl.full([TT * GP], float("-inf"), tl.float32)
    l = tl.zeros([TT * GP], tl.float32)
    acc = tl.zeros([TT * GP, D], tl.float32)
    if FROM_LOCAL:  # continue from _local_fwd's normalised partial (as _sparse_fwd does)
        acc = tl.load(oin_ptr + b * s_ob + tok[:, None] * s_ot + heads[:, None] * s_oh + d[None, :],
                      mask=row_ok[:, None], other=0.0).to(tl.float32)
        m = tl.load(lse_ptr + b * s_lb + heads * s_lh + tok, mask=row_ok, other=0.0)
        l = tl.where(m == float("-inf"), 0.0, 1.0)
    union = pid_bk * s_ub + pid_t * s_ut
    n_union = tl.load(count_ptr + pid_bk * s_cb + pid_t)
    for i in range(0, n_union):
        blk = tl.load(blocks_ptr + union + i)
        picked = (tl.load(members_ptr + union + i) & member) != 0
        kpos = blk * BS + tl.arange(0, BS)
        k, v = load_kv(k_ptr, v_ptr, b, kvh, kpos, kpos <= last_pos, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, D)
        seen = picked[:, None] & (kpos[None, :] <= pos[:, None])
        m, l, acc = attend_step(q, k, v, seen, m, l, acc, qk_scale)
    l_safe = tl.where(l > 0, l, 1.0)  # a row that saw nothing: zeros and lse = -inf, as _sparse_fwd
    tl.store(o_ptr + b * s_ob + tok[:, None] * s_ot + heads[:, None] * s_oh + d[None, :],
             (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + b * s_lb + heads * s_lh + tok, tl.where(l > 0, m + tl.log2(l_safe), float("-inf")),
             mask=row_ok)



@triton.jit
def _tile_unions_kernel(idx_ptr, blocks_ptr, members_ptr, count_ptr, T, Hkv, q_offset, block_size, init_blocks,
                        win_blocks, W, s_ib, s_ih, s_it, s_is, s_ub, s_ut, s_cb,
                        TT: tl.constexpr, KSEL: tl.constexpr, KSEL_P: tl.constexpr, LOCAL: tl.constexpr):
    # One program per (tile, batch row * KV head): naive.tile_unions_ref for one tile, without a sort (tl.sort
    # takes seconds per program in the interpreter): each pass of the loop lists the smallest block above the last
    # one listed, with the bits of the tokens that picked it. Passes = the union's size; the picks' order is free.
    pid_t = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = pid_bk // Hkv
    kvh = pid_bk % Hkv
    i = tl.arange(0, TT * KSEL_P)  # entry i: pick i % KSEL_P of the tile's token i // KSEL_P
    tok_in_tile = i // KSEL_P
    tok = pid_t * TT + tok_in_tile
    pick = i % KSEL_P
    ok = (tok < T) & (pick < KSEL)
    blk = tl.load(idx_ptr + b * s_ib + kvh * s_ih + tok * s_it + pick * s_is, mask=ok, other=-1).to(tl.int32)
    keep = ok & (blk >= 0)
    if LOCAL:  # only the picks between the init blocks and the token's window (the rest is _local_fwd's)
        window_lo = tl.maximum((tok + q_offset) // block_size - win_blocks, init_blocks)
        keep = keep & (blk >= init_blocks) & (blk < window_lo)
    none = 2147483647  # int32 max: above every block
    blk = tl.where(keep, blk, none)
    # Summing the bits of one block's picks gives the reference's sum (their OR: a token picks a block at most
    # once); int32 sums wrap, so bit 31 (token 31 of a 32-token tile) comes out as the sign bit, as there.
    bit = tl.full([TT * KSEL_P], 1, tl.int32) << tok_in_tile
    union = pid_bk * s_ub + pid_t * s_ut
    n = tl.zeros([], tl.int32)
    cur = tl.min(blk, 0)
    while cur != none:
        member_bits = tl.sum(tl.where(blk == cur, bit, 0), 0)
        nxt = tl.min(tl.where(blk > cur, blk, none), 0)
        tl.store(blocks_ptr + union + n, cur, mask=n < W)
        tl.store(members_ptr + union + n, member_bits, mask=n < W)
        n += 1
        cur = nxt
    tl.store(count_ptr + pid_bk * s_cb + pid_t, n)
