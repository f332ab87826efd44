"""Softmax attention: GQA, optional sliding window, QK-norm and sigmoid output gate, KV cache, SDPA."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from hyloom.mixer import Mixer, MixerContext
from hyloom.plugins.transformer.config import ATTENTION, AttentionConfig
from hyloom.plugins.transformer.kv_cache import KVCache
from hyloom.plugins.transformer.norm import RMSNorm


def _weighted_values(p_BKGS, v_BKSD):
    """p @ v with the long S axis cut into pieces that run as one batched product each (a single product over
    S would leave most of the GPU idle at decode, where G is a handful of rows); fp32 sum of the pieces."""
    B, K, G, S = p_BKGS.shape
    piece = math.gcd(S, 1024)
    if S == piece:
        return p_BKGS @ v_BKSD
    n = S // piece
    parts = p_BKGS.reshape(B, K, G, n, piece).transpose(2, 3) @ v_BKSD.reshape(B, K, n, piece, -1)
    return parts.float().sum(2).to(v_BKSD.dtype)


def default_head_dim(d_model: int, heads: int) -> int:
    """d_model // heads, when heads split d_model evenly (a remainder would silently narrow every head, and more
    heads than d_model would leave none)."""
    if d_model % heads:
        raise ValueError(f"heads ({heads}) must divide d_model ({d_model}) when head_dim is not given; "
                         "set head_dim, or pick heads that divide d_model")
    return d_model // heads


class GroupedQKV(Mixer):
    """The projections every GQA attention layer has — softmax attention and InfLLM-V2 share them, which is
    what lets a dense checkpoint become a sparse one with no new parameters: q/k/v/o, optional QK-norm before
    the position encoding, optional sigmoid output gate."""

    def __init__(self, d_model: int, heads: int, kv_heads: int | None, head_dim: int | None, qk_norm: bool,
                 gate: bool, eps: float):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.head_dim = head_dim or default_head_dim(d_model, heads)
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        self.q_proj = nn.Linear(d_model, H * D, bias=False)
        self.k_proj = nn.Linear(d_model, Hkv * D, bias=False)
        self.v_proj = nn.Linear(d_model, Hkv * D, bias=False)
        self.o_proj = nn.Linear(H * D, d_model, bias=False)
        self.q_norm = RMSNorm(D, eps) if qk_norm else None
        self.k_norm = RMSNorm(D, eps) if qk_norm else None
        self.g_proj = nn.Linear(d_model, H * D, bias=False) if gate else None

    def project(self, x_BTD, ctx: MixerContext):
        """q [B, T, H, D] and k, v [B, T, Hkv, D], normalised and position-encoded."""
        B, T, _ = x_BTD.shape
        q = self.q_proj(x_BTD).view(B, T, self.heads, self.head_dim)
        k = self.k_proj(x_BTD).view(B, T, self.kv_heads, self.head_dim)
        v = self.v_proj(x_BTD).view(B, T, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = ctx.position.apply(q, k, ctx.pos_BT)
        return q, k, v

    def output(self, o_BTHD, x_BTD):
        # not under hyloom.recompute.keep_products: it would keep o_proj's output, which no backward needs, to
        # save the gate's sigmoid and product; without a gate that is pure cost, with one at best even
        o = o_BTHD.reshape(*x_BTD.shape[:2], self.heads * self.head_dim)
        if self.g_proj is not None:
            o = o * torch.sigmoid(self.g_proj(x_BTD))
        return self.o_proj(o)


class Attention(GroupedQKV):
    capabilities = ATTENTION
    static_decode = True

    def __init__(self, cfg: AttentionConfig, d_model: int):
        super().__init__(d_model, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.qk_norm, cfg.gate, cfg.norm_eps)
        self.window = cfg.window

    def forward(self, x_BTD, ctx: MixerContext):
        T = x_BTD.shape[1]
        q, k, v = (t.transpose(1, 2) for t in self.project(x_BTD, ctx))  # [B, H, T, D]
        if ctx.slot_1 is not None:
            return self.output(self._static_step(q, k, v, ctx).transpose(1, 2), x_BTD)
        if ctx.cache is not None:
            k, v = ctx.cache.append(k, v)
        S = k.shape[2]
        gqa = self.kv_heads != self.heads
        plain = ctx.valid_BS is None and self.window is None and ctx.cu_seqlens is None
        if plain and ctx.causal and 1 < T < S:  # a later prefill chunk: its queries are the last T of S keys
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, S), enable_gqa=gqa)
        else:
            mask = self._mask(ctx, T, S, x_BTD.device)
            is_causal = mask is None and ctx.causal and T > 1
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
        return self.output(o.transpose(1, 2), x_BTD)

    def _static_step(self, q_BH1D, k_BK1D, v_BK1D, ctx: MixerContext):
        """One decode token over the whole preallocated cache, unwritten slots masked out: the same shapes at
        every step, nothing read back to the host (see MixerContext.slot_1)."""
        cache = ctx.cache
        cache.write_at(ctx.slot_1, k_BK1D, v_BK1D)
        B, H, _, D = q_BH1D.shape
        Hkv, S = self.kv_heads, cache.capacity
        allowed_BS = ctx.valid_BS
        if self.window is not None:
            allowed_BS = allowed_BS & (ctx.slot_1 - torch.arange(S, device=q_BH1D.device) < self.window)
        q_BKGD = q_BH1D.reshape(B, Hkv, H // Hkv, D)  # query head h reads KV head h // G, as SDPA's GQA does
        scores = (q_BKGD @ cache.k.transpose(2, 3)).float() * D ** -0.5
        scores = scores.masked_fill(~allowed_BS[:, None, None, :], float("-inf"))
        o = _weighted_values(scores.softmax(-1).to(cache.v.dtype), cache.v)
        return o.reshape(B, H, 1, D)

    def _mask(self, ctx: MixerContext, T: int, S: int, device) -> torch.Tensor | None:
        """Boolean [B|1, 1, T, S] mask, or None when plain causal (or full) attention is exact."""
        plain = ctx.valid_BS is None and self.window is None and ctx.cu_seqlens is None
        if plain and (S == T or T == 1 or not ctx.causal):
            return None
        q_idx = torch.arange(S - T, S, device=device)[:, None]  # queries are the last T of S keys
        k_idx = torch.arange(S, device=device)[None, :]
        allowed = torch.ones(T, S, dtype=torch.bool, device=device)
        if ctx.causal:
            allowed &= k_idx <= q_idx
        if self.window is not None:
            allowed &= (q_idx - k_idx).abs() < self.window
        allowed = allowed[None, None]
        if ctx.cu_seqlens is not None:
            seq = torch.bucketize(torch.arange(S, device=device), ctx.cu_seqlens[1:], right=True)
            allowed = allowed & (seq[S - T:, None] == seq[None, :])[None, None]
        if ctx.valid_BS is not None:
            allowed = allowed & ctx.valid_BS[:, None, None, :]
        # A padding query may have no real key; let every query see itself so no row is empty (an empty row
        # gives NaN, and NaN values poison real rows even at zero weight).
        return allowed | (q_idx == k_idx)[None, None]

    def new_cache(self, batch, device, dtype):
        # Under autocast every read of the cache is a bf16/fp16 matmul: storing the keys and values in that dtype
        # halves the cache (fp32 weights, as in GRPO rollouts) and spares a cast of it at every decode step
        device_type = torch.device(device).type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        return KVCache(batch, self.kv_heads, self.head_dim, device, dtype)

    def cache_bytes(self, dtype_bytes):
        return 2 * self.kv_heads * self.head_dim * dtype_bytes, 0
