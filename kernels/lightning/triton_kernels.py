"""Triton kernels for causal Lightning Attention, organised around *segments*.

A segment is a run of consecutive tokens of one sequence (a multiple of the chunk C, the last one shorter).
Every kernel that walks tokens gets one program per (segment, head, tile), so that a single long sequence
still fills the GPU. Per head the decay λ = exp(g) is a scalar, so the state recurrence between segments is a
plain linear scan over a few D×D matrices:

  forward   1. `segment_sum`  (k, v)   U_s = Σ_j λ^(L_s-1-j) k_jᵀ v_j            local state of each segment
            2. `state_scan`           S_start(s) = scan(h0, λ^L_s, U_s), final state
            3. `chunk_output` (q,k,v) o; walks the chunks of a segment from S_start(s), transposed (oᵀ, Sᵀ)
  backward  1. `segment_sum`  (q, do) Δ_s = scale Σ_i λ^(i+1) q_iᵀ do_i               local state gradient
            2. `state_scan` reversed  dS_end(s) = scan(dht, λ^L_s, Δ_s), dh0
            3. `chunk_output` (do,v,k) dq: the forward's walk with the inputs' roles swapped
            4. `chunk_dkdv`   walks chunks backwards from dS_end(s): dk from (q, do, v), dv from (do, q, k)
Inside a chunk the masked C×C product is used; tokens i, j are local to the chunk:
  o = scale [(q kᵀ) ⊙ M] v + scale diag(λ^(i+1)) q S,   M_ij = λ^(i-j) (i >= j)
  S ← λ^n S + (diag(λ^(n-1-j)) k)ᵀ v
Masked exponents are replaced by -inf *before* exp: with g <= 0, exp(g·(negative)) could overflow.

Layout: q, k, v, o are packed tokens [NT, H, D] (B·T tokens for equal lengths). States are [*, H, D, D] fp32
with the key index first (S = kᵀ v). D need not be a power of two (loads are masked to DP = next pow2).
"""
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs: exact fp32 products (no tf32); bf16/fp16 inputs: tensor cores, fp32 accumulation
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _dot_acc(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc=acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc=acc)


@triton.jit
def _load_rows(ptr, row_off, valid, cols, D: tl.constexpr):
    """Tile [len(row_off), len(cols)] of a packed [NT, H, D] tensor; row_off already holds token*H*D + h*D."""
    return tl.load(ptr + row_off[:, None] + cols[None, :], mask=valid[:, None] & (cols[None, :] < D), other=0.0)


@triton.jit
def _state_tile_ptrs(base, slot, h, rk, rv, H: tl.constexpr, D: tl.constexpr):
    off = (slot.to(tl.int64) * H + h) * (D * D)
    return base + off + rk[:, None] * D + rv[None, :], (rk[:, None] < D) & (rv[None, :] < D)


@triton.jit
def _chunk_decays(rc, g, scale, TRANSPOSED: tl.constexpr):
    """scale·M (M_ij = λ^(i-j) for i >= j, else 0; Mᵀ if TRANSPOSED) and scale·λ^(i+1) for the chunk's tokens."""
    if TRANSPOSED:
        diff = (rc[None, :] - rc[:, None]).to(tl.float32)
    else:
        diff = (rc[:, None] - rc[None, :]).to(tl.float32)
    intra = tl.exp(tl.where(diff >= 0, g * diff, float("-inf"))) * scale
    return intra, tl.exp(g * (rc + 1).to(tl.float32)) * scale


@triton.jit
def _load_state_rows(base, slot, h, rows, cols, H: tl.constexpr, D: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Tile [rows, cols] of the D×D state of (slot, h), or of its transpose."""
    state = base + (slot.to(tl.int64) * H + h) * (D * D)
    if TRANSPOSED:
        ptrs = state + cols[None, :] * D + rows[:, None]
    else:
        ptrs = state + rows[:, None] * D + cols[None, :]
    return tl.load(ptrs, mask=(rows[:, None] < D) & (cols[None, :] < D), other=0.0)


@triton.jit
def segment_sum_kernel(a_ptr, b_ptr, g_ptr, seg_start_ptr, seg_len_ptr, out_ptr, alpha,
                       H: tl.constexpr, D: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       FROM_END: tl.constexpr, IEEE: tl.constexpr):
    """out[s, h] = alpha Σ_t w_t a_tᵀ b_t over the segment; w_t = λ^(L-1-t) (FROM_END) or λ^(t+1)."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    NV: tl.constexpr = triton.cdiv(D, BV)
    rk = (tl.program_id(2) // NV) * BK + tl.arange(0, BK)
    rv = (tl.program_id(2) % NV) * BV + tl.arange(0, BV)
    rc = tl.arange(0, C)
    t0 = tl.load(seg_start_ptr + s)
    L = tl.load(seg_len_ptr + s)
    g = tl.load(g_ptr + h)
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    for c0 in range(0, L, C):
        tok = c0 + rc
        valid = tok < L
        row = (t0 + tok).to(tl.int64) * (H * D) + h * D
        a = _load_rows(a_ptr, row, valid, rk, D)
        b = _load_rows(b_ptr, row, valid, rv, D)
        if FROM_END:
            expo = (L - 1 - tok).to(tl.float32)
        else:
            expo = (tok + 1).to(tl.float32)
        w = tl.exp(tl.where(valid, g * expo, float("-inf")))
        acc += _dot(tl.trans((a * w[:, None]).to(a.dtype)), b, IEEE)
    ptrs, mask = _state_tile_ptrs(out_ptr, s, h, rk, rv, H, D)
    tl.store(ptrs, acc * alpha, mask=mask)


@triton.jit
def state_scan_kernel(buf_ptr, g_ptr, seg_len_ptr, seg_ptr_ptr, init_ptr, final_ptr,
                      H: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                      HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, REVERSE: tl.constexpr):
    """Per sequence n and head h, over its segments in order (or reversed):
    X ← init; for each segment s: buf[s] ← X (the state entering s), X ← λ^(L_s) X + buf[s] (old value).
    Forward: buf holds U_s in, S_start(s) out. Reverse: Δ_s in, dS_end(s) out. Elementwise, so any tiling."""
    n = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D * D
    head_off = (n.to(tl.int64) * H + h) * (D * D)
    if HAS_INIT:
        x = tl.load(init_ptr + head_off + offs, mask=mask, other=0.0)
    else:
        x = tl.zeros([BLOCK], dtype=tl.float32)
    g = tl.load(g_ptr + h)
    first = tl.load(seg_ptr_ptr + n)
    count = tl.load(seg_ptr_ptr + n + 1) - first
    for i in range(0, count):
        if REVERSE:
            s = first + count - 1 - i
        else:
            s = first + i
        ptr = buf_ptr + (s.to(tl.int64) * H + h) * (D * D) + offs
        local = tl.load(ptr, mask=mask, other=0.0)
        tl.store(ptr, x, mask=mask)
        x = tl.exp(g * tl.load(seg_len_ptr + s).to(tl.float32)) * x + local
    if STORE_FINAL:
        tl.store(final_ptr + head_off + offs, x, mask=mask)


@triton.jit
def chunk_output_kernel(a_ptr, b_ptr, c_ptr, out_ptr, g_ptr, seg_start_ptr, seg_len_ptr, state_ptr, scale,
                        H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, C: tl.constexpr, BA: tl.constexpr,
                        STATE_T: tl.constexpr, IEEE: tl.constexpr):
    """o (forward) or dq (backward): the same forward walk with the roles of the inputs swapped.

    Walking a segment's chunks forwards and carrying X = rows ra of Sᵀ (o, STATE_T) or of S (dq):
      outᵀ[ra] = X aᵀ diag(scale λ^(i+1)) + c[:, ra]ᵀ (b aᵀ ⊙ Mᵀ)      Mᵀ_ji = scale λ^(i-j), i >= j
      X ← λ^n X + c[:, ra]ᵀ diag(λ^(n-1-j)) b
    o: a = q, b = k, c = v, X = Sᵀ[rv, :];   dq: a = do, b = v, c = k, X = S[rk, :].
    Computing outᵀ rather than out lets the state product take X straight from registers (on Hopper the
    right operand of a tensor-core product must sit in shared memory, the left need not) and gives the
    products 128 rows (both warpgroups busy at 8 warps) where out = a Xᵀ would have the chunk's 64; on an
    H100 this made the forward's output kernel 1.5x faster (docs/kernels-lightning.md)."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    ra = tl.program_id(2) * BA + tl.arange(0, BA)
    rf = tl.arange(0, DP)
    rc = tl.arange(0, C)
    t0 = tl.load(seg_start_ptr + s)
    L = tl.load(seg_len_ptr + s)
    g = tl.load(g_ptr + h)
    X = _load_state_rows(state_ptr, s, h, ra, rf, H, D, STATE_T)
    intra_T, q_decay = _chunk_decays(rc, g, scale, TRANSPOSED=True)
    for c0 in range(0, L, C):
        tok = c0 + rc
        valid = tok < L
        n = tl.minimum(L - c0, C)
        row = (t0 + tok).to(tl.int64) * (H * D) + h * D
        a = _load_rows(a_ptr, row, valid, rf, D)
        b = _load_rows(b_ptr, row, valid, rf, D)
        c = _load_rows(c_ptr, row, valid, ra, D)
        outT = _dot(X.to(a.dtype), tl.trans(a), IEEE) * q_decay[None, :]
        PT = _dot(b, tl.trans(a), IEEE) * intra_T
        outT = _dot_acc(tl.trans(c), PT.to(c.dtype), outT, IEEE)
        tl.store(out_ptr + row[None, :] + ra[:, None], outT.to(out_ptr.dtype.element_ty),
                 mask=valid[None, :] & (ra[:, None] < D))
        b_decay = tl.exp(tl.where(valid, g * (n - 1 - rc).to(tl.float32), float("-inf")))
        X = _dot_acc(tl.trans(c), (b * b_decay[:, None]).to(b.dtype), X * tl.exp(g * n.to(tl.float32)), IEEE)


@triton.jit
def chunk_dkdv_kernel(a_ptr, b_ptr, c_ptr, out_ptr, g_ptr, seg_start_ptr, seg_len_ptr, dstate_ptr, scale,
                      H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, C: tl.constexpr, BA: tl.constexpr,
                      STATE_T: tl.constexpr, IEEE: tl.constexpr):
    """dk or dv: one kernel, because the two are the same computation with the roles of the inputs swapped.

    Walking a segment's chunks backwards and carrying X = rows ra of dS (dk) or of dSᵀ (dv, STATE_T):
      outᵀ[ra] = a[:, ra]ᵀ (b cᵀ ⊙ M) + X (diag(λ^(n-1-j)) c)ᵀ      M_ij = scale λ^(i-j), i >= j
      X ← λ^n X + scale a[:, ra]ᵀ diag(λ^(i+1)) b
    dk: a = q, b = do, c = v, X = dS[rk, :];   dv: a = do, b = q, c = k, X = dSᵀ[rv, :].
    Transposed products keep X as a left operand straight from registers (see chunk_output_kernel); a fused
    dk+dv program needed both dS and dSᵀ and spilled, two launches were faster on an H100."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    ra = tl.program_id(2) * BA + tl.arange(0, BA)
    rf = tl.arange(0, DP)
    rc = tl.arange(0, C)
    t0 = tl.load(seg_start_ptr + s)
    L = tl.load(seg_len_ptr + s)
    g = tl.load(g_ptr + h)
    X = _load_state_rows(dstate_ptr, s, h, ra, rf, H, D, STATE_T)
    intra, q_decay = _chunk_decays(rc, g, scale, TRANSPOSED=False)
    num_chunks = tl.cdiv(L, C)
    for ci in range(0, num_chunks):
        c0 = (num_chunks - 1 - ci) * C
        tok = c0 + rc
        valid = tok < L
        n = tl.minimum(L - c0, C)
        row = (t0 + tok).to(tl.int64) * (H * D) + h * D
        a = _load_rows(a_ptr, row, valid, ra, D)
        b = _load_rows(b_ptr, row, valid, rf, D)
        c = _load_rows(c_ptr, row, valid, rf, D)
        c_decay = tl.exp(tl.where(valid, g * (n - 1 - rc).to(tl.float32), float("-inf")))
        P = _dot(b, tl.trans(c), IEEE) * intra
        outT = _dot(tl.trans(a), P.to(a.dtype), IEEE)
        outT = _dot_acc(X.to(c.dtype), tl.trans((c * c_decay[:, None]).to(c.dtype)), outT, IEEE)
        tl.store(out_ptr + row[None, :] + ra[:, None], outT.to(out_ptr.dtype.element_ty),
                 mask=valid[None, :] & (ra[:, None] < D))
        X = _dot_acc(tl.trans(a), (b * q_decay[:, None]).to(b.dtype), X * tl.exp(g * n.to(tl.float32)), IEEE)


@triton.jit
def decode_kernel(q_ptr, k_ptr, v_ptr, g_ptr, state_ptr, o_ptr, new_state_ptr, scale,
                  H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BV: tl.constexpr):
    """One token for one (batch, head) and BV value columns: S ← λ S + kᵀ v ; o = scale q S."""
    bh = tl.program_id(0)
    rk = tl.arange(0, DP)
    rv = tl.program_id(1) * BV + tl.arange(0, BV)
    mk = rk < D
    mv = rv < D
    q = tl.load(q_ptr + bh * D + rk, mask=mk, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + bh * D + rk, mask=mk, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + bh * D + rv, mask=mv, other=0.0).to(tl.float32)
    off = bh.to(tl.int64) * (D * D) + rk[:, None] * D + rv[None, :]
    m2 = mk[:, None] & mv[None, :]
    S = tl.load(state_ptr + off, mask=m2, other=0.0)
    S = tl.exp(tl.load(g_ptr + bh % H)) * S + k[:, None] * v[None, :]
    tl.store(new_state_ptr + off, S, mask=m2)
    o = tl.sum(q[:, None] * S, axis=0) * scale
    tl.store(o_ptr + bh * D + rv, o.to(o_ptr.dtype.element_ty), mask=mv)
