"""PyTorch reference for Lightning Attention (linear attention with a fixed per-head decay).

Per head h, with λ_h = exp(g_h) (g_h <= 0):

    S_t = λ S_{t-1} + k_tᵀ v_t        (D×D, fp32)
    o_t = scale · q_t S_t

Two forms live here, both differentiable and both in fp32 internally:
- `recurrent`: the token loop above, the definition itself;
- `chunked`: the same sum split into chunks of C tokens (what the Triton kernels do).
Both take packed variable-length input through `cu_seqlens` and an initial state per sequence.
The non-causal (bidirectional) form, o_i = scale Σ_j λ^|i-j| q_i k_jᵀ v_j, is built from the causal one by
`bidirectional` (forward pass + pass over the reversed sequence − the diagonal counted twice).
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def sequence_bounds(batch: int, seqlen: int, cu_seqlens: Tensor | None) -> list[tuple[int, int]]:
    """(start, end) token offsets of each sequence in the packed [B*T] token axis."""
    if cu_seqlens is None:
        return [(b * seqlen, (b + 1) * seqlen) for b in range(batch)]
    cu = cu_seqlens.tolist()
    return list(zip(cu[:-1], cu[1:]))


def _recurrent_one(q_TH_D, k_TH_D, v_TH_D, g_H, scale, state_HDD):
    """One sequence, token by token. q/k/v: [T, H, D] fp32; state: [H, D, D] fp32."""
    decay_H11 = g_H.exp()[:, None, None]
    outs = []
    for t in range(q_TH_D.shape[0]):
        state_HDD = decay_H11 * state_HDD + k_TH_D[t, :, :, None] * v_TH_D[t, :, None, :]
        outs.append(scale * torch.einsum("hd,hde->he", q_TH_D[t], state_HDD))
    o = torch.stack(outs) if outs else q_TH_D.new_zeros(q_TH_D.shape)
    return o, state_HDD


def _chunked(q_NTHD, k_NTHD, v_NTHD, g_H, scale, state_NHDD, chunk):
    """N sequences of equal length, chunk by chunk (n tokens, i and j local to the chunk):
    O_c = scale[(Q Kᵀ) ⊙ M] V + scale diag(λ^(i+1)) Q S_prev
    S_next = λ^n S_prev + (diag(λ^(n-1-j)) K)ᵀ V"""
    outs = []
    for c0 in range(0, q_NTHD.shape[1], chunk):
        q, k, v = (x[:, c0:c0 + chunk].transpose(1, 2) for x in (q_NTHD, k_NTHD, v_NTHD))  # [N, H, n, D]
        n = q.shape[2]
        i = torch.arange(n, device=q.device, dtype=torch.float32)
        diff = i[:, None] - i[None, :]
        # mask before exp: for j > i the exponent g*(i-j) would be positive
        mask_Hnn = torch.where(diff >= 0, g_H[:, None, None] * diff, float("-inf")).exp()
        decay_q_Hn1 = (g_H[:, None] * (i + 1)).exp()[..., None]
        decay_k_Hn1 = (g_H[:, None] * (n - 1 - i)).exp()[..., None]
        intra = (q @ k.transpose(-1, -2) * mask_Hnn) @ v
        inter = decay_q_Hn1 * (q @ state_NHDD)
        outs.append((scale * (intra + inter)).transpose(1, 2))
        state_NHDD = (g_H * n).exp()[:, None, None] * state_NHDD + (decay_k_Hn1 * k).transpose(-1, -2) @ v
    o = torch.cat(outs, dim=1) if outs else q_NTHD.new_zeros(q_NTHD.shape)
    return o, state_NHDD


def causal(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
           form="chunked", chunk=64):
    """Causal lightning attention. q, k, v: [B, T, H, D]; g: [H] log-decay. Returns (o [B,T,H,D], state)."""
    B, T, H, D = q.shape
    if cu_seqlens is not None and B != 1:
        raise ValueError("cu_seqlens needs B == 1 (packed sequences)")
    scale = D ** -0.5 if scale is None else scale
    g = g.float().to(q.device)
    h0_NHDD = None if initial_state is None else initial_state.float()
    if form == "chunked" and cu_seqlens is None:  # equal lengths: every row of the batch at once
        h0_NHDD = q.new_zeros(B, H, D, D, dtype=torch.float32) if h0_NHDD is None else h0_NHDD
        o, final = _chunked(q.float(), k.float(), v.float(), g, scale, h0_NHDD, chunk)
        return o.to(q.dtype), (final if output_final_state else None)
    f32 = [x.reshape(B * T, H, D).float() for x in (q, k, v)]
    outs, finals = [], []
    for n, (s, e) in enumerate(sequence_bounds(B, T, cu_seqlens)):
        h0 = q.new_zeros(H, D, D, dtype=torch.float32) if h0_NHDD is None else h0_NHDD[n]
        qs, ks, vs = (x[s:e] for x in f32)
        if form == "recurrent":
            o, hT = _recurrent_one(qs, ks, vs, g, scale, h0)
        else:
            o, hT = _chunked(qs[None], ks[None], vs[None], g, scale, h0[None], chunk)
            o, hT = o[0], hT[0]
        outs.append(o)
        finals.append(hT)
    o = torch.cat(outs).reshape(B, T, H, D).to(q.dtype)
    return o, (torch.stack(finals) if output_final_state else None)


def reverse_packed(x_BTHD: Tensor, cu_seqlens: Tensor | None):
    """Reverse the token axis; with packed sequences the reversed tensor is again packed, with new offsets."""
    flipped = x_BTHD.flip(1)
    if cu_seqlens is None:
        return flipped, None
    return flipped, (cu_seqlens[-1] - cu_seqlens.flip(0)).to(cu_seqlens.dtype)


def bidirectional(causal_fn, q, k, v, g, *, scale=None, cu_seqlens=None):
    """o_i = scale Σ_j λ^|i-j| q_i k_jᵀ v_j from a causal kernel: causal pass (j <= i) + the causal pass over the
    reversed sequence (j >= i) − the diagonal j = i, which both passes count."""
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    o_fwd, _ = causal_fn(q, k, v, g, scale=scale, cu_seqlens=cu_seqlens)
    (qr, cu_r), (kr, _), (vr, _) = (reverse_packed(x, cu_seqlens) for x in (q, k, v))
    o_bwd, _ = causal_fn(qr, kr, vr, g, scale=scale, cu_seqlens=cu_r)
    diag = scale * (q.float() * k.float()).sum(-1, keepdim=True) * v.float()
    return (o_fwd.float() + o_bwd.flip(1).float() - diag).to(q.dtype)


def parallel_noncausal(q, k, v, g, *, scale=None, cu_seqlens=None):
    """Bidirectional attention straight from its definition (a T×T decay matrix per head): the test oracle."""
    B, T, H, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    qf, kf, vf = (x.reshape(B * T, H, D).float().transpose(0, 1) for x in (q, k, v))
    out = torch.empty_like(qf)
    for s, e in sequence_bounds(B, T, cu_seqlens):
        i = torch.arange(e - s, device=q.device, dtype=torch.float32)
        decay_Hnn = (g.float().to(q.device)[:, None, None] * (i[:, None] - i[None, :]).abs()).exp()
        out[:, s:e] = scale * (qf[:, s:e] @ kf[:, s:e].transpose(1, 2) * decay_Hnn) @ vf[:, s:e]
    return out.transpose(0, 1).reshape(B, T, H, D).to(q.dtype)


def lightning_attn(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                   causal_mask=True, form="chunked"):
    if not causal_mask:
        if initial_state is not None or output_final_state:
            raise ValueError("non-causal lightning attention takes no state in or out")
        fn = lambda *a, **kw: causal(*a, form=form, **kw)  # noqa: E731
        return bidirectional(fn, q, k, v, g, scale=scale, cu_seqlens=cu_seqlens), None
    return causal(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  cu_seqlens=cu_seqlens, form=form)


def decode(q_BHD, k_BHD, v_BHD, g, state_BHDD, *, scale=None):
    """One token: S = λ S + kᵀ v ; o = scale q S."""
    scale = q_BHD.shape[-1] ** -0.5 if scale is None else scale
    decay = g.float().to(state_BHDD.device).exp()[None, :, None, None]
    new_state = decay * state_BHDD.float() + k_BHD.float()[..., :, None] * v_BHD.float()[..., None, :]
    o = scale * torch.einsum("bhd,bhde->bhe", q_BHD.float(), new_state)
    return o.to(q_BHD.dtype), new_state
