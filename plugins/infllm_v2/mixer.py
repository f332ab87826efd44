"""The InfLLM-V2 attention layer and its decode cache (its config and registration: hyloom.plugins.infllm_v2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hyloom.kernels.infllm_v2 import (SparseConfig, block_sparse_attn, compress_keys, infllm_v2_attn,
                                      infllm_v2_decode, select_blocks, update_compressed_keys)
from hyloom.mixer import MixerContext
from hyloom.plugins.infllm_v2 import CAPABILITIES, InfLLMv2Config
from hyloom.plugins.transformer.attention import GroupedQKV


class SparseKVCache:
    """Per-row keys, values and compressed keys, [B, S, Hkv, D]; rows may hold different numbers of real
    tokens (left-padded prompts), since block boundaries count real tokens only."""

    def __init__(self, batch, kv_heads, head_dim, cfg: SparseConfig, device, dtype):
        self.cfg = cfg
        self.k = torch.zeros(batch, 0, kv_heads, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.kc = torch.zeros_like(self.k)
        self.lengths = [0] * batch

    def _grow(self, need: int):
        if need > self.k.shape[1]:
            cap = max(need, 2 * self.k.shape[1], 64)
            pad = (0, 0, 0, 0, 0, cap - self.k.shape[1])
            self.k, self.v = F.pad(self.k, pad), F.pad(self.v, pad)
            self.kc = F.pad(self.kc, (0, 0, 0, 0, 0, self.cfg.n_kernels(cap) - self.kc.shape[1]))

    def append(self, row: int, k_TKD, v_TKD) -> int:
        """Store a row's new keys/values; returns how many the row held before."""
        start = self.lengths[row]
        end = start + k_TKD.shape[0]
        self._grow(end)
        self.k[row, start:end], self.v[row, start:end] = k_TKD, v_TKD
        update_compressed_keys(self.k[row:row + 1], self.kc[row:row + 1], start, end, self.cfg)
        self.lengths[row] = end
        return start


class InfLLMv2(GroupedQKV):
    capabilities = CAPABILITIES

    def __init__(self, cfg: InfLLMv2Config, d_model: int):
        super().__init__(d_model, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.qk_norm, cfg.gate, cfg.norm_eps)
        self.sparse = cfg.sparse()

    def forward(self, x_BTD, ctx: MixerContext):
        q, k, v = self.project(x_BTD, ctx)
        if ctx.cache is None and ctx.valid_BS is None:
            o = infllm_v2_attn(q, k, v, self.sparse, cu_seqlens=ctx.cu_seqlens)
        else:
            o = self._rows(q, k, v, ctx)
        return self.output(o, x_BTD)

    def _rows(self, q, k, v, ctx):
        """Row by row over the real tokens only; padding rows of the output stay zero."""
        B, T = q.shape[:2]
        cache = ctx.cache or self.new_cache(B, q.device, k.dtype)
        valid = ctx.valid_BS[:, -T:] if ctx.valid_BS is not None else torch.ones(B, T, dtype=torch.bool, device=q.device)
        o = torch.zeros_like(q)
        for row in range(B):
            keep = valid[row]
            start = cache.append(row, k[row, keep], v[row, keep])
            o[row, keep] = self._attend(q[row:row + 1, keep], cache, row, start)[0]
        return o

    def _attend(self, q_1THD, cache: SparseKVCache, row: int, q_offset: int):
        n = cache.lengths[row]
        k_all, v_all = cache.k[row:row + 1, :n], cache.v[row:row + 1, :n]
        if q_1THD.shape[1] == 1:
            kc = cache.kc[row:row + 1]
            return infllm_v2_decode(q_1THD[:, 0], k_all, v_all, kc, n, self.sparse)[:, None]
        if q_offset == 0:
            return infllm_v2_attn(q_1THD, k_all, v_all, self.sparse)
        if n < self.sparse.dense_len:  # a later prefill chunk, dense: causal with the queries at the end
            every = torch.arange(self.sparse.n_blocks(n), device=q_1THD.device, dtype=torch.int32)
            idx = every.expand(1, self.kv_heads, q_1THD.shape[1], every.numel())
            return block_sparse_attn(q_1THD, k_all, v_all, idx, self.sparse.block_size, q_offset=q_offset)
        idx = select_blocks(q_1THD, compress_keys(k_all, self.sparse), self.sparse, q_offset=q_offset)
        forced = (self.sparse.init_blocks, self.sparse.window // self.sparse.block_size)  # selection guarantees them
        return block_sparse_attn(q_1THD, k_all, v_all, idx, self.sparse.block_size, q_offset=q_offset, forced=forced)

    def new_cache(self, batch, device, dtype):
        return SparseKVCache(batch, self.kv_heads, self.head_dim, self.sparse, device, dtype)

    def cache_bytes(self, dtype_bytes):
        kv = 2 * self.kv_heads * self.head_dim * dtype_bytes
        return kv + self.kv_heads * self.head_dim * dtype_bytes / self.sparse.kernel_stride, 0
