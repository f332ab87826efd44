"""A hyloom plugin: `short_conv`, a causal depthwise convolution over the last few tokens.

Everything a mixer needs is here: a pydantic config, a `Mixer` subclass with declared capabilities,
a decode cache (the last kernel-1 inputs) and one registration through the `hyloom_register_mixers` hook.
"""

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, PositiveInt
from torch import nn

from hyloom.hookspecs import hookimpl
from hyloom.mixer import Mixer, MixerCapabilities


class ShortConvConfig(BaseModel):
    kernel: PositiveInt = Field(4, description="tokens each output sees (itself and kernel-1 before it)")


class ShortConv(Mixer):
    capabilities = MixerCapabilities(family="linear", causal=True, bidirectional=False, decode=True)

    def __init__(self, cfg: ShortConvConfig, d_model: int):
        super().__init__()
        self.kernel = cfg.kernel
        self.in_proj = nn.Linear(d_model, d_model, bias=False)
        self.conv_weight = nn.Parameter(torch.randn(d_model, 1, cfg.kernel) / cfg.kernel)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x_BTD, ctx):
        u_BTD = self.in_proj(x_BTD)
        if ctx.valid_BS is not None:  # padding must not leak into later tokens
            u_BTD = u_BTD * ctx.valid_BS[:, -x_BTD.shape[1]:, None]
        if ctx.cache is not None:  # prepend the inputs remembered from earlier calls
            history = torch.cat([ctx.cache["tail"], u_BTD], dim=1)
            ctx.cache["tail"] = history[:, history.shape[1] - (self.kernel - 1):]
        else:
            history = F.pad(u_BTD, (0, 0, self.kernel - 1, 0))
        y = F.conv1d(history.transpose(1, 2), self.conv_weight, groups=u_BTD.shape[-1])
        return self.out_proj(F.silu(y.transpose(1, 2)))

    def new_cache(self, batch, device, dtype):
        d = self.conv_weight.shape[0]
        return {"tail": torch.zeros(batch, self.kernel - 1, d, device=device, dtype=dtype)}

    def cache_bytes(self, dtype_bytes):
        return 0, (self.kernel - 1) * self.conv_weight.shape[0] * dtype_bytes


@hookimpl
def hyloom_register_mixers(register):
    register("short_conv", lambda cfg, layer, model: ShortConv(cfg, model.d_model), config=ShortConvConfig,
             capabilities=ShortConv.capabilities, summary="causal depthwise convolution over the last few tokens",
             example={"type": "short_conv", "kernel": 3})
