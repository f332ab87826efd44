"""Block-sparse attention over selected K/V blocks in Triton (forward, backward, split-K decode).

One program owns one query token and one KV head: its G query heads (padded to GP >= 16 rows for tl.dot) share
the token's block list, so each selected K/V block is loaded once for all G heads — that is the whole point of
sharing the selection across the group. The block list is ascending with -1 last, so the program simply walks
its first n_valid entries. Logits are in log2 units (scale * log2 e); the saved LSE is too.
The dK/dV pass runs per (KV head, key block) over the reversed lists (the query tokens that picked the block),
in chunks that each add their partial dK/dV atomically, so a block picked by every token (init, local) is
spread over many programs instead of one.
Varlen (VARLEN, packed sequences in a batch of 1): program_id(0) is an entry of a launch table of (sequence,
index) pairs (triton_select.packed_seq); the program shifts its pointers to the sequence's first token (q, k, v
and the LSE in packed_seq_qkv, the kernel's other tensors beside it) and then runs as if that sequence were the
whole problem. The window is then per sequence: a dense one (shorter than dense_len) has a window over all its
blocks, so the dense tiles do all of its attention.
"""
import triton
import triton.language as tl

from .triton_select import group_tile, load_group_queries, merge_lse, packed_seq


@triton.jit
def packed_seq_qkv(seqs_ptr, tab_ptr, pid, q_ptr, k_ptr, v_ptr, lse_ptr, s_qt, s_kt, s_vt):
    """The varlen preamble every attention kernel shares: program pid's entry of its launch table (packed_seq)
    with q, k, v and the LSE (token stride 1) moved to the sequence's first token. Returns the index inside the
    sequence, the sequence's start, length and window blocks, then the moved q, k, v and LSE pointers."""
    idx, start, T, _, _, win = packed_seq(seqs_ptr, tab_ptr, pid)
    return idx, start, T, win, q_ptr + start * s_qt, k_ptr + start * s_kt, v_ptr + start * s_vt, lse_ptr + start


@triton.jit
def token_setup(pid_t, pid_bk, q_offset, idx_ptr, s_ib, s_ih, s_it, Hkv, GP: tl.constexpr, G: tl.constexpr,
                KSEL: tl.constexpr, KSEL_P: tl.constexpr, BS: tl.constexpr, FROM_LOCAL: tl.constexpr,
                INIT: tl.constexpr, win_blocks):
    """A per-token program: token pid_t, its G heads of KV group pid_bk as GP rows, and the picks it walks,
    [lo, hi) of its ascending block list idx_row: every valid pick, or with FROM_LOCAL only those between
    the init blocks and the local window (the dense tiles took the rest). Returns b, kvh, tok, g, row_ok, pos,
    idx_row, lo, hi."""
    b, kvh, tok, g, row_ok = group_tile(pid_t, pid_bk, pid_t + 1, Hkv, 1, GP, G)  # a tile of one token, in range
    pos = pid_t + q_offset
    idx_row = idx_ptr + b * s_ib + kvh * s_ih + pid_t * s_it
    sel = tl.load(idx_row + tl.arange(0, KSEL_P), mask=tl.arange(0, KSEL_P) < KSEL, other=-1)
    if FROM_LOCAL:
        lo = tl.sum(((sel >= 0) & (sel < INIT)).to(tl.int32), 0)
        hi = tl.sum(((sel >= 0) & (sel < tl.maximum(pos // BS - win_blocks, INIT))).to(tl.int32), 0)
    else:
        lo = tl.zeros([], tl.int32)
        hi = tl.sum((sel >= 0).to(tl.int32), 0)
    return b, kvh, tok, g, row_ok, pos, idx_row, lo, hi


@triton.jit
def forced_span(pid_t, T, q_offset, BS: tl.constexpr, TM: tl.constexpr, INIT: tl.constexpr, win_blocks):
    """Key blocks forced for some token of tile pid_t (TM tokens): step s < n_steps walks block
    s (s < n_init, the init blocks) then win_lo + s - n_init (the window), none twice. Also the tile's last position."""
    first_pos = pid_t * TM + q_offset
    last_pos = tl.minimum(pid_t * TM + TM - 1, T - 1) + q_offset
    win_lo = tl.maximum(first_pos // BS - win_blocks, INIT)
    hi = last_pos // BS + 1
    n_init = tl.minimum(INIT, hi)
    return n_init, win_lo, n_init + tl.maximum(hi - win_lo, 0), last_pos


@triton.jit
def is_forced(kb, qblk, INIT: tl.constexpr, win_blocks):
    """[rows, BS]-ready mask of key block kb being forced for query block qblk (init, own or window block)."""
    return (kb < INIT) | ((kb <= qblk) & (kb >= qblk - win_blocks))


@triton.jit
def load_kv(k_ptr, v_ptr, b, kvh, kpos, mask, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, D: tl.constexpr):
    """K and V rows kpos [BS, D] of KV head kvh (zeros where mask is off)."""
    d = tl.arange(0, D)
    k = tl.load(k_ptr + b * s_kb + kpos[:, None] * s_kt + kvh * s_kh + d[None, :], mask=mask[:, None], other=0.0)
    v = tl.load(v_ptr + b * s_vb + kpos[:, None] * s_vt + kvh * s_vh + d[None, :], mask=mask[:, None], other=0.0)
    return k, v


@triton.jit
def attend_step(q, k, v, seen, m, l, acc, qk_scale):
    """One K/V block of online softmax for query rows q: returns the new (max, sum, unnormalised output).
    A row that has seen no key yet keeps m = -inf and l = 0."""
    s = tl.where(seen, tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return m_new, l * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)


@triton.jit
def dq_step(q, do, k, v, lse, delta, seen, qk_scale):
    """dq (unscaled) of query rows q from one K/V block, with p recomputed from the saved LSE."""
    p = tl.where(seen, tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None]), 0.0)
    ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
    return tl.dot(ds.to(k.dtype), k)


@triton.jit
def dkdv_step(k, v, kpos, q_ptr, do_ptr, lse_ptr, delta_ptr, b, kvh, tok, g, ok, q_offset, qk_scale,
              s_qb, s_qt, s_qh, s_lb, s_lh, G: tl.constexpr, D: tl.constexpr, KEYS_AS_M: tl.constexpr):
    """dK (unscaled) and dV of one key block from the query rows (tok, head g; ok marks real ones), causal.
    KEYS_AS_M computes Pᵀ [BS, rows] directly (keys as the M side of every product), else P [rows, BS] and its
    transposes: the same numbers, but which one compiles faster depends on the kernel (bench --sweep)."""
    q = load_group_queries(q_ptr, b, kvh, tok, g, ok, s_qb, s_qt, s_qh, G, D)
    do = load_group_queries(do_ptr, b, kvh, tok, g, ok, s_qb, s_qt, s_qh, G, D)
    heads = kvh * G + g
    lse = tl.load(lse_ptr + b * s_lb + heads * s_lh + tok, mask=ok, other=0.0)
    delta = tl.load(delta_ptr + b * s_lb + heads * s_lh + tok, mask=ok, other=0.0)
    seen_t = ok[None, :] & (kpos[:, None] <= (tok + q_offset)[None, :])
    if KEYS_AS_M:
        p_t = tl.where(seen_t, tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :]), 0.0)
        dv = tl.dot(p_t.to(do.dtype), do)
        ds_t = p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q)
    else:
        p = tl.where(tl.trans(seen_t), tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None]), 0.0)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q)
    return dk, dv


@triton.jit
def _sparse_fwd(q_ptr, k_ptr, v_ptr, idx_ptr, oin_ptr, o_ptr, lse_ptr, Hkv, q_offset, qk_scale,
                s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ib, s_ih, s_it,
                s_os, s_ob, s_ot, s_oh, s_ls, s_lb, s_lh, seqs_ptr, tab_ptr,
                G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                KSEL: tl.constexpr, KSEL_P: tl.constexpr, SPLITS: tl.constexpr,
                FROM_LOCAL: tl.constexpr = False, INIT: tl.constexpr = 0, WIN_BLOCKS: tl.constexpr = 0,
                VARLEN: tl.constexpr = False):
    pid_t = tl.program_id(0)
    win = WIN_BLOCKS
    if VARLEN:  # o, oin: the same strides
        pid_t, start, _, win, q_ptr, k_ptr, v_ptr, lse_ptr = packed_seq_qkv(
            seqs_ptr, tab_ptr, pid_t, q_ptr, k_ptr, v_ptr, lse_ptr, s_qt, s_kt, s_vt)
        idx_ptr += start * s_it
        oin_ptr += start * s_ot
        o_ptr += start * s_ot
    b, kvh, tok, g, row_ok, pos, idx_row, lo, hi = token_setup(
        pid_t, tl.program_id(1), q_offset, idx_ptr, s_ib, s_ih, s_it, Hkv, GP, G, KSEL, KSEL_P, BS,
        FROM_LOCAL, INIT, win)
    heads = kvh * G + g
    d = tl.arange(0, D)
    q = load_group_queries(q_ptr, b, kvh, tok, g, row_ok, s_qb, s_qt, s_qh, G, D)
    per_split = tl.cdiv(hi - lo, SPLITS)  # split-K over the list (decode)
    lo = lo + tl.program_id(2) * per_split
    hi = tl.minimum(lo + per_split, hi)
    m = tl.full([GP], float("-inf"), tl.float32)
    l = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    if FROM_LOCAL:
        # _local_fwd already attended to the forced blocks and left its state in oin/lse (oin: fp32, o's
        # strides): continue from it over the picks between the init blocks and the local window
        acc = tl.load(oin_ptr + b * s_ob + tok[:, None] * s_ot + heads[:, None] * s_oh + d[None, :],
                      mask=row_ok[:, None], other=0.0).to(tl.float32)
        m = tl.load(lse_ptr + b * s_lb + heads * s_lh + tok, mask=row_ok, other=0.0)
        l = tl.where(m == float("-inf"), 0.0, 1.0)
    for i in range(lo, hi):
        blk = tl.load(idx_row + i)
        kpos = blk * BS + tl.arange(0, BS)
        seen = kpos <= pos  # only the query's own block is cut; also keeps a last, partial block inside the keys
        k, v = load_kv(k_ptr, v_ptr, b, kvh, kpos, seen, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, D)
        m, l, acc = attend_step(q, k, v, seen[None, :], m, l, acc, qk_scale)
    l_safe = tl.where(l > 0, l, 1.0)  # an empty split (decode) leaves zeros and lse = -inf
    out = acc / l_safe[:, None]
    lse = tl.where(l > 0, m + tl.log2(l_safe), float("-inf"))
    split = tl.program_id(2)
    tl.store(o_ptr + split * s_os + b * s_ob + tok[:, None] * s_ot + heads[:, None] * s_oh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + split * s_ls + b * s_lb + heads * s_lh + tok, lse, mask=row_ok)


@triton.jit
def _merge_splits(o_ptr, lse_ptr, out_ptr, lse_out_ptr, n_splits, s_os, s_ob, s_ot, s_oh, s_ls, s_lb, s_lh,
                  s_rb, s_rt, s_rh, s_mb, s_mh, H: tl.constexpr, HP: tl.constexpr, D: tl.constexpr):
    """Token program_id(0) of batch program_id(1): the split-K partial outputs (fp32, normalised each) of all H
    heads weighted by their share of the merged LSE; an empty split (lse -inf) weighs 0."""
    t = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.arange(0, HP)
    h_ok = h < H
    d = tl.arange(0, D)
    lse_ptrs = lse_ptr + b * s_lb + h * s_lh + t
    lse = merge_lse(lse_ptrs, h_ok, n_splits, s_ls)
    acc = tl.zeros([HP, D], tl.float32)
    for i in range(0, n_splits):
        weight = tl.exp2(tl.load(lse_ptrs + i * s_ls, mask=h_ok, other=float("-inf")) - lse)
        part = tl.load(o_ptr + i * s_os + b * s_ob + t * s_ot + h[:, None] * s_oh + d[None, :], mask=h_ok[:, None],
                       other=0.0)
        acc += weight[:, None] * part
    tl.store(out_ptr + b * s_rb + t * s_rt + h[:, None] * s_rh + d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=h_ok[:, None])
    tl.store(lse_out_ptr + b * s_mb + h * s_mh + t, lse, mask=h_ok)


@triton.jit
def _sparse_bwd_dq(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, idx_ptr, dqin_ptr, dq_ptr, Hkv, q_offset,
                   qk_scale, scale,
                   s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ib, s_ih, s_it, s_lb, s_lh,
                   seqs_ptr, tab_ptr,
                   G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                   KSEL: tl.constexpr, KSEL_P: tl.constexpr,
                   FROM_LOCAL: tl.constexpr = False, INIT: tl.constexpr = 0, WIN_BLOCKS: tl.constexpr = 0,
                   VARLEN: tl.constexpr = False):
    # q, do, dq and the fp32 dqin (_local_bwd_dq's unscaled sum over the forced blocks) share one layout
    # (strides s_q*); lse and delta share theirs (s_l*)
    pid_t = tl.program_id(0)
    win = WIN_BLOCKS
    if VARLEN:
        pid_t, start, _, win, q_ptr, k_ptr, v_ptr, lse_ptr = packed_seq_qkv(
            seqs_ptr, tab_ptr, pid_t, q_ptr, k_ptr, v_ptr, lse_ptr, s_qt, s_kt, s_vt)
        do_ptr += start * s_qt
        dqin_ptr += start * s_qt
        dq_ptr += start * s_qt
        idx_ptr += start * s_it
        delta_ptr += start
    b, kvh, tok, g, row_ok, pos, idx_row, lo, hi = token_setup(
        pid_t, tl.program_id(1), q_offset, idx_ptr, s_ib, s_ih, s_it, Hkv, GP, G, KSEL, KSEL_P, BS,
        FROM_LOCAL, INIT, win)
    heads = kvh * G + g
    row_off = b * s_qb + tok[:, None] * s_qt + heads[:, None] * s_qh + tl.arange(0, D)[None, :]
    q = tl.load(q_ptr + row_off, mask=row_ok[:, None], other=0.0)
    do = tl.load(do_ptr + row_off, mask=row_ok[:, None], other=0.0)
    lse = tl.load(lse_ptr + b * s_lb + heads * s_lh + tok, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + b * s_lb + heads * s_lh + tok, mask=row_ok, other=0.0)
    dq = tl.zeros([GP, D], tl.float32)
    if FROM_LOCAL:
        dq = tl.load(dqin_ptr + row_off, mask=row_ok[:, None], other=0.0)
    for i in range(lo, hi):
        blk = tl.load(idx_row + i)
        kpos = blk * BS + tl.arange(0, BS)
        seen = kpos <= pos  # also keeps the last, partial block inside the keys
        k, v = load_kv(k_ptr, v_ptr, b, kvh, kpos, seen, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, D)
        dq += dq_step(q, do, k, v, lse, delta, seen[None, :], qk_scale)
    tl.store(dq_ptr + row_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _sparse_bwd_dkdv(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                     work_bk_ptr, work_blk_ptr, work_lo_ptr, work_hi_ptr, tok_list_ptr, Hkv, Tk, q_offset, qk_scale, scale,
                     s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_lb, s_lh, seqs_ptr,
                     G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, TQ: tl.constexpr,
                     KEYS_AS_M: tl.constexpr, VARLEN: tl.constexpr = False):
    # dk/dv are fp32 accumulators with k's strides; q/do share strides; lse/delta share strides.
    # VARLEN: work_blk holds (sequence, key block in it) pairs, tok_list tokens inside the sequence
    w = tl.program_id(0)
    pid_bk = tl.load(work_bk_ptr + w)
    if VARLEN:
        blk, start, Tk, _, q_ptr, k_ptr, v_ptr, lse_ptr = packed_seq_qkv(
            seqs_ptr, work_blk_ptr, w, q_ptr, k_ptr, v_ptr, lse_ptr, s_qt, s_kt, s_vt)
        do_ptr += start * s_qt
        delta_ptr += start
        dk_ptr += start * s_kt
        dv_ptr += start * s_kt
    else:
        blk = tl.load(work_blk_ptr + w)
    lo = tl.load(work_lo_ptr + w)
    hi = tl.load(work_hi_ptr + w)
    b = pid_bk // Hkv
    kvh = pid_bk % Hkv
    d = tl.arange(0, D)
    kpos = blk * BS + tl.arange(0, BS)
    kmask = kpos < Tk
    k, v = load_kv(k_ptr, v_ptr, b, kvh, kpos, kmask, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, D)
    rows = tl.arange(0, TQ * GP)  # row = (token in chunk) * GP + head
    g = rows % GP
    dk = tl.zeros([BS, D], tl.float32)
    dv = tl.zeros([BS, D], tl.float32)
    for c in range(lo, hi, TQ):
        li = c + rows // GP
        ok = (li < hi) & (g < G)
        tok = tl.load(tok_list_ptr + li, mask=li < hi, other=0)
        dk_i, dv_i = dkdv_step(k, v, kpos, q_ptr, do_ptr, lse_ptr, delta_ptr, b, kvh, tok, g, ok, q_offset, qk_scale,
                               s_qb, s_qt, s_qh, s_lb, s_lh, G, D, KEYS_AS_M)
        dk += dk_i
        dv += dv_i
    out_off = b * s_kb + kpos[:, None] * s_kt + kvh * s_kh + d[None, :]
    tl.atomic_add(dk_ptr + out_off, dk * scale, mask=kmask[:, None])
    tl.atomic_add(dv_ptr + out_off, dv, mask=kmask[:, None])


@triton.jit
def _local_fwd(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, T, Hkv, q_offset, qk_scale,
               s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ob, s_ot, s_oh, s_lb, s_lh, seqs_ptr, tab_ptr,
               G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, TM: tl.constexpr,
               INIT: tl.constexpr, WIN_BLOCKS: tl.constexpr, VARLEN: tl.constexpr = False):
    """Attention over the forced blocks only (init blocks + the query's own block and WIN_BLOCKS before it).

    Every token of a query block has the same forced blocks, so a tile of TM consecutive tokens × GP heads
    (row = token * GP + head) streams each forced K/V block once: a dense, FlashAttention-like tile instead of
    one token's G heads. Writes the normalised fp32 partial output and its LSE; _sparse_fwd then continues
    from this state over the remaining (top-k) picks. Rows of a tile may straddle two query blocks, so a block
    counts for a row only if it is forced for that row's own block.
    """
    pid_t = tl.program_id(0)
    win = WIN_BLOCKS
    if VARLEN:
        pid_t, start, T, win, q_ptr, k_ptr, v_ptr, lse_ptr = packed_seq_qkv(
            seqs_ptr, tab_ptr, pid_t, q_ptr, k_ptr, v_ptr, lse_ptr, s_qt, s_kt, s_vt)
        o_ptr += start * s_ot
    b, kvh, tok, g, row_ok = group_tile(pid_t, tl.program_id(1), T, Hkv, TM, GP, G)
    heads = kvh * G + g
    pos = tok + q_offset
    qblk = pos // BS
    d = tl.arange(0, D)
    q = load_group_queries(q_ptr, b, kvh, tok, g, row_ok, s_qb, s_qt, s_qh, G, D)
    n_init, win_lo, n_steps, last_pos = forced_span(pid_t, T, q_offset, BS, TM, INIT, win)
    m = tl.full([TM * GP], float("-inf"), tl.float32)
    l = tl.zeros([TM * GP], tl.float32)
    acc = tl.zeros([TM * GP, D], tl.float32)
    for step in range(0, n_steps):
        kb = tl.where(step < n_init, step, win_lo + step - n_init)
        kpos = kb * BS + tl.arange(0, BS)
        in_keys = kpos <= last_pos
        k, v = load_kv(k_ptr, v_ptr, b, kvh, kpos, in_keys, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, D)
        seen = is_forced(kb, qblk, INIT, win)[:, None] & (kpos[None, :] <= pos[:, None])
        m, l, acc = attend_step(q, k, v, seen, m, l, acc, qk_scale)
    l_safe = tl.where(l > 0, l, 1.0)
    tl.store(o_ptr + b * s_ob + tok[:, None] * s_ot + heads[:, None] * s_oh + d[None, :], acc / l_safe[:, None],
             mask=row_ok[:, None])
    tl.store(lse_ptr + b * s_lb + heads * s_lh + tok, tl.where(l > 0, m + tl.log2(l_safe), float("-inf")), mask=row_ok)


@triton.jit
def _local_bwd_dq(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, T, Hkv, q_offset, qk_scale,
                  s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_lb, s_lh, seqs_ptr, tab_ptr,
                  G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, TM: tl.constexpr,
                  INIT: tl.constexpr, WIN_BLOCKS: tl.constexpr, VARLEN: tl.constexpr = False):
    """dq over the forced blocks, as dense tiles of TM tokens × GP heads like _local_fwd. q, do and the fp32
    dq (left unscaled for _sparse_bwd_dq to finish over the other picks) share strides; lse, delta share theirs."""
    pid_t = tl.program_id(0)
    win = WIN_BLOCKS
    if VARLEN:
        pid_t, start, T, win, q_ptr, k_ptr, v_ptr, lse_ptr = packed_seq_qkv(
            seqs_ptr, tab_ptr, pid_t, q_ptr, k_ptr, v_ptr, lse_ptr, s_qt, s_kt, s_vt)
        do_ptr += start * s_qt
        delta_ptr += start
        dq_ptr += start * s_qt
    b, kvh, tok, g, row_ok = group_tile(pid_t, tl.program_id(1), T, Hkv, TM, GP, G)
    heads = kvh * G + g
    pos = tok + q_offset
    qblk = pos // BS
    d = tl.arange(0, D)
    q = load_group_queries(q_ptr, b, kvh, tok, g, row_ok, s_qb, s_qt, s_qh, G, D)
    do = load_group_queries(do_ptr, b, kvh, tok, g, row_ok, s_qb, s_qt, s_qh, G, D)
    lse = tl.load(lse_ptr + b * s_lb + heads * s_lh + tok, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + b * s_lb + heads * s_lh + tok, mask=row_ok, other=0.0)
    n_init, win_lo, n_steps, last_pos = forced_span(pid_t, T, q_offset, BS, TM, INIT, win)
    dq = tl.zeros([TM * GP, D], tl.float32)
    for step in range(0, n_steps):
        kb = tl.where(step < n_init, step, win_lo + step - n_init)
        kpos = kb * BS + tl.arange(0, BS)
        in_keys = kpos <= last_pos
        k, v = load_kv(k_ptr, v_ptr, b, kvh, kpos, in_keys, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, D)
        seen = is_forced(kb, qblk, INIT, win)[:, None] & (kpos[None, :] <= pos[:, None])
        dq += dq_step(q, do, k, v, lse, delta, seen, qk_scale)
    tl.store(dq_ptr + b * s_qb + tok[:, None] * s_qt + heads[:, None] * s_qh + d[None, :], dq, mask=row_ok[:, None])


@triton.jit
def _local_bwd_dkdv(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, T, Tk, Hkv, q_offset,
                    qk_scale, scale,
                    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_lb, s_lh, seqs_ptr, tab_ptr,
                    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, TQ: tl.constexpr,
                    INIT: tl.constexpr, WIN_BLOCKS: tl.constexpr, KEYS_AS_M: tl.constexpr,
                    VARLEN: tl.constexpr = False):
    """dK/dV of key block INIT + program_id(0) from the queries whose local window holds it: the tokens of
    query blocks kb .. kb + WIN_BLOCKS, a contiguous range walked in tiles of TQ tokens × GP heads. Stores
    into the fp32 dk/dv (k's strides): it runs first, the per-token picks are added atomically after it; the
    init blocks are left to those. VARLEN: the table's index is the key block's number after INIT."""
    kb = INIT + tl.program_id(0)
    win = WIN_BLOCKS
    if VARLEN:
        kb, start, T, win, q_ptr, k_ptr, v_ptr, lse_ptr = packed_seq_qkv(
            seqs_ptr, tab_ptr, tl.program_id(0), q_ptr, k_ptr, v_ptr, lse_ptr, s_qt, s_kt, s_vt)
        kb += INIT
        Tk = T
        do_ptr += start * s_qt
        delta_ptr += start
        dk_ptr += start * s_kt
        dv_ptr += start * s_kt
    pid_bk = tl.program_id(1)
    b = pid_bk // Hkv
    kvh = pid_bk % Hkv
    d = tl.arange(0, D)
    kpos = kb * BS + tl.arange(0, BS)
    kmask = kpos < Tk
    k, v = load_kv(k_ptr, v_ptr, b, kvh, kpos, kmask, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, D)
    rows = tl.arange(0, TQ * GP)  # row = (token in tile) * GP + head
    g = rows % GP
    t_lo = tl.maximum(kb * BS - q_offset, 0)
    t_hi = tl.minimum((kb + win + 1) * BS - q_offset, T)
    dk = tl.zeros([BS, D], tl.float32)
    dv = tl.zeros([BS, D], tl.float32)
    for t0 in range(t_lo, t_hi, TQ):
        tok = t0 + rows // GP
        ok = (tok < t_hi) & (g < G)
        dk_i, dv_i = dkdv_step(k, v, kpos, q_ptr, do_ptr, lse_ptr, delta_ptr, b, kvh, tok, g, ok, q_offset, qk_scale,
                               s_qb, s_qt, s_qh, s_lb, s_lh, G, D, KEYS_AS_M)
        dk += dk_i
        dv += dv_i
    out_off = b * s_kb + kpos[:, None] * s_kt + kvh * s_kh + d[None, :]
    tl.store(dk_ptr + out_off, dk * scale, mask=kmask[:, None])
    tl.store(dv_ptr + out_off, dv, mask=kmask[:, None])
