"""Per-head log-decay g = ln λ (g <= 0) for the published conventions (SPEC §1). Never trained."""
from __future__ import annotations

import torch


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slopes s_h = 2^(-8(h+1)/H), h = 0..H-1."""
    h = torch.arange(num_heads, dtype=torch.float64)
    return torch.pow(2.0, -8.0 * (h + 1) / num_heads)


def decay_alibi(num_heads: int) -> torch.Tensor:
    """HypeNet / MiniCPM-SALA / OpenNLPLab: λ_h = exp(-s_h)."""
    return (-alibi_slopes(num_heads)).float()


def decay_alibi_layer(num_heads: int, layer: int, num_layers: int) -> torch.Tensor:
    """MiniMax-01: slopes scaled by (1 - l/(L-1) + 1e-5), so the last layer barely decays."""
    depth = 1 - layer / max(num_layers - 1, 1) + 1e-5
    return (-alibi_slopes(num_heads) * depth).float()


def decay_tnl_linear(num_heads: int, layer: int, num_layers: int) -> torch.Tensor:
    """TransNormerLLM / fla `chunk_lightning_attn`: g_h = -(8/H)(1 - l/L)·h (head 0 does not decay)."""
    h = torch.arange(num_heads, dtype=torch.float64)
    return (-(8.0 / num_heads) * (1 - layer / num_layers) * h).float()
