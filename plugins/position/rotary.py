"""Position encodings: rotary (RoPE, optionally LongRoPE-scaled) and HyPE's log-length query scaling."""

from __future__ import annotations

import math

import torch


class Rotary:
    """RoPE in the rotate-half convention (Llama, Qwen3, MiniCPM), so imported checkpoints match their originals.

    Pair i of a head of size D turns by pos · θ^(-2i/D) / factors[i] (factors: LongRoPE's per-frequency
    stretch, one per pair; none = plain RoPE), and cos/sin are multiplied by `attention_factor`, which scales
    q and k alike, so the attention logits by its square (LongRoPE's magnitude correction)."""

    def __init__(self, theta: float, factors: tuple[float, ...] | None = None, attention_factor: float = 1.0,
                 factors_key: str = "factors"):
        self.theta = theta
        self.factors = factors
        self.attention_factor = attention_factor
        self.factors_key = factors_key  # the blueprint key named when the list does not fit the head size

    def inv_freq(self, dim: int, device=None) -> torch.Tensor:
        inv = self.theta ** -(torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
        if self.factors is None:
            return inv
        if len(self.factors) != dim // 2:
            raise ValueError(f"{self.factors_key} has {len(self.factors)} values, but a head of {dim} dimensions "
                             f"has {dim // 2} rotary frequencies (one factor each)")
        return inv / torch.tensor(self.factors, device=device, dtype=torch.float32)

    def cos_sin(self, pos_BT: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        angles = pos_BT.float()[..., None] * self.inv_freq(dim, pos_BT.device)  # [B, T, D/2]
        angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]  # [B, T, 1, D]
        if self.attention_factor == 1.0:
            return angles.cos(), angles.sin()
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor

    def apply(self, q_BTHD, k_BTHD, pos_BT):
        if q_BTHD.shape[-1] % 2:
            raise ValueError(f"RoPE rotates pairs of channels, so head_dim must be even, got {q_BTHD.shape[-1]}")
        cos, sin = self.cos_sin(pos_BT, q_BTHD.shape[-1])
        return _rotate(q_BTHD, cos, sin), _rotate(k_BTHD, cos, sin)


def _rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class QueryScaling:
    """NoPE with HyPE's attention-logit scaling: the query at position t is multiplied by ln(t + a) / ln(a)."""

    def __init__(self, a: float):
        self.a = a

    def apply(self, q_BTHD, k_BTHD, pos_BT):
        scale_BT = torch.log(pos_BT.float() + self.a) / math.log(self.a)
        return (q_BTHD.float() * scale_BT[:, :, None, None]).to(q_BTHD.dtype), k_BTHD
