"""The contracts between the model and its parts: mixers and position encodings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import nn

Family = Literal["softmax", "sparse", "linear"]


@dataclass(frozen=True)
class MixerCapabilities:
    family: Family  # decides the position encoding a policy gives the layer (HyPE: RoPE for linear only)
    causal: bool = True
    bidirectional: bool = False
    decode: bool = True
    varlen: bool = False


class PositionEncoding(Protocol):
    """What one layer does with positions: rotate q/k and optionally scale queries (both may be no-ops)."""

    def apply(self, q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, pos_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class PositionPolicy(Protocol):
    """Gives each layer its position encoding from the layer's mixer family."""

    def for_layer(self, family: Family, layer: int) -> PositionEncoding: ...


@dataclass
class MixerContext:
    """Everything a mixer needs besides its input.

    pos_BT:    absolute position of each input token.
    valid_BS:  which keys are real (not padding), over the cached keys *and* the new ones (S = cached + T);
               None when every token is real.
    cache:     this layer's decode state (from `new_cache`), updated in place; None when not decoding.
    cu_seqlens: int32 offsets of packed sequences in a batch of one row (training on packed data), or None.
    """

    pos_BT: torch.Tensor
    position: PositionEncoding
    causal: bool = True
    valid_BS: torch.Tensor | None = None
    cache: Any = None
    cu_seqlens: torch.Tensor | None = None


class Mixer(nn.Module):
    """A token mixer: [B, T, d] → [B, T, d]. Subclasses set `capabilities` and implement `forward`."""

    capabilities: MixerCapabilities

    def forward(self, x_BTD: torch.Tensor, ctx: MixerContext) -> torch.Tensor:
        raise NotImplementedError

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> Any:
        """An empty decode state for `batch` sequences."""
        raise NotImplementedError(f"{type(self).__name__} does not support decoding")

    def cache_bytes(self, dtype_bytes: int) -> tuple[int, int]:
        """Decode-state size for one sequence: (bytes per cached token, bytes independent of length)."""
        return 0, 0


class NoPosition:
    """NoPE: positions are not encoded."""

    def apply(self, q_BTHD, k_BTHD, pos_BT):
        return q_BTHD, k_BTHD
