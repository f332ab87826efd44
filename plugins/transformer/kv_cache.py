from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every past token, [B, Hkv, S, D], in a buffer that grows by doubling."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, device, dtype):
        self.k = torch.empty(batch, kv_heads, 0, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values; return all of them so far."""
        end = self.length + k_BHTD.shape[2]
        if end > self.k.shape[2]:
            capacity = max(end, 2 * self.k.shape[2], 16)
            grown = self.k.new_empty(*self.k.shape[:2], capacity, self.k.shape[3])
            grown_v = torch.empty_like(grown)
            grown[:, :, : self.length] = self.k[:, :, : self.length]
            grown_v[:, :, : self.length] = self.v[:, :, : self.length]
            self.k, self.v = grown, grown_v
        self.k[:, :, self.length:end] = k_BHTD
        self.v[:, :, self.length:end] = v_BHTD
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]
