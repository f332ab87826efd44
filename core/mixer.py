"""The contracts between the model and its parts: mixers and position encodings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

# part of the mixer contract, defined in the torch-free registry so that registering a mixer needs no torch
from hyloom.registry import CapabilityError, Family, MixerCapabilities  # noqa: F401


class PositionEncoding(Protocol):
    """What one layer does with positions: rotate q/k and optionally scale queries (both may be no-ops).

    `apply(q [B, T, H, D], k [B, T, Hkv, D], pos [B, T] int64)` returns q and k of the same shapes and dtypes.
    A query scaling (HyPE's ln(t+a)/ln(a)) multiplies q and comes on top of the mixer's own 1/sqrt(D).
    """

    def apply(self, q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, pos_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class PositionPolicy(Protocol):
    """Gives each layer its position encoding from the layer's mixer family; asked once per layer, when the
    model is built."""

    def for_layer(self, family: Family, layer: int) -> PositionEncoding: ...


@dataclass
class MixerContext:
    """Everything a mixer needs besides its input.

    pos_BT:    position of each input token, int64 [B, T]: counts real tokens only (left padding gets 0) and
               restarts at every packed sequence.
    position:  this layer's encoding, from the position policy (`q, k = ctx.position.apply(q, k, ctx.pos_BT)`).
    causal:    model.causal; False only if the mixer declares `bidirectional`.
    valid_BS:  bool [B, S], which keys are real (not padding), over the cached keys *and* the new ones
               (S = cached + T; the new tokens are `valid_BS[:, -T:]`); None when every token is real.
    cache:     this layer's decode state (from `new_cache`), updated in place; None outside prefill/decode.
               Prefill passes a fresh (empty) state with T >= 1 tokens, decode passes it again with T == 1.
    cu_seqlens: int32 [N + 1] offsets (0 ... T) of packed sequences in a batch of one row, or None. Only given
               to mixers that declare `varlen`; never together with a cache.
    slot_1:    a static decode step (only for a mixer whose `static_decode` is True, T == 1): int64 [1], the
               new token's index in the cache buffers. valid_BS is then the model's whole padding buffer
               [B, capacity] (True up to and including the new token, False after it), so that every shape is
               the same at each step and the step can be captured in a CUDA graph.
    """

    pos_BT: torch.Tensor
    position: PositionEncoding
    causal: bool = True
    valid_BS: torch.Tensor | None = None
    cache: Any = None
    cu_seqlens: torch.Tensor | None = None
    slot_1: torch.Tensor | None = None


class Mixer(nn.Module):
    """A token mixer: [B, T, d] → [B, T, d]. Subclasses set `capabilities` and implement `forward`."""

    capabilities: MixerCapabilities
    # True: decode steps run with `ctx.slot_1` (see MixerContext) using static shapes only, reading nothing back
    # to the host and updating the cache in place, so the model may capture them in a CUDA graph. The cache then
    # has `advance(n)`, which the model calls after each such step for any host-side bookkeeping (Python does
    # not run when a graph replays). False (the default): decode steps run eagerly between captured parts.
    static_decode: bool = False
    # A chunked prefill equals one pass only if its first chunk holds at least this many tokens (InfLLM-V2:
    # dense_len, since a layer runs dense or sparse by the key length it sees); the model makes it so.
    first_chunk_min: int = 0

    def forward(self, x_BTD: torch.Tensor, ctx: MixerContext) -> torch.Tensor:
        raise NotImplementedError

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> Any:
        """An empty decode state for `batch` sequences (any object: forward receives it as ctx.cache). If it
        has `reserve(capacity)`, the model calls it before a prefill or decode would pass `capacity` tokens, so
        buffers can be allocated once (sized up front when the caller knows the final length)."""
        raise NotImplementedError(f"{type(self).__name__} does not support decoding")

    def cache_bytes(self, dtype_bytes: int) -> tuple[int, int]:
        """Decode-state size for one sequence: (bytes per cached token, bytes independent of length).
        `dtype_bytes` is the size of the model's dtype; a state kept in its own dtype (an fp32 recurrent
        state) reports its real size whatever `dtype_bytes` is."""
        return 0, 0


class NoPosition:
    """NoPE: positions are not encoded."""

    def apply(self, q_BTHD, k_BTHD, pos_BT):
        return q_BTHD, k_BTHD
