"""Lightning Attention: linear attention with a fixed per-head decay λ = exp(g) (SPEC §1).

    o, final_state = lightning_attn(q, k, v, g)                # q, k, v [B, T, H, D]; g [H] fp32, g <= 0
    o, new_state = lightning_attn_decode(q, k, v, g, state)   # one token: q, k, v [B, H, D]; state [B, H, D, D]

backend=None runs the Triton kernels for CUDA tensors and the PyTorch reference otherwise; "triton" and "naive"
force one. The training path runs as torch custom ops (ops.py: hyloom::lightning_fwd / _bwd), which
torch.compile keeps whole. Triton is imported only when the Triton backend is used, so this module imports
without it.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from . import naive, ops
from .decay import decay_alibi, decay_alibi_layer, decay_tnl_linear

__all__ = ["lightning_attn", "lightning_attn_decode", "decay_alibi", "decay_alibi_layer", "decay_tnl_linear"]


# whether triton is installed, without importing it (slow); a constant, so torch.compile traces no lookup
HAS_TRITON = importlib.util.find_spec("triton") is not None


# Let backend=None run the Triton interpreter on CPU tensors (with TRITON_INTERPRET=1): tests of a whole model
# on the Triton path set it, as hyloom.kernels.infllm_v2.ops.TRITON_ON_CPU does for InfLLM-V2.
TRITON_ON_CPU = False


def _pick_backend(backend: str | None, x: torch.Tensor) -> str:
    if backend is None:
        interpret = TRITON_ON_CPU and os.environ.get("TRITON_INTERPRET") == "1"
        return "triton" if (x.is_cuda or interpret) and HAS_TRITON else "naive"
    if backend not in ("triton", "naive"):
        raise ValueError(f"backend must be None, 'triton' or 'naive', not {backend!r}")
    if backend == "triton" and not HAS_TRITON:
        raise RuntimeError("backend='triton' but triton is not installed")
    return backend


def _check(q, k, v, g, initial_state, cu_seqlens):
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one [B, T, H, D] shape, got {q.shape}, {k.shape}, {v.shape}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, T, H, D = q.shape
    if g.shape != (H,):
        raise ValueError(f"g must be [H] = [{H}], got {tuple(g.shape)}")
    if D > 256:
        raise ValueError(f"head dim up to 256 is supported, got {D}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError("cu_seqlens needs B == 1 (packed sequences)")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must be [N + 1] offsets")
    n = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (n, H, D, D):
        raise ValueError(f"initial_state must be [{n}, {H}, {D}, {D}], got {tuple(initial_state.shape)}")


def lightning_attn(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                   causal=True, backend=None):
    """Lightning attention over a sequence.

    q, k, v: [B, T, H, D]; g: [H] log-decay (fp32, <= 0); scale defaults to D**-0.5.
    initial_state: [N, H, D, D] fp32 (N = B, or the number of packed sequences); final state the same, or None.
    cu_seqlens: int32 [N + 1] offsets of packed sequences (B must be 1); each starts from its own state.
    causal=False: o_i = scale Σ_j λ^|i-j| q_i k_jᵀ v_j, no state in or out.
    Returns (o with q's dtype, final_state fp32 or None)."""
    _check(q, k, v, g, initial_state, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if _pick_backend(backend, q) == "naive":
        return naive.lightning_attn(q, k, v, g, scale=scale, initial_state=initial_state,
                                    output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                    causal_mask=causal)
    if not causal:
        if initial_state is not None or output_final_state:
            raise ValueError("non-causal lightning attention takes no state in or out")
        return naive.bidirectional(ops.lightning_causal, q, k, v, g, scale=scale, cu_seqlens=cu_seqlens), None
    return ops.lightning_causal(q, k, v, g, scale=scale, initial_state=initial_state,
                                output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def lightning_attn_decode(q, k, v, g, state, *, scale=None, backend=None):
    """One decoding step: q, k, v [B, H, D]; state [B, H, D, D] fp32 -> (o [B, H, D], new_state fp32).
    The Triton step is inference-only; with gradients enabled on any input it falls back to the reference."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    use_triton = _pick_backend(backend, q) == "triton"
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, state))
    if use_triton and not needs_grad:
        from . import triton_impl

        return triton_impl.decode(q, k, v, g, state, scale=scale)
    return naive.decode(q, k, v, g, state, scale=scale)
