"""The Lightning attention layer (its config and registration: hyloom.plugins.lightning)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from hyloom.kernels.lightning import (decay_alibi, decay_alibi_layer, decay_tnl_linear, lightning_attn,
                                      lightning_attn_decode)
from hyloom.mixer import Mixer, MixerContext
from hyloom.plugins.lightning import CAPABILITIES, LightningConfig
from hyloom.plugins.transformer.attention import default_head_dim
from hyloom.plugins.transformer.norm import RMSNorm
from hyloom.recompute import keep_products


@dataclass
class RecurrentState:
    """The fp32 state [B, H, D, D], a fixed size whatever the context: updated in place, so a captured decode
    step keeps writing the same buffer."""
    state_BHDD: torch.Tensor

    def advance(self, n: int) -> None:  # nothing is kept on the host
        pass


class Lightning(Mixer):
    capabilities = CAPABILITIES
    static_decode = True

    def __init__(self, cfg: LightningConfig, layer: int, n_layers: int, d_model: int):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim or default_head_dim(d_model, cfg.heads)
        self.bidirectional_decay = cfg.bidirectional_decay
        H, D = self.heads, self.head_dim
        self.q_proj = nn.Linear(d_model, H * D, bias=False)
        self.k_proj = nn.Linear(d_model, H * D, bias=False)
        self.v_proj = nn.Linear(d_model, H * D, bias=False)
        self.o_proj = nn.Linear(H * D, d_model, bias=False)
        self.q_norm = RMSNorm(D, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(D, cfg.norm_eps) if cfg.qk_norm else None
        self.o_norm = RMSNorm(H * D, cfg.norm_eps) if cfg.output_norm else None
        self.z_proj = nn.Linear(d_model, H * D, bias=False) if cfg.gate else None
        # fixed, not trained and not saved: a constant of the config (made on the CPU even while the model is
        # built on `meta`), copied once to each device it runs on
        with torch.device("cpu"):
            self.g_H = {"alibi": lambda: decay_alibi(H),
                        "alibi_layer": lambda: decay_alibi_layer(H, layer, n_layers),
                        "tnl_linear": lambda: decay_tnl_linear(H, layer, n_layers)}[cfg.decay]().float()
        self._g_on = {}

    def forward(self, x_BTD, ctx: MixerContext):
        B, T, _ = x_BTD.shape
        H, D = self.heads, self.head_dim
        q = self.q_proj(x_BTD).view(B, T, H, D)
        k = self.k_proj(x_BTD).view(B, T, H, D)
        v = self.v_proj(x_BTD).view(B, T, H, D)
        z = self.z_proj(x_BTD) if self.z_proj is not None else None
        g = self._g_on.get(x_BTD.device)
        if g is None:
            g = self._g_on[x_BTD.device] = self.g_H.to(x_BTD.device)
        if ctx.cache is not None:  # writes the state: not to be run twice
            return self._mix(q, k, v, z, g, ctx)
        # training: the norms, rotary and gate run again in the backward pass rather than keeping their
        # intermediates (the projections' outputs and the attention's output are kept)
        return keep_products(functools.partial(self._mix, ctx=ctx), q, k, v, z, g)

    def _mix(self, q, k, v, z, g, ctx: MixerContext):
        """From the projections to the output: QK-norm, position, the attention, output norm, gate, o_proj."""
        B, T, H, D = q.shape
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = ctx.position.apply(q, k, ctx.pos_BT)
        if ctx.valid_BS is not None and ctx.slot_1 is None:  # padding tokens add nothing to the state
            keep = ctx.valid_BS[:, -T:, None, None].to(k.dtype)
            k, v = k * keep, v * keep
        if ctx.cache is not None:
            o = self._with_state(q, k, v, g, ctx.cache)
        elif ctx.causal:
            o, _ = lightning_attn(q, k, v, g, cu_seqlens=ctx.cu_seqlens)
        else:
            g = g if self.bidirectional_decay == "symmetric" else torch.zeros_like(g)
            o, _ = lightning_attn(q, k, v, g, cu_seqlens=ctx.cu_seqlens, causal=False)
        o = o.reshape(B, T, H * D)
        if self.o_norm is not None:
            o = self.o_norm(o)
        if z is not None:
            o = o * torch.sigmoid(z)
        return self.o_proj(o)

    def _with_state(self, q, k, v, g, cache: RecurrentState):
        if q.shape[1] == 1:
            o, state = lightning_attn_decode(q[:, 0], k[:, 0], v[:, 0], g, cache.state_BHDD)
            o = o[:, None]
        else:
            o, state = lightning_attn(q, k, v, g, initial_state=cache.state_BHDD, output_final_state=True)
        cache.state_BHDD.copy_(state)
        return o

    def new_cache(self, batch, device, dtype):
        D = self.head_dim
        return RecurrentState(torch.zeros(batch, self.heads, D, D, device=device, dtype=torch.float32))

    def cache_bytes(self, dtype_bytes):
        return 0, self.heads * self.head_dim * self.head_dim * 4  # the fp32 state, whatever the context
