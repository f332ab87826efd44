"""The Triton path as torch custom ops, so that torch.compile sees one opaque node per launch group (no graph
break) and knows its output shapes without running it:

    hyloom::lightning_fwd(q, k, v, g, h0?, scale, want_final, cu_seqlens?) -> (o, final, segment_states)
    hyloom::lightning_bwd(q, k, v, g, do, dht?, segment_states, scale, want_dh0, cu_seqlens?) -> (dq, dk, dv, dh0)

q, k, v, o: [B, T, H, D]; g: [H] fp32; states fp32. `final` ([N, H, D, D]) and `dh0` are empty ([0]) when not
asked for: a custom op cannot return None. `segment_states` (the state entering every segment) is an output
only so that the backward gets it. This module imports no triton; the ops load the kernels when they run.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_NONE = (0,)  # shape of the empty stand-in for an output that was not asked for


def _segments(q, cu_seqlens):
    from . import triton_impl

    B, T, H, _ = q.shape
    return triton_impl.make_segments(B, T, H, cu_seqlens, q.device)


def _packed(x: Tensor) -> Tensor:
    B, T, H, D = x.shape
    return x.reshape(B * T, H, D).contiguous()


@torch.library.custom_op("hyloom::lightning_fwd", mutates_args=())
def lightning_fwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, h0: Optional[Tensor], scale: float,
                  want_final: bool, cu_seqlens: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    from . import triton_impl

    h0 = h0.float().contiguous() if h0 is not None else None
    o, final, states = triton_impl.forward(_packed(q), _packed(k), _packed(v), g.float().contiguous(), h0,
                                           scale, want_final, _segments(q, cu_seqlens))
    if final is None:
        final = q.new_empty(_NONE, dtype=torch.float32)
    return o.view(q.shape), final, states


@lightning_fwd.register_fake
def _(q, k, v, g, h0, scale, want_final, cu_seqlens):
    from . import triton_impl

    B, T, H, D = q.shape
    n = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    final = q.new_empty((n, H, D, D) if want_final else _NONE, dtype=torch.float32)
    if cu_seqlens is None:
        segments = triton_impl.num_segments(B, T, H, q.device)
    else:  # how many segments depends on the packed lengths: known only when the op runs
        segments = torch.library.get_ctx().new_dynamic_size()
    return torch.empty_like(q, memory_format=torch.contiguous_format), final, \
        q.new_empty((segments, H, D, D), dtype=torch.float32)


@torch.library.custom_op("hyloom::lightning_bwd", mutates_args=())
def lightning_bwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, do: Tensor, dht: Optional[Tensor],
                  states: Tensor, scale: float, want_dh0: bool,
                  cu_seqlens: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from . import triton_impl

    dht = dht.float().contiguous() if dht is not None else None
    do = _packed(do.to(q.dtype))
    dq, dk, dv, dh0 = triton_impl.backward(_packed(q), _packed(k), _packed(v), g.float().contiguous(), do, dht,
                                           states.contiguous(), scale, want_dh0, _segments(q, cu_seqlens))
    if dh0 is None:
        dh0 = q.new_empty(_NONE, dtype=torch.float32)
    return dq.view(q.shape), dk.view(q.shape), dv.view(q.shape), dh0


@lightning_bwd.register_fake
def _(q, k, v, g, do, dht, states, scale, want_dh0, cu_seqlens):
    B, T, H, D = q.shape
    n = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    dh0 = q.new_empty((n, H, D, D) if want_dh0 else _NONE, dtype=torch.float32)
    like = lambda: torch.empty_like(q, memory_format=torch.contiguous_format)  # noqa: E731
    return like(), like(), like(), dh0


def _setup(ctx, inputs, output):
    q, k, v, g, h0, scale, want_final, cu_seqlens = inputs
    ctx.save_for_backward(q, k, v, g, output[2], cu_seqlens)
    ctx.scale, ctx.has_h0, ctx.want_final = scale, h0 is not None, want_final


def _backward(ctx, do, dfinal, _dstates):
    q, k, v, g, states, cu_seqlens = ctx.saved_tensors
    dht = dfinal if ctx.want_final and dfinal is not None else None
    dq, dk, dv, dh0 = lightning_bwd(q, k, v, g, do, dht, states, ctx.scale, ctx.has_h0, cu_seqlens)
    return dq, dk, dv, None, dh0 if ctx.has_h0 else None, None, None, None


lightning_fwd.register_autograd(_backward, setup_context=_setup)


def lightning_causal(q, k, v, g, *, scale, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Causal Lightning attention on the Triton kernels: (o [B, T, H, D], final state fp32 or None)."""
    g = g.detach().to(device=q.device, dtype=torch.float32)
    o, final, _ = lightning_fwd(q, k, v, g, initial_state, float(scale), output_final_state, cu_seqlens)
    return o, (final if output_final_state else None)
