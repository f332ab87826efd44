"""Position encodings: rotary (RoPE) and HyPE's log-length query scaling."""

from __future__ import annotations

import math

import torch


class Rotary:
    """RoPE in the rotate-half convention (Llama, Qwen3), so imported checkpoints match their originals."""

    def __init__(self, theta: float):
        self.theta = theta

    def cos_sin(self, pos_BT: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.theta ** -(torch.arange(0, dim, 2, device=pos_BT.device, dtype=torch.float32) / dim)
        angles = pos_BT.float()[..., None] * inv_freq  # [B, T, D/2]
        angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]  # [B, T, 1, D]
        return angles.cos(), angles.sin()

    def apply(self, q_BTHD, k_BTHD, pos_BT):
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
