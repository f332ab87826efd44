"""Triton kernels for causal Lightning Attention, organised around *segments*.

A segment is a run of consecutive tokens of one sequence (a multiple of the chunk C, the last one shorter).
Every kernel that walks tokens gets one program per (segment, head, tile), so that a single long sequence
still fills the GPU. Per head the decay λ = exp(g) is a scalar, so the state recurrence between segments is a
plain linear scan over a few D×D matrices:

  forward   1. `segment_sum`  (k, v)   U_s = Σ_j λ^(L_s-1-j) k_jᵀ v_j            local state of each segment
            2. `state_scan`           S_start(s) = scan(h0, λ^L_s, U_s), final state
            3. `chunk_forward` (q,k,v) o; walks the chunks of a segment from S_start(s)
  backward  1. `segment_sum`  (q, do) Δ_s = scale Σ_i λ^(i+1) q_iᵀ do_i               local state gradient
            2. `state_scan` reversed  dS_end(s) = scan(dht, λ^L_s, Δ_s), dh0
            3. `chunk_dq`     (do,v,k) walks chunks forwards from S_start(s)
            4. `chunk_dkdv`   (q,k,v,do) walks chunks backwards from dS_end(s)
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
def _load_rows(ptr, row_off, valid, cols, D: tl.constexpr):
    """Tile [len(row_off), len(cols)] of a packed [NT, H, D] tensor; row_off already holds token*H*D + h*D."""
    return tl.load(ptr + row_off[:, None] + cols[None, :], mask=valid[:, None] & (cols[None, :] < D), other=0.0)


@triton.jit
def _state_tile_ptrs(base, slot, h, rk, rv, H: tl.constexpr, D: tl.constexpr):
    off = (slot.to(tl.int64) * H + h) * (D * D)
    return base + off + rk[:, None] * D + rv[None, :], (rk[:, None] < D) & (rv[None, :] < D)


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
def chunk_forward_kernel(q_ptr, k_ptr, v_ptr, o_ptr, g_ptr, seg_start_ptr, seg_len_ptr, state_ptr, scale,
                         H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
                         IEEE: tl.constexpr):
    """o for one segment and one block of BV value columns; the state tile is [DP, BV] in registers."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    rk = tl.arange(0, DP)
    rv = tl.program_id(2) * BV + tl.arange(0, BV)
    rc = tl.arange(0, C)
    t0 = tl.load(seg_start_ptr + s)
    L = tl.load(seg_len_ptr + s)
    g = tl.load(g_ptr + h)
    ptrs, mask = _state_tile_ptrs(state_ptr, s, h, rk, rv, H, D)
    S = tl.load(ptrs, mask=mask, other=0.0)
    diff = (rc[:, None] - rc[None, :]).to(tl.float32)
    intra_decay = tl.exp(tl.where(diff >= 0, g * diff, float("-inf")))
    q_decay = tl.exp(g * (rc + 1).to(tl.float32))
    for c0 in range(0, L, C):
        tok = c0 + rc
        valid = tok < L
        n = tl.minimum(L - c0, C)
        row = (t0 + tok).to(tl.int64) * (H * D) + h * D
        q = _load_rows(q_ptr, row, valid, rk, D)
        k = _load_rows(k_ptr, row, valid, rk, D)
        v = _load_rows(v_ptr, row, valid, rv, D)
        scores = _dot(q, tl.trans(k), IEEE) * intra_decay
        o = _dot(scores.to(v.dtype), v, IEEE)
        o += _dot((q * q_decay[:, None]).to(q.dtype), S.to(q.dtype), IEEE)
        tl.store(o_ptr + row[:, None] + rv[None, :], (o * scale).to(o_ptr.dtype.element_ty),
                 mask=valid[:, None] & (rv[None, :] < D))
        k_decay = tl.exp(tl.where(valid, g * (n - 1 - rc).to(tl.float32), float("-inf")))
        S = tl.exp(g * n.to(tl.float32)) * S + _dot(tl.trans((k * k_decay[:, None]).to(k.dtype)), v, IEEE)


@triton.jit
def chunk_dq_kernel(do_ptr, k_ptr, v_ptr, dq_ptr, g_ptr, seg_start_ptr, seg_len_ptr, state_ptr, scale,
                    H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                    IEEE: tl.constexpr):
    """dq = scale [(do vᵀ) ⊙ M] k + scale diag(λ^(i+1)) do Sᵀ for key columns rk; state tile [BK, DP]."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    rk = tl.program_id(2) * BK + tl.arange(0, BK)
    rv = tl.arange(0, DP)
    rc = tl.arange(0, C)
    t0 = tl.load(seg_start_ptr + s)
    L = tl.load(seg_len_ptr + s)
    g = tl.load(g_ptr + h)
    ptrs, mask = _state_tile_ptrs(state_ptr, s, h, rk, rv, H, D)
    S = tl.load(ptrs, mask=mask, other=0.0)
    diff = (rc[:, None] - rc[None, :]).to(tl.float32)
    intra_decay = tl.exp(tl.where(diff >= 0, g * diff, float("-inf")))
    q_decay = tl.exp(g * (rc + 1).to(tl.float32))
    for c0 in range(0, L, C):
        tok = c0 + rc
        valid = tok < L
        n = tl.minimum(L - c0, C)
        row = (t0 + tok).to(tl.int64) * (H * D) + h * D
        do = _load_rows(do_ptr, row, valid, rv, D)
        v = _load_rows(v_ptr, row, valid, rv, D)
        k = _load_rows(k_ptr, row, valid, rk, D)
        dA = _dot(do, tl.trans(v), IEEE) * intra_decay
        dq = _dot(dA.to(k.dtype), k, IEEE)
        dq += _dot((do * q_decay[:, None]).to(do.dtype), tl.trans(S.to(do.dtype)), IEEE)
        tl.store(dq_ptr + row[:, None] + rk[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
                 mask=valid[:, None] & (rk[None, :] < D))
        k_decay = tl.exp(tl.where(valid, g * (n - 1 - rc).to(tl.float32), float("-inf")))
        S = tl.exp(g * n.to(tl.float32)) * S + _dot(tl.trans((k * k_decay[:, None]).to(k.dtype)), v, IEEE)


@triton.jit
def chunk_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, g_ptr, seg_start_ptr, seg_len_ptr, dstate_ptr,
                      scale, H: tl.constexpr, D: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr, IEEE: tl.constexpr):
    """Walks a segment's chunks backwards carrying dS (gradient of the state after the chunk):
      dv = scale [(k qᵀ) ⊙ Mᵀ] do + diag(λ^(n-1-j)) k dS      (needs all key columns: BK = DP)
      dk = scale [(v doᵀ) ⊙ Mᵀ] q + diag(λ^(n-1-j)) v dSᵀ     (needs all value columns: BV = DP)
      dS ← λ^n dS + scale (diag(λ^(i+1)) q)ᵀ do"""
    s = tl.program_id(0)
    h = tl.program_id(1)
    NV: tl.constexpr = triton.cdiv(D, BV)
    rk = (tl.program_id(2) // NV) * BK + tl.arange(0, BK)
    rv = (tl.program_id(2) % NV) * BV + tl.arange(0, BV)
    rc = tl.arange(0, C)
    t0 = tl.load(seg_start_ptr + s)
    L = tl.load(seg_len_ptr + s)
    g = tl.load(g_ptr + h)
    ptrs, mask = _state_tile_ptrs(dstate_ptr, s, h, rk, rv, H, D)
    dS = tl.load(ptrs, mask=mask, other=0.0)
    # transposed intra mask: entry (j, i) = λ^(i-j) for i >= j
    diff = (rc[None, :] - rc[:, None]).to(tl.float32)
    intra_decay_T = tl.exp(tl.where(diff >= 0, g * diff, float("-inf"))) * scale
    q_decay = tl.exp(g * (rc + 1).to(tl.float32)) * scale
    num_chunks = tl.cdiv(L, C)
    for ci in range(0, num_chunks):
        c0 = (num_chunks - 1 - ci) * C
        tok = c0 + rc
        valid = tok < L
        n = tl.minimum(L - c0, C)
        row = (t0 + tok).to(tl.int64) * (H * D) + h * D
        q = _load_rows(q_ptr, row, valid, rk, D)
        k = _load_rows(k_ptr, row, valid, rk, D)
        v = _load_rows(v_ptr, row, valid, rv, D)
        do = _load_rows(do_ptr, row, valid, rv, D)
        k_decay = tl.exp(tl.where(valid, g * (n - 1 - rc).to(tl.float32), float("-inf")))
        if DO_DV:
            P = _dot(k, tl.trans(q), IEEE) * intra_decay_T
            dv = _dot(P.to(do.dtype), do, IEEE)
            dv += _dot((k * k_decay[:, None]).to(k.dtype), dS.to(k.dtype), IEEE)
            tl.store(dv_ptr + row[:, None] + rv[None, :], dv.to(dv_ptr.dtype.element_ty),
                     mask=valid[:, None] & (rv[None, :] < D))
        if DO_DK:
            P2 = _dot(v, tl.trans(do), IEEE) * intra_decay_T
            dk = _dot(P2.to(q.dtype), q, IEEE)
            dk += _dot((v * k_decay[:, None]).to(v.dtype), tl.trans(dS.to(v.dtype)), IEEE)
            tl.store(dk_ptr + row[:, None] + rk[None, :], dk.to(dk_ptr.dtype.element_ty),
                     mask=valid[:, None] & (rk[None, :] < D))
        dS = tl.exp(g * n.to(tl.float32)) * dS + _dot(tl.trans((q * q_decay[:, None]).to(q.dtype)), do, IEEE)


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
