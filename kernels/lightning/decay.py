"""Per-head log-decay g = ln λ (g <= 0) for the published conventions (SPEC §1). Never trained."""
from __future__ import annotations

import torch


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slopes: s_h = 2^(-8(h+1)/H) when H is a power of two. Otherwise the ALiBi recipe the official
    HypeNet / MiniCPM-SALA / OpenNLPLab code uses: the H' slopes of the largest power of two H' < H, then every
    other slope of 2H' (the 1st, 3rd, ...) until there are H. Those interleave the first set, so every head
    still gets its own decay; stretching the geometric series to H would give other numbers."""
    if num_heads < 1:
        raise ValueError(f"ALiBi slopes need at least one head, got {num_heads}")

    def geometric(n: int) -> torch.Tensor:
        return torch.pow(2.0, -8.0 * torch.arange(1, n + 1, dtype=torch.float64) / n)

    n = 1 << (num_heads.bit_length() - 1)  # largest power of two <= H
    if n == num_heads:
        return geometric(n)
    return torch.cat([geometric(n), geometric(2 * n)[0::2][: num_heads - n]])


def decay_alibi(num_heads: int) -> torch.Tensor:
    """HypeNet / MiniCPM-SALA / OpenNLPLab: λ_h = exp(-s_h)."""
    return (-alibi_slopes(num_heads)).float()


def decay_alibi_layer(num_heads: int, layer: int, num_layers: int) -> torch.Tensor:
    """MiniMax-01's decay schedule (only the decay: MiniMax's layer itself also differs, see the mixer docs):
    slopes scaled by (1 - l/(L-1) + 1e-5), so the last layer barely decays."""
    depth = 1 - layer / max(num_layers - 1, 1) + 1e-5
    return (-alibi_slopes(num_heads) * depth).float()


def decay_tnl_linear(num_heads: int, layer: int, num_layers: int) -> torch.Tensor:
    """TransNormerLLM / fla `chunk_lightning_attn`: g_h = -(8/H)(1 - l/L)·h (head 0 does not decay)."""
    h = torch.arange(num_heads, dtype=torch.float64)
    return (-(8.0 / num_heads) * (1 - layer / num_layers) * h).float()
