"""Stage 1 of InfLLM-V2 in Triton: kernel scoring summed over the query group, pooled straight onto blocks.

Pass 1 (`_kernel_lse`): per query head and token, the log-sum-exp of q·kc*scale over the visible kernels.
Pass 2 (`_block_scores`): for each block, recompute the logits of the pool_window kernels that pool onto it,
turn them into probabilities with the pass-1 LSE, sum the G heads of the group in registers and keep the
max over the window. Per-head or per-kernel scores never reach memory: only [B, Hkv, T, n_blocks] block scores,
with the forced blocks already at +inf and the future ones at -inf, ready for top-k.
A tile holds BLOCK_T tokens × GP heads as rows (row = token * GP + head), so the group sum is a reshape + sum.
Logits are kept in log2 units (scale * log2 e) so exp2 can be used.
"""
import triton
import triton.language as tl

# varlen: a row of the sequence table: start, length, first kernel, first block score, window blocks (a constexpr:
# compiled Triton reads no plain global, the interpreter does, so only a GPU run caught it)
SEQ_COLS = tl.constexpr(5)


@triton.jit
def packed_seq(seqs_ptr, tab_ptr, pid):
    """Varlen (packed sequences, batch of 1): program pid's entry of its launch table of (sequence, index) pairs:
    its index inside the sequence (tile, token or key block), then the sequence's start, length, first compressed
    kernel, first block score and window blocks (a dense sequence's window spans all its blocks)."""
    row = seqs_ptr + tl.load(tab_ptr + 2 * pid) * SEQ_COLS
    return (tl.load(tab_ptr + 2 * pid + 1), tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3),
            tl.load(row + 4))


@triton.jit
def n_kernels(T, KSIZE: tl.constexpr, KSTRIDE: tl.constexpr):
    """Kernels (of KSIZE keys, KSTRIDE apart) that exist after T keys: full ones only (config.n_kernels)."""
    return tl.maximum(T - KSIZE + KSTRIDE, 0) // KSTRIDE


@triton.jit
def group_tile(pid_t, pid_bk, T, Hkv, BLOCK_T: tl.constexpr, GP: tl.constexpr, G: tl.constexpr):
    """The rows of tile pid_t: BLOCK_T consecutive tokens × GP heads of KV group pid_bk = b * Hkv + kvh
    (row = token * GP + head). Returns b, kvh, tok, g (head in the group), row_ok."""
    rows = tl.arange(0, BLOCK_T * GP)
    tok = pid_t * BLOCK_T + rows // GP
    g = rows % GP
    return pid_bk // Hkv, pid_bk % Hkv, tok, g, (tok < T) & (g < G)


@triton.jit
def load_group_queries(q_ptr, b, kvh, tok, g, row_ok, s_qb, s_qt, s_qh,
                        G: tl.constexpr, D: tl.constexpr):
    d = tl.arange(0, D)
    ptrs = q_ptr + b * s_qb + tok[:, None] * s_qt + (kvh * G + g)[:, None] * s_qh + d[None, :]
    return tl.load(ptrs, mask=row_ok[:, None], other=0.0)


@triton.jit
def _kernel_lse(q_ptr, kc_ptr, lse_ptr, T, N, Hkv, q_offset, qk_scale,
                s_qb, s_qt, s_qh, s_kb, s_kn, s_kh, s_ls, s_lb, s_lh, seqs_ptr, tab_ptr,
                G: tl.constexpr, GP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                D: tl.constexpr, KSIZE: tl.constexpr, KSTRIDE: tl.constexpr, VARLEN: tl.constexpr = False):
    """Split program_id(2) of num_programs(2) takes one share of the visible kernels and writes its partial
    LSE at lse_ptr + split * s_ls (decode: a handful of tokens, thousands of kernels, so split the kernels).
    VARLEN: program_id(0) is an entry of the tile table; the tile's sequence is then the whole problem."""
    pid_t = tl.program_id(0)
    if VARLEN:
        pid_t, start, T, kc0, _, _ = packed_seq(seqs_ptr, tab_ptr, pid_t)
        N = n_kernels(T, KSIZE, KSTRIDE)
        q_ptr += start * s_qt
        kc_ptr += kc0 * s_kn
        lse_ptr += start
    split = tl.program_id(2)
    b, kvh, tok, g, row_ok = group_tile(pid_t, tl.program_id(1), T, Hkv, BLOCK_T, GP, G)
    pos = tok + q_offset
    q = load_group_queries(q_ptr, b, kvh, tok, g, row_ok, s_qb, s_qt, s_qh, G, D)
    d = tl.arange(0, D)
    # kernels visible to the tile's last token; kernel j is visible at position p iff j*KSTRIDE + KSIZE - 1 <= p
    last_pos = tl.minimum(pid_t * BLOCK_T + BLOCK_T - 1, T - 1) + q_offset
    n_vis = tl.minimum(tl.maximum(last_pos - KSIZE + 1 + KSTRIDE, 0) // KSTRIDE, N)
    per_split = tl.cdiv(tl.cdiv(n_vis, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    m = tl.full([BLOCK_T * GP], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_T * GP], tl.float32)
    for n0 in range(split * per_split, tl.minimum(split * per_split + per_split, n_vis), BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        kc = tl.load(kc_ptr + b * s_kb + n[:, None] * s_kn + kvh * s_kh + d[None, :], mask=(n < N)[:, None], other=0.0)
        s = tl.dot(q, tl.trans(kc)) * qk_scale
        visible = (n < N)[None, :] & ((n * KSTRIDE + KSIZE - 1)[None, :] <= pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees nothing yet stays at l = 0
        l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m = m_new
    lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
    tl.store(lse_ptr + split * s_ls + b * s_lb + (kvh * G + g) * s_lh + tok, lse, mask=row_ok)


@triton.jit
def merge_lse(ptrs, mask, n_splits, s_split):
    """The LSE (log2 units) of the n_splits partial LSEs at ptrs + i * s_split (-inf: an empty split)."""
    m = tl.load(ptrs, mask=mask, other=0.0)
    for i in range(1, n_splits):
        m = tl.maximum(m, tl.load(ptrs + i * s_split, mask=mask, other=0.0))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros_like(m)
    for i in range(0, n_splits):
        total += tl.exp2(tl.load(ptrs + i * s_split, mask=mask, other=0.0) - m_safe)
    return tl.where(total > 0, m_safe + tl.log2(tl.where(total > 0, total, 1.0)), float("-inf"))


@triton.jit
def _block_scores(q_ptr, kc_ptr, lse_ptr, out_ptr, T, N, Hkv, NBLK, q_offset, qk_scale, LSE_SPLITS,
                  s_qb, s_qt, s_qh, s_kb, s_kn, s_kh, s_ls, s_lb, s_lh, s_ob, s_oh, s_ot, seqs_ptr, tab_ptr,
                  G: tl.constexpr, GP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_B: tl.constexpr,
                  D: tl.constexpr, KSIZE: tl.constexpr, KSTRIDE: tl.constexpr, BS: tl.constexpr,
                  POOL_W: tl.constexpr, POOL_S: tl.constexpr, POOL_P: tl.constexpr, CONTIG_W: tl.constexpr,
                  INIT: tl.constexpr, WIN_BLOCKS: tl.constexpr, VARLEN: tl.constexpr = False):
    """One tile of tokens walks every block, BLOCK_B at a time. Block i pools kernels i*POOL_S - POOL_P + w,
    w < POOL_W: the first CONTIG_W offsets of all BLOCK_B blocks are one contiguous run of kernels (one wide
    product; POOL_S a power of two), the remaining offsets are strided runs of BLOCK_B kernels each.
    VARLEN: program_id(0) is an entry of the tile table (ordered longest rows first); the sequence's scores
    are a [Hkv, T, NBLK] block at its offset in the flat out."""
    pid_t = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest rows first: less of a tail
    if VARLEN:
        pid_t, start, T, kc0, out0, _ = packed_seq(seqs_ptr, tab_ptr, tl.program_id(0))
        N = n_kernels(T, KSIZE, KSTRIDE)
        NBLK = tl.cdiv(T, BS)
        s_ot = NBLK
        s_oh = T * NBLK
        q_ptr += start * s_qt
        kc_ptr += kc0 * s_kn
        lse_ptr += start
        out_ptr += out0
    b, kvh, tok_r, g, row_ok = group_tile(pid_t, tl.program_id(1), T, Hkv, BLOCK_T, GP, G)
    pos_r = tok_r + q_offset
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    qblk = (tok + q_offset) // BS
    q = load_group_queries(q_ptr, b, kvh, tok_r, g, row_ok, s_qb, s_qt, s_qh, G, D)
    lse = merge_lse(lse_ptr + b * s_lb + (kvh * G + g) * s_lh + tok_r, row_ok, LSE_SPLITS, s_ls)
    # Blocks from the local window of the tile's last token on are forced or future for every token: no scoring.
    n_scored = (tl.minimum(pid_t * BLOCK_T + BLOCK_T - 1, T - 1) + q_offset) // BS - WIN_BLOCKS
    for b0 in range(0, NBLK, BLOCK_B):
        blk = b0 + tl.arange(0, BLOCK_B)
        best = tl.zeros([BLOCK_T, BLOCK_B], tl.float32)
        if b0 < n_scored:
            if CONTIG_W > 0:
                j = b0 * POOL_S - POOL_P + tl.arange(0, BLOCK_B * POOL_S)
                p = _kernel_probs(q, kc_ptr, j, b, kvh, pos_r, row_ok, lse, N, qk_scale, s_kb, s_kn, s_kh, D,
                                  KSIZE, KSTRIDE)
                group_p = tl.reshape(tl.sum(tl.reshape(p, [BLOCK_T, GP, BLOCK_B * POOL_S]), 1),
                                     [BLOCK_T, BLOCK_B, POOL_S])
                in_window = (tl.arange(0, POOL_S) < CONTIG_W)[None, None, :]
                best = tl.max(tl.where(in_window, group_p, 0.0), 2)
            for w in tl.static_range(CONTIG_W, POOL_W):
                p = _kernel_probs(q, kc_ptr, blk * POOL_S - POOL_P + w, b, kvh, pos_r, row_ok, lse, N, qk_scale,
                                  s_kb, s_kn, s_kh, D, KSIZE, KSTRIDE)
                best = tl.maximum(best, tl.sum(tl.reshape(p, [BLOCK_T, GP, BLOCK_B]), 1))
        forced = (blk[None, :] < INIT) | ((blk[None, :] <= qblk[:, None]) & (blk[None, :] >= qblk[:, None] - WIN_BLOCKS))
        best = tl.where(forced, float("inf"), best)
        best = tl.where(blk[None, :] > qblk[:, None], float("-inf"), best)
        ptrs = out_ptr + b * s_ob + kvh * s_oh + tok[:, None] * s_ot + blk[None, :]
        tl.store(ptrs, best, mask=(tok < T)[:, None] & (blk < NBLK)[None, :])


@triton.jit
def _kernel_probs(q, kc_ptr, j, b, kvh, pos_r, row_ok, lse, N, qk_scale, s_kb, s_kn, s_kh,
                  D: tl.constexpr, KSIZE: tl.constexpr, KSTRIDE: tl.constexpr):
    """[rows, len(j)] softmax probabilities of kernels j for the tile's rows (0 where a kernel is unseen)."""
    d = tl.arange(0, D)
    j_ok = (j >= 0) & (j < N)
    kc = tl.load(kc_ptr + b * s_kb + j[:, None] * s_kn + kvh * s_kh + d[None, :], mask=j_ok[:, None], other=0.0)
    s = tl.dot(q, tl.trans(kc)) * qk_scale
    visible = row_ok[:, None] & j_ok[None, :] & ((j * KSTRIDE + KSIZE - 1)[None, :] <= pos_r[:, None])
    return tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)


@triton.jit
def _topk_blocks(scores_ptr, idx_ptr, NBLK, s_row, s_irow, seqs_ptr, tab_ptr, s_ih, dense_len,
                 K: tl.constexpr, K_P: tl.constexpr, NB_P: tl.constexpr, VARLEN: tl.constexpr = False,
                 BS: tl.constexpr = 1, INIT: tl.constexpr = 0):
    """One row of block scores -> its K best block indices, ascending, -1 last (same picks as naive.topk_blocks).

    Scores are >= 0 or ±inf, so their float bits order like the floats: bisect the int32 bits for the K-th
    largest value, take everything above it, and among the blocks tied at it the latest ones (ties go to the
    block nearer the query). Taken blocks are written in index order, so no sort is needed.
    VARLEN: program (token-table entry, KV head program_id(1)); a token of a sequence shorter than dense_len has
    no scores and takes its init blocks only (the dense tiles attend to the rest).
    """
    row = tl.program_id(0)
    b = tl.arange(0, NB_P)
    steps = 31  # of the bisection
    if VARLEN:
        tok, start, T, _, scores0, _ = packed_seq(seqs_ptr, tab_ptr, row)
        NBLK = tl.where(T >= dense_len, tl.cdiv(T, BS), 0)
        scores_ptr += scores0 + tl.program_id(1) * T * NBLK + tok * NBLK
        idx_ptr += tl.program_id(1) * s_ih + (start + tok) * s_irow
        x = tl.load(scores_ptr + b, mask=b < NBLK, other=float("-inf"))
        x = tl.where((T < dense_len) & (b < INIT) & (b <= tok // BS), float("inf"), x)
        steps = tl.where(T < dense_len, 0, steps)  # only +inf and -inf: lo = 0 takes the +inf ones
        row = 0
    else:
        x = tl.load(scores_ptr + row * s_row + b, mask=b < NBLK, other=float("-inf"))
    bits = tl.where(x == float("-inf"), -1, x.to(tl.int32, bitcast=True))  # future / missing blocks: never taken
    k = tl.minimum(tl.sum((bits >= 0).to(tl.int32), 0), K)
    lo = tl.zeros([], tl.int32)  # invariant: count(bits >= lo) >= k
    hi = tl.full([], 0x7F800000, tl.int32)  # bits of +inf, the largest score
    for _ in range(steps):
        mid = lo + (hi - lo + 1) // 2
        enough = tl.sum((bits >= mid).to(tl.int32), 0) >= k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    above = bits > lo
    tie = (bits == lo).to(tl.int32)
    ties_from_here = tl.sum(tie, 0) - tl.cumsum(tie, 0) + tie  # ties at this block or later
    take = above | ((tie > 0) & (ties_from_here <= k - tl.sum(above.to(tl.int32), 0)))
    slot = tl.cumsum(take.to(tl.int32), 0) - 1
    tl.store(idx_ptr + row * s_irow + slot, b, mask=take)
    j = tl.arange(0, K_P)
    tl.store(idx_ptr + row * s_irow + j, tl.full([K_P], -1, tl.int32), mask=(j >= k) & (j < K))
