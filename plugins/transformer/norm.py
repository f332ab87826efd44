from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Normalises in fp32 and scales after casting back, as Llama and Qwen3 do (so imported weights match).
    The output keeps the input's dtype even when the weight is fp32 (bf16 autocast): the kernels downstream
    need q, k and v in one dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x32.to(x.dtype)).to(x.dtype)

    def reset_parameters(self):
        nn.init.ones_(self.weight)
