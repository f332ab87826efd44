"""The `infllm_v2` mixer: GQA attention, dense below dense_len, trainable block-sparse above (SPEC §2).

Zero extra parameters: the same q/k/v/o projections as a dense layer (plus the optional QK-norm and gate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, PositiveInt, model_validator

from hyloom.hookspecs import hookimpl
from hyloom.kernels.infllm_v2 import (SparseConfig, block_sparse_attn, compress_keys, infllm_v2_attn,
                                      infllm_v2_decode, select_blocks, update_compressed_keys)
from hyloom.mixer import MixerCapabilities, MixerContext
from hyloom.plugins.transformer.attention import GroupedQKV


class InfLLMv2Config(BaseModel):
    heads: PositiveInt
    kv_heads: PositiveInt = Field(2, description="key/value heads; the G = heads/kv_heads heads of a group share a selection")
    head_dim: PositiveInt | None = Field(None, description="default: d_model // heads")
    qk_norm: bool = Field(False, description="per-head RMSNorm on q and k")
    gate: bool = Field(False, description="sigmoid output gate: o * sigmoid(x W_g) before W_o")
    norm_eps: float = Field(1e-6, gt=0)
    block_size: PositiveInt = Field(64, description="tokens per selectable K/V block")
    kernel_size: PositiveInt = Field(32, description="keys averaged into one compressed key")
    kernel_stride: PositiveInt = Field(16, description="distance between compressed keys")
    topk: PositiveInt = Field(64, description="blocks chosen by score, besides the local window")
    init_blocks: int = Field(1, ge=0, description="leading blocks always attended")
    window: PositiveInt = Field(2048, description="local window in tokens, always attended")
    dense_len: PositiveInt = Field(8192, description="below this key length the layer is dense causal attention")
    lse_kernel_size: int = Field(0, ge=0, description="the paper's LSE approximation: softmax normaliser over coarse "
                                 "kernels of this size (128 in the paper) instead of a first pass; 0: exact")
    lse_kernel_stride: int = Field(0, ge=0, description="stride of those coarse kernels (64 in the paper)")

    @model_validator(mode="after")
    def _sizes(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.block_size % self.kernel_stride or self.kernel_size % self.kernel_stride:
            raise ValueError("block_size and kernel_size must be multiples of kernel_stride")
        self.sparse()  # SparseConfig checks the rest of the block arithmetic
        return self

    def sparse(self) -> SparseConfig:
        return SparseConfig(block_size=self.block_size, kernel_size=self.kernel_size,
                            kernel_stride=self.kernel_stride, topk=self.topk, init_blocks=self.init_blocks,
                            window=self.window, dense_len=self.dense_len, lse_kernel_size=self.lse_kernel_size,
                            lse_kernel_stride=self.lse_kernel_stride,
                            # a block's score is the max over the kernels overlapping it (5, 4, 1 by default)
                            pool_window=(self.block_size + self.kernel_size) // self.kernel_stride - 1,
                            pool_stride=self.block_size // self.kernel_stride,
                            pool_padding=self.kernel_size // self.kernel_stride - 1)


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
    capabilities = MixerCapabilities(family="sparse", causal=True, bidirectional=False, decode=True, varlen=True)

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


@hookimpl
def hyloom_register_mixers(register):
    register("infllm_v2", lambda cfg, layer, model: InfLLMv2(cfg, model.d_model), config=InfLLMv2Config,
             capabilities=InfLLMv2.capabilities,
             summary="InfLLM-V2: dense below dense_len, trainable block-sparse GQA attention above",
             example={"type": "infllm_v2", "heads": 4, "kv_heads": 2, "head_dim": 16, "block_size": 4,
                      "kernel_size": 4, "kernel_stride": 2, "topk": 2, "window": 4, "dense_len": 4})
