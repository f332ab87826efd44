"""The InfLLM-V2 attention layer and its decode cache (its config and registration: hyloom.plugins.infllm_v2)."""

from __future__ import annotations

import torch

from hyloom.kernels.infllm_v2 import (SparseConfig, block_sparse_attn, infllm_v2_attn, infllm_v2_decode,
                                      infllm_v2_decode_static, select_blocks, update_compressed_keys, uses_reference,
                                      write_decode_kv)
from hyloom.mixer import MixerContext
from hyloom.plugins.infllm_v2 import CAPABILITIES, InfLLMv2Config
from hyloom.plugins.transformer.attention import GroupedQKV


class SparseKVCache:
    """Per-row keys, values and compressed keys in preallocated buffers [B, capacity, Hkv, D] (compressed:
    [B, n_kernels(capacity), Hkv, D]); rows may hold different numbers of real tokens (left-padded prompts),
    since block boundaries count real tokens only. `reserve` sizes the buffers up front; `append` grows them by
    doubling when it must. The lengths are kept twice: `lengths` on the host for prefill, `lens_B` (int32 [B])
    on the device for static decode steps (`write_step`), which a CUDA graph replays without Python; `advance`
    brings the host's copy along after them."""

    def __init__(self, batch, kv_heads, head_dim, cfg: SparseConfig, device, dtype):
        self.cfg = cfg
        self.k = torch.zeros(batch, 0, kv_heads, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.kc = torch.zeros_like(self.k)
        self.lengths = [0] * batch
        self.lens_B = torch.zeros(batch, dtype=torch.int32, device=device)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def reserve(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return
        old, held = (self.k, self.v, self.kc), max(self.lengths)
        self.k = old[0].new_zeros(old[0].shape[0], capacity, *old[0].shape[2:])
        self.v = torch.zeros_like(self.k)
        self.kc = old[2].new_zeros(old[2].shape[0], self.cfg.n_kernels(capacity), *old[2].shape[2:])
        self.k[:, :held], self.v[:, :held] = old[0][:, :held], old[1][:, :held]
        kernels = self.cfg.n_kernels(held)
        self.kc[:, :kernels] = old[2][:, :kernels]

    def append(self, rows: slice, k_RTKD, v_RTKD) -> int:
        """Store new keys/values for `rows` (which hold the same number of tokens); returns that number."""
        start = self.lengths[rows.start]
        end = start + k_RTKD.shape[1]
        if end > self.capacity:
            self.reserve(max(end, 2 * self.capacity, 64))
        self.k[rows, start:end], self.v[rows, start:end] = k_RTKD, v_RTKD
        update_compressed_keys(self.k[rows], self.kc[rows], start, end, self.cfg)
        for row in range(*rows.indices(len(self.lengths))):
            self.lengths[row] = end
        self.lens_B[rows] = end
        return start

    def write_step(self, k_BKD, v_BKD) -> None:
        """A static decode step's new key and value of every row, at its own length (the capacity has room:
        ModelCache.reserve runs before the step); lens_B moves on by one on the device."""
        write_decode_kv(self.k, self.v, self.kc, self.lens_B, k_BKD, v_BKD, self.cfg)

    def advance(self, n: int) -> None:
        """The host's lengths after n static decode steps (hyloom.decode calls it after each step)."""
        self.lengths = [length + n for length in self.lengths]


class InfLLMv2(GroupedQKV):
    capabilities = CAPABILITIES
    static_decode = True  # a decode step keeps its lengths on the device: see _step

    def __init__(self, cfg: InfLLMv2Config, d_model: int):
        super().__init__(d_model, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.qk_norm, cfg.gate, cfg.norm_eps)
        self.sparse = cfg.sparse()
        self.first_chunk_min = self.sparse.dense_len  # dense or sparse goes by the keys a call sees

    def forward(self, x_BTD, ctx: MixerContext):
        return self.decode_post(self.decode_core(*self.decode_pre(x_BTD, ctx), ctx), x_BTD)

    # The three parts of a call (hyloom.decode's hook for a mixer whose decode step is not static; this one's is,
    # so its whole layer goes into the decode step's CUDA graph).
    def decode_pre(self, x_BTD, ctx: MixerContext):
        return self.project(x_BTD, ctx)

    def decode_core(self, q, k, v, ctx: MixerContext):
        if ctx.slot_1 is not None:  # a static decode step (T == 1, every row's token real)
            return self._step(q, k, v, ctx.cache)
        if ctx.cache is None and ctx.valid_BS is None:
            return infllm_v2_attn(q, k, v, self.sparse, cu_seqlens=ctx.cu_seqlens)
        if ctx.valid_BS is None or q.shape[1] == 1:
            return self._runs(q, k, v, ctx.cache or self.new_cache(q.shape[0], q.device, k.dtype))
        return self._rows(q, k, v, ctx)

    def decode_post(self, o_BTHD, x_BTD):
        return self.output(o_BTHD, x_BTD)

    def _step(self, q_B1HD, k_B1KD, v_B1KD, cache: SparseKVCache):
        """The decode step in static shapes: each row appends at its own device-side length, selects over all the
        capacity's kernels (those past its length masked) and attends; nothing is read back to the host."""
        cache.write_step(k_B1KD[:, 0], v_B1KD[:, 0])
        q_BHD = q_B1HD[:, 0].to(cache.k.dtype)  # as in _attend: the kernels take the cache's dtype
        o_BHD = infllm_v2_decode_static(q_BHD, cache.k, cache.v, cache.kc, cache.lens_B, self.sparse)
        return o_BHD[:, None].to(q_B1HD.dtype)

    def _runs(self, q, k, v, cache: SparseKVCache):
        """Every new token real (no padding in this call, or T == 1 outside a decode step): runs of neighbouring
        rows that hold the same number of tokens attend in one call (the whole batch, unless prompts were
        left-padded)."""
        B = q.shape[0]
        runs, first = [], 0
        for row in range(1, B + 1):
            if row == B or cache.lengths[row] != cache.lengths[first]:
                runs.append(slice(first, row))
                first = row
        if len(runs) == 1:
            return self._attend(q, cache, runs[0], cache.append(runs[0], k, v))
        o = torch.empty_like(q)
        for rows in runs:
            o[rows] = self._attend(q[rows], cache, rows, cache.append(rows, k[rows], v[rows]))
        return o

    def _rows(self, q, k, v, ctx):
        """A prefill with padding: row by row over the real tokens only; padding rows of the output stay zero."""
        B, T = q.shape[:2]
        cache = ctx.cache or self.new_cache(B, q.device, k.dtype)
        valid = ctx.valid_BS[:, -T:]
        o = torch.zeros_like(q)
        for row in range(B):
            keep = valid[row]
            if not bool(keep.any()):  # a chunk of nothing but this row's padding
                continue
            rows = slice(row, row + 1)
            start = cache.append(rows, k[rows, keep], v[rows, keep])
            o[row, keep] = self._attend(q[rows, keep], cache, rows, start)[0]
        return o

    def _attend(self, q_RTHD, cache: SparseKVCache, rows: slice, q_offset: int):
        # under autocast the queries are bf16 while the cache keeps the model's dtype; the kernels take one
        # dtype, and casting the few queries is cheaper than the whole cache
        dtype = q_RTHD.dtype
        return self._attend_cached(q_RTHD.to(cache.k.dtype), cache, rows, q_offset).to(dtype)

    def _attend_cached(self, q_RTHD, cache: SparseKVCache, rows: slice, q_offset: int):
        n = q_offset + q_RTHD.shape[1]
        k_all, v_all = cache.k[rows, :n], cache.v[rows, :n]
        if q_RTHD.shape[1] == 1:
            return infllm_v2_decode(q_RTHD[:, 0], cache.k[rows], cache.v[rows], cache.kc[rows], n,
                                    self.sparse)[:, None]
        if q_offset == 0:
            return infllm_v2_attn(q_RTHD, k_all, v_all, self.sparse)
        if n < self.sparse.dense_len:  # a later prefill chunk, dense: causal with the queries at the end
            every = torch.arange(self.sparse.n_blocks(n), device=q_RTHD.device, dtype=torch.int32)
            idx = every.expand(q_RTHD.shape[0], self.kv_heads, q_RTHD.shape[1], every.numel())
            return block_sparse_attn(q_RTHD, k_all, v_all, idx, self.sparse.block_size, q_offset=q_offset)
        # the cache's compressed keys are the kernels of k_all (kept by update_compressed_keys)
        idx = select_blocks(q_RTHD, cache.kc[rows, :self.sparse.n_kernels(n)], self.sparse, q_offset=q_offset)
        forced = (self.sparse.init_blocks, self.sparse.window // self.sparse.block_size)  # selection guarantees them
        return block_sparse_attn(q_RTHD, k_all, v_all, idx, self.sparse.block_size, q_offset=q_offset, forced=forced)

    def new_cache(self, batch, device, dtype):
        return SparseKVCache(batch, self.kv_heads, self.head_dim, self.sparse, device, dtype)

    def prefill_scratch_bytes(self, batch, chunk, total, dtype_bytes):
        """Memory one prefill chunk needs besides its activations (hyloom.inference): dense, K/V repeated over
        the query groups; sparse, the fp32 block scores of every chunk token against every block, and the picks.
        The PyTorch reference (CPU) materialises every query-key pair of the chunk, dense or sparse: the bool
        mask and three fp32 score tensors [B, H, chunk, total]."""
        sp = self.sparse
        if uses_reference(self.q_proj.weight):
            return batch * self.heads * chunk * total * 13
        if total < sp.dense_len:
            return 2 * batch * self.heads * total * self.head_dim * dtype_bytes
        return batch * self.kv_heads * chunk * (sp.n_blocks(total) + sp.k_total) * 4

    def cache_bytes(self, dtype_bytes):
        kv = 2 * self.kv_heads * self.head_dim * dtype_bytes
        return kv + self.kv_heads * self.head_dim * dtype_bytes / self.sparse.kernel_stride, 0
