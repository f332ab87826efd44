from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every past token in preallocated buffers [B, Hkv, capacity, D] and a length.

    `reserve` sizes them (once, up front, when the caller knows the final length; else they grow by doubling on
    `append`). The buffers start as zeros: a static decode step attends over the whole capacity with the
    unwritten slots masked out, and a masked slot must not hold NaN (0 × NaN would reach the output)."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, device, dtype):
        self.k = torch.zeros(batch, kv_heads, 0, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` tokens in all (buffers never shrink)."""
        if capacity <= self.capacity:
            return
        grown = self.k.new_zeros(*self.k.shape[:2], capacity, self.k.shape[3])
        grown_v = torch.zeros_like(grown)
        grown[:, :, : self.length] = self.k[:, :, : self.length]
        grown_v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = grown, grown_v

    def append(self, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values; return all of them so far (views of the buffers)."""
        end = self.length + k_BHTD.shape[2]
        if end > self.capacity:
            self.reserve(max(end, 2 * self.capacity, 16))
        self.k[:, :, self.length:end] = k_BHTD
        self.v[:, :, self.length:end] = v_BHTD
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def write_at(self, slot_1: torch.Tensor, k_BH1D: torch.Tensor, v_BH1D: torch.Tensor) -> None:
        """A static decode step's key/value at index slot_1 (a device tensor, so a CUDA graph can replay it);
        `advance` then moves the host-side length. Under autocast the new key/value can be bf16 while the buffers
        keep the model's dtype: stored in the buffers' dtype, as `append` does."""
        self.k.index_copy_(2, slot_1, k_BH1D.to(self.k.dtype))
        self.v.index_copy_(2, slot_1, v_BH1D.to(self.v.dtype))

    def advance(self, n: int) -> None:
        self.length += n
