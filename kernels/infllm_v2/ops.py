"""Public InfLLM-V2 operations: Triton on CUDA tensors, the PyTorch reference elsewhere.

backend=None picks by device; "torch" forces the reference; "triton" forces the kernels (on CPU tensors it
needs TRITON_INTERPRET=1, as the tests use it). The training path's Triton work runs as torch custom ops
(hyloom::infllm_v2_select, hyloom::infllm_v2_sparse_fwd / _bwd), which torch.compile keeps whole.
"""
import dataclasses
import os
from typing import Optional  # the custom ops' annotations: torch.library reads them

import torch
import torch.nn.functional as F

from . import naive
from .config import SparseConfig

try:
    import triton
    from . import triton_attn, triton_decode, triton_select, triton_tile
except ImportError:  # the package must import without triton; the reference path still works
    triton = None

LOG2E = 1.4426950408889634
# Launch settings, one dict per kernel (num_warps, num_stages, and for the dK/dV kernels the orientation of
# their products) plus tile sizes; bench/infllm_v2.py sweeps them.
TUNE = {"lse": {"num_warps": 4, "num_stages": 2}, "scores": {"num_warps": 4, "num_stages": 2},
        "fwd": {"num_warps": 2, "num_stages": 3}, "dq": {"num_warps": 2, "num_stages": 3},
        "dkdv": {"num_warps": 4, "num_stages": 2, "KEYS_AS_M": False}, "topk": {"num_warps": 4, "num_stages": 1},
        "local": {"num_warps": 8, "num_stages": 3}, "local_dq": {"num_warps": 8, "num_stages": 3},
        "local_dkdv": {"num_warps": 4, "num_stages": 2, "KEYS_AS_M": True},
        "select_rows": 128, "select_blocks": 16, "lse_kernels": 64, "lse_min_programs": 264,
        "dkdv_chunk": 16, "dkdv_rows": 64, "local_rows": 128, "local_dkdv_rows": 64,
        "triton_topk": True, "local_split": True,
        # > 0: the forward's scored picks run in token tiles of this many tokens (triton_tile; off by default)
        "tile_tokens": 0, "tile": {"num_warps": 4, "num_stages": 2},
        # the union preparation: one warp keeps the two reductions of each of its loop's passes within the warp
        "tile_unions": {"num_warps": 1}}
_empty = torch.empty  # every kernel output is allocated here; tests swap in NaN-filled buffers to catch unwritten cells


TRITON_ON_CPU = False  # let backend=None run the interpreter on CPU tensors too (bench --smoke sets it)


def uses_reference(x: torch.Tensor) -> bool:
    """Whether the layer's calls on tensors like `x` run the PyTorch reference of naive.py (no Triton for them)."""
    return not _use_triton(x, None)


def _use_triton(x: torch.Tensor, backend) -> bool:
    if backend == "torch":
        return False
    # On CPU the interpreter runs only when asked for: a test module that sets TRITON_INTERPRET=1 must not
    # send every other CPU test of the same pytest process through it (minutes instead of seconds).
    interpret = os.environ.get("TRITON_INTERPRET") == "1" and (backend == "triton" or TRITON_ON_CPU)
    usable = triton is not None and (x.is_cuda or interpret)
    if backend == "triton" and not usable:
        raise RuntimeError("backend='triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1)")
    return usable


def _pow2(n: int, at_least: int = 1) -> int:
    return max(at_least, 1 << (n - 1).bit_length())


def _before(counts: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sum: where each sequence's share starts."""
    return torch.cumsum(counts, 0) - counts


class _Packed:
    """Packed sequences (cu_seqlens, batch of 1) as the varlen kernels see them. Each launch gets the sequence
    table (int64 [N, SEQ_COLS]: start, length, first kernel, first block score, window blocks) and a table of
    (sequence, index) pairs, one per program. Both are built here with tensor ops on the host from one copy of
    cu_seqlens, so nothing loops over the sequences in Python. A sequence of >= dense_len tokens is sparse; a
    shorter one is dense: its window spans all its blocks, so the dense tiles do all of its attention."""

    def __init__(self, cu_seqlens: torch.Tensor, T: int, dense_len: int, block_size: int, win_blocks: int):
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError(f"cu_seqlens must be int offsets [N + 1], got {cu_seqlens.dtype} "
                             f"{tuple(cu_seqlens.shape)}")
        cu = cu_seqlens.to("cpu", torch.int64)
        if cu[0] != 0 or cu[-1] != T or (cu[1:] < cu[:-1]).any():
            shown = cu.tolist() if cu.numel() <= 12 else cu[:6].tolist() + ["..."] + cu[-6:].tolist()
            raise ValueError(f"cu_seqlens must rise from 0 to the packed length {T}, got {shown}")
        self.device = cu_seqlens.device
        self.start, self.length = cu[:-1], cu[1:] - cu[:-1]
        self.sparse = self.length >= dense_len
        self.n_blocks = -(-self.length // block_size)
        self.win = torch.where(self.sparse, win_blocks, self.n_blocks)

    def seqs(self, length=None, kernels=None, scores=None) -> torch.Tensor:
        """The sequence table on the device; kernels and scores: per-sequence counts, stored as offsets."""
        zero = torch.zeros_like(self.start)
        cols = (self.start, self.length if length is None else length,
                zero if kernels is None else _before(kernels), zero if scores is None else _before(scores), self.win)
        return torch.stack(cols, 1).to(self.device)

    def table(self, counts: torch.Tensor, longest_first=False):
        """(entries, int32 [entries, 2] (sequence, index < count) on the device)."""
        seq = torch.repeat_interleave(torch.arange(counts.numel()), counts)
        index = torch.arange(seq.numel()) - torch.repeat_interleave(_before(counts), counts)
        if longest_first:
            order = torch.argsort(index, descending=True, stable=True)
            seq, index = seq[order], index[order]
        return seq.numel(), torch.stack([seq, index], 1).to(self.device, torch.int32)

    def tiles(self, tile: int, length=None, longest_first=False):
        """Tiles of `tile` tokens of every sequence (of `length` tokens each if given, else all its tokens)."""
        return self.table(-(-(self.length if length is None else length) // tile), longest_first)

    def token_seq(self) -> torch.Tensor:
        """[T] the sequence of each packed token, on the device."""
        return torch.repeat_interleave(torch.arange(self.length.numel()), self.length).to(self.device)


def _launch(pack, T: int, tile: int):
    """(programs along grid axis 0, sequence table, program table): tiles of T tokens, or of each packed sequence."""
    if pack is None:
        return triton.cdiv(T, tile), None, None
    n, tab = pack.tiles(tile)
    return n, pack.seqs(), tab


def compress_keys(k_BTKD: torch.Tensor, cfg: SparseConfig, cu_seqlens=None) -> torch.Tensor:
    """[B, n_kernels, Hkv, D]: mean of each full kernel of keys (a strided view and a mean; no Triton needed).

    cu_seqlens (batch of 1, sequences packed along T): [1, sum of n_kernels(length), Hkv, D], each sequence's
    kernels from its own first token, the sequences one after another.
    """
    if cu_seqlens is None:
        return naive.compress_keys_ref(k_BTKD, cfg)
    pack = _Packed(cu_seqlens, k_BTKD.shape[1], 0, cfg.block_size, 0)
    return _packed_kernels(k_BTKD, pack, cfg)


def _kernel_counts(pack: _Packed, size: int, stride: int) -> torch.Tensor:
    """Kernels of each sparse sequence (config.n_kernels of its length); a dense one needs none."""
    return torch.where(pack.sparse, torch.clamp(pack.length - size, min=-stride) // stride + 1, 0)


def _packed_kernels(k_1TKD, pack: _Packed, cfg: SparseConfig) -> torch.Tensor:
    """The kernels of the sparse sequences of the pack, as compress_keys_ref makes them for each alone."""
    counts = _kernel_counts(pack, cfg.kernel_size, cfg.kernel_stride)
    j = torch.arange(int(counts.sum())) - torch.repeat_interleave(_before(counts), counts)
    first = torch.repeat_interleave(pack.start, counts) + j * cfg.kernel_stride
    rows = (first[:, None] + torch.arange(cfg.kernel_size)).to(k_1TKD.device)
    windows = k_1TKD[:, rows].permute(0, 1, 3, 4, 2)  # [1, n, Hkv, D, kernel_size], like the reference's unfold
    return windows.to(torch.float32, memory_format=torch.contiguous_format).mean(-1).to(k_1TKD.dtype)


def _packed_coarse_keys(kc_1NKD, pack: _Packed, cfg: SparseConfig):
    """(coarse kernels of each sparse sequence, as naive.coarse_keys makes them from its fine kernels alone,
    their counts per sequence)."""
    fine = _kernel_counts(pack, cfg.kernel_size, cfg.kernel_stride)
    counts = _kernel_counts(pack, cfg.lse_kernel_size, cfg.lse_kernel_stride)
    j = torch.arange(int(counts.sum())) - torch.repeat_interleave(_before(counts), counts)
    first = torch.repeat_interleave(_before(fine), counts) + j * (cfg.lse_kernel_stride // cfg.kernel_stride)
    parts = torch.arange(cfg.lse_kernel_size // cfg.kernel_size) * (cfg.kernel_size // cfg.kernel_stride)
    Hkv, D = kc_1NKD.shape[2:]
    rows = (first[:, None] + parts).flatten().to(kc_1NKD.device)
    coarse = kc_1NKD.float()[:, rows].view(1, -1, parts.numel(), Hkv, D).mean(2).to(kc_1NKD.dtype)
    return coarse, counts


def update_compressed_keys(k_cache, kc_cache, prev_len: int, cache_len: int, cfg: SparseConfig) -> int:
    """Write the kernels completed by keys prev_len .. cache_len-1 into kc_cache; returns the kernel count.

    A new kernel appears every kernel_stride tokens once kernel_size keys exist; trailing keys wait uncompressed.
    """
    n_old, n_new = cfg.n_kernels(prev_len), cfg.n_kernels(cache_len)
    if n_new > n_old:
        start = n_old * cfg.kernel_stride
        stop = (n_new - 1) * cfg.kernel_stride + cfg.kernel_size
        kc_cache[:, n_old:n_new] = naive.compress_keys_ref(k_cache[:, start:stop], cfg)
    return n_new


def update_compressed_keys_at(k_cache, kc_cache, lens_B, cfg: SparseConfig) -> None:
    """A static decode step's update_compressed_keys: the kernel ending at each row's last key (lens_B - 1), if one
    completes there, into kc_cache. It is computed for every row and written only where it completes (a masked
    write), so no host branch and no length on the host: a CUDA graph can replay it."""
    if kc_cache.shape[1] == 0:  # the capacity holds no whole kernel
        return
    rows = torch.arange(k_cache.shape[0], device=k_cache.device)
    first = lens_B.long() - cfg.kernel_size  # the first key of the kernel that would end at the last key
    completes = (first >= 0) & (first % cfg.kernel_stride == 0)
    first = first.clamp(min=0)
    keys_BWKD = k_cache[rows[:, None], first[:, None] + torch.arange(cfg.kernel_size, device=k_cache.device)]
    j = (first // cfg.kernel_stride).clamp(max=kc_cache.shape[1] - 1)
    mean = keys_BWKD.float().mean(1).to(kc_cache.dtype)
    kc_cache[rows, j] = torch.where(completes[:, None, None], mean, kc_cache[rows, j])


def _check_decode_caches(k_cache, kc_cache, lens_B, cfg: SparseConfig, device) -> None:
    """The static decode's checks, on shapes, dtypes and devices only (nothing read from the device, so a CUDA
    graph can capture a caller): without them a kc_cache short of kernel slots takes the clamped index's writes
    in its last slot, and lengths of another dtype or device fail deep in a kernel, or not at all."""
    B, capacity = k_cache.shape[:2]
    if kc_cache.shape[1] < cfg.n_kernels(capacity):
        raise ValueError(f"kc_cache has {kc_cache.shape[1]} kernel slots; a capacity of {capacity} keys needs "
                         f"cfg.n_kernels({capacity}) = {cfg.n_kernels(capacity)}")
    if lens_B.shape != (B,) or lens_B.dtype != torch.int32 or lens_B.device != torch.device(device):
        raise ValueError(f"lens_B must be int32 [{B}] on {device}, not {str(lens_B.dtype).removeprefix('torch.')} "
                         f"{list(lens_B.shape)} on {lens_B.device}")


def write_decode_kv(k_cache, v_cache, kc_cache, lens_B, k_BKD, v_BKD, cfg: SparseConfig) -> None:
    """A static decode step's append: each row's new key and value at index lens_B[row] of the caches (which must
    have room), lens_B += 1 in place, then the compressed keys (update_compressed_keys_at)."""
    _check_decode_caches(k_cache, kc_cache, lens_B, cfg, k_cache.device)
    rows = torch.arange(k_cache.shape[0], device=k_cache.device)
    at = lens_B.long()
    k_cache[rows, at] = k_BKD.to(k_cache.dtype)  # under autocast the new keys may be bf16, the cache fp32
    v_cache[rows, at] = v_BKD.to(v_cache.dtype)
    lens_B.add_(1)
    update_compressed_keys_at(k_cache, kc_cache, lens_B, cfg)


def select_blocks(q_BTHD, kc_BNKD, cfg: SparseConfig, scale=None, q_offset=0, backend=None) -> torch.Tensor:
    """[B, Hkv, T, k_total] int32 selected blocks (ascending, -1 last) for queries at q_offset + 0..T-1."""
    q_BTHD, kc_BNKD = q_BTHD.detach(), kc_BNKD.detach()  # selection is discrete: no gradient
    if not _use_triton(q_BTHD, backend):
        return naive.select_blocks_ref(q_BTHD, kc_BNKD, cfg, scale, q_offset)
    scale = q_BTHD.shape[-1] ** -0.5 if scale is None else scale
    return select_op(q_BTHD, kc_BNKD, list(dataclasses.astuple(cfg)), float(scale), q_offset)


@torch.library.custom_op("hyloom::infllm_v2_select", mutates_args=())
def select_op(q: torch.Tensor, kc: torch.Tensor, cfg: list[int], scale: float, q_offset: int,
              cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """select_blocks on the Triton kernels; cfg: the SparseConfig's fields in order (an op takes no dataclass).

    cu_seqlens (batch of 1, q_offset 0): kc is then the packed *keys* [1, T, Hkv, D], compressed here per
    sequence; every sequence selects on its own (positions, kernels and blocks from its first token); the
    tokens of a sequence shorter than dense_len get only their init blocks (see sparse_fwd_op).
    """
    sparse = SparseConfig(*cfg)
    if cu_seqlens is not None:
        return _select_packed(q.contiguous(), kc, sparse, scale, cu_seqlens)
    scores = block_scores(q, kc, sparse, scale, q_offset)
    return topk_blocks(scores, sparse.k_total, backend="triton")


@select_op.register_fake
def _(q, kc, cfg, scale, q_offset, cu_seqlens=None):
    B, T, H, _ = q.shape
    return q.new_empty((B, kc.shape[2], T, SparseConfig(*cfg).k_total), dtype=torch.int32)


def _select_packed(q, k, cfg: SparseConfig, scale: float, cu_seqlens) -> torch.Tensor:
    """Stage 1 and top-k of every packed sequence in one launch each: [1, Hkv, T, k_total] int32."""
    _, T, H, D = q.shape
    Hkv = k.shape[2]
    G, GP = H // Hkv, _pow2(H // Hkv)
    pack = _Packed(cu_seqlens, T, cfg.dense_len, cfg.block_size, cfg.window // cfg.block_size)
    kc = _packed_kernels(k, pack, cfg).to(q.dtype).contiguous()
    n_scores = torch.where(pack.sparse, pack.length * pack.n_blocks, 0)
    scores = _empty(max(1, Hkv * int(n_scores.sum())), device=q.device, dtype=torch.float32)
    sparse_len = torch.where(pack.sparse, pack.length, 0)
    if sparse_len.any():
        block_t = max(1, min(TUNE["select_rows"] // GP, _pow2(int(sparse_len.max()))))
        fine = _kernel_counts(pack, cfg.kernel_size, cfg.kernel_stride)
        seqs = pack.seqs(length=sparse_len, kernels=fine, scores=Hkv * n_scores)
        if kc.shape[1] == 0:  # no kernel yet anywhere: pass 2 only writes forced / future marks
            lse = torch.full((1, 1, H, T), float("-inf"), device=q.device)
        elif not cfg.approx_lse:
            lse = _kernel_lse(q, kc, cfg.kernel_size, cfg.kernel_stride, 0, scale, block_t,
                              varlen=(seqs, *pack.tiles(block_t, length=sparse_len)))
        else:  # as block_scores: the coarse normaliser, the exact one for each sequence's first few queries
            kcc, coarse = _packed_coarse_keys(kc, pack, cfg)
            lse = _kernel_lse(q, kcc.contiguous(), cfg.lse_kernel_size, cfg.lse_kernel_stride, 0, scale, block_t,
                              varlen=(pack.seqs(length=sparse_len, kernels=coarse), *pack.tiles(block_t, length=sparse_len)))
            early = torch.clamp(sparse_len, max=cfg.lse_kernel_size - 1)
            _kernel_lse(q, kc, cfg.kernel_size, cfg.kernel_stride, 0, scale, block_t, out=lse[:1],
                        varlen=(pack.seqs(length=early, kernels=fine), *pack.tiles(block_t, length=early)))
        n_tiles, tab = pack.tiles(block_t, length=sparse_len, longest_first=True)
        pow2_stride = (cfg.pool_stride & (cfg.pool_stride - 1)) == 0
        triton_select._block_scores[(n_tiles, Hkv)](
            q, kc, lse, scores, T, 0, Hkv, 0, 0, scale * LOG2E, lse.shape[0],
            q.stride(0), q.stride(1), q.stride(2), kc.stride(0), kc.stride(1), kc.stride(2),
            lse.stride(0), lse.stride(1), lse.stride(2), 0, 0, 0, seqs, tab,
            G=G, GP=GP, BLOCK_T=block_t, BLOCK_B=TUNE["select_blocks"], D=D, KSIZE=cfg.kernel_size,
            KSTRIDE=cfg.kernel_stride, BS=cfg.block_size, POOL_W=cfg.pool_window, POOL_S=cfg.pool_stride,
            POOL_P=cfg.pool_padding, CONTIG_W=min(cfg.pool_stride, cfg.pool_window) if pow2_stride else 0,
            INIT=cfg.init_blocks, WIN_BLOCKS=cfg.window // cfg.block_size, VARLEN=True, **TUNE["scores"])
    else:
        seqs = pack.seqs()
    # top-k of every token (TUNE["triton_topk"] does not apply: the reference has no ragged rows)
    idx = _empty(1, Hkv, T, cfg.k_total, device=q.device, dtype=torch.int32)
    n_tok, tab = pack.tiles(1)
    if n_tok:
        max_blocks = int(torch.where(pack.sparse, pack.n_blocks, 0).max())
        triton_select._topk_blocks[(n_tok, Hkv)](
            scores, idx, 0, 0, idx.stride(2), seqs, tab, idx.stride(1), cfg.dense_len, K=cfg.k_total,
            K_P=_pow2(cfg.k_total), NB_P=_pow2(max(max_blocks, cfg.init_blocks), 16), VARLEN=True,
            BS=cfg.block_size, INIT=cfg.init_blocks, **TUNE["topk"])
    return idx


def topk_blocks(scores, k_total: int, backend=None) -> torch.Tensor:
    """Top-k_total blocks of each row of block scores (see naive.topk_blocks for the tie rule)."""
    if not _use_triton(scores, backend) or not TUNE["triton_topk"]:
        return naive.topk_blocks(scores, k_total)
    n_blocks = scores.shape[-1]
    rows = scores.reshape(-1, n_blocks)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    idx = _empty(*scores.shape[:-1], k_total, device=scores.device, dtype=torch.int32)
    if rows.shape[0]:
        triton_select._topk_blocks[(rows.shape[0],)](
            rows, idx, n_blocks, rows.stride(0), k_total, None, None, 0, 0, K=k_total, K_P=_pow2(k_total), NB_P=_pow2(n_blocks, 16),
            **TUNE["topk"])
    return idx


def block_scores(q_BTHD, kc_BNKD, cfg: SparseConfig, scale=None, q_offset=0) -> torch.Tensor:
    """Triton stage 1: [B, Hkv, T, n_blocks] fp32 pooled, group-summed scores (+inf forced, -inf future)."""
    q = q_BTHD.contiguous()
    kc = kc_BNKD.to(q.dtype).contiguous()
    B, T, H, D = q.shape
    N, Hkv = kc.shape[1], kc.shape[2]
    G = H // Hkv
    GP = _pow2(G)
    scale = D ** -0.5 if scale is None else scale
    n_blocks = cfg.n_blocks(q_offset + T)
    out = _empty(B, Hkv, T, n_blocks, device=q.device, dtype=torch.float32)
    block_t = max(1, min(TUNE["select_rows"] // GP, _pow2(T)))  # rows of a tile: tokens × heads
    if N == 0:  # no kernel yet: skip pass 1, pass 2 only writes forced / future marks
        lse = torch.full((1, B, H, T), float("-inf"), device=q.device)
    elif not cfg.approx_lse:
        lse = _kernel_lse(q, kc, cfg.kernel_size, cfg.kernel_stride, q_offset, scale, block_t)
    else:  # normaliser over coarse kernels; queries that see none of them yet keep the exact one
        lse = _kernel_lse(q, naive.coarse_keys(kc, cfg).contiguous(), cfg.lse_kernel_size, cfg.lse_kernel_stride,
                          q_offset, scale, block_t)
        early = min(T, max(0, cfg.lse_kernel_size - 1 - q_offset))
        if early:  # every split of the coarse pass left these rows at -inf, so split 0 may take the exact value
            _kernel_lse(q[:, :early], kc, cfg.kernel_size, cfg.kernel_stride, q_offset, scale, block_t,
                        out=lse[:1, :, :, :early])
    block_b = TUNE["select_blocks"]
    pow2_stride = (cfg.pool_stride & (cfg.pool_stride - 1)) == 0
    triton_select._block_scores[(triton.cdiv(T, block_t), B * Hkv)](
        q, kc, lse, out, T, N, Hkv, n_blocks, q_offset, scale * LOG2E, lse.shape[0],
        q.stride(0), q.stride(1), q.stride(2), kc.stride(0), kc.stride(1), kc.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2), out.stride(0), out.stride(1), out.stride(2), None, None,
        G=G, GP=GP, BLOCK_T=block_t, BLOCK_B=block_b, D=D, KSIZE=cfg.kernel_size, KSTRIDE=cfg.kernel_stride,
        BS=cfg.block_size, POOL_W=cfg.pool_window, POOL_S=cfg.pool_stride, POOL_P=cfg.pool_padding,
        CONTIG_W=min(cfg.pool_stride, cfg.pool_window) if pow2_stride else 0,
        INIT=cfg.init_blocks, WIN_BLOCKS=cfg.window // cfg.block_size, **TUNE["scores"])
    return out


def _kernel_lse(q, keys, ksize, kstride, q_offset, scale, block_t, out=None, varlen=None):
    """Pass 1: [splits, B, H, T] partial LSEs (log2 units) of q·keys*scale over the keys (kernels of ksize,
    kstride) each query sees; pass 2 merges the splits. When the tiles alone would leave most of the GPU idle
    (decode), the kernels are split among programs. out: write one split there instead.
    varlen = (sequence table, tiles, tile table): packed sequences (see _Packed), each over its own keys.
    """
    B, T, H, D = q.shape
    N, Hkv = keys.shape[1], keys.shape[2]
    seqs, n_tiles, tab = varlen if varlen else (None, triton.cdiv(T, block_t), None)
    tiles = max(1, n_tiles * B * Hkv)
    splits = max(1, min(TUNE["lse_min_programs"] // tiles, triton.cdiv(N, TUNE["lse_kernels"])))
    if out is None:
        out = _empty(splits, B, H, T, device=q.device, dtype=torch.float32)
    else:
        splits = 1
    if n_tiles:
        triton_select._kernel_lse[(n_tiles, B * Hkv, splits)](
            q, keys, out, T, N, Hkv, q_offset, scale * LOG2E,
            q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
            out.stride(0), out.stride(1), out.stride(2), seqs, tab,
            G=H // Hkv, GP=_pow2(H // Hkv), BLOCK_T=block_t, BLOCK_N=TUNE["lse_kernels"], D=D, KSIZE=ksize,
            KSTRIDE=kstride, VARLEN=varlen is not None, **TUNE["lse"])
    return out


def _sparse_fwd(q, k, v, idx, block_size, scale, q_offset, splits=1, local=None, pack=None, tile_tokens=None):
    """Launch the forward kernel(s); returns (o [B,T,H,D], lse [B,H,T] in log2 units).

    local = (init_blocks, window_blocks) says that idx holds those forced blocks (as select_blocks makes it):
    they then run as dense tiles in _local_fwd and _sparse_fwd only walks the remaining picks.
    pack (a _Packed, with local, q_offset 0, one split): every packed sequence attends within itself.
    tile_tokens (None: TUNE["tile_tokens"]; 0: off): the scored picks run in tiles of that many tokens over the
    union of their picks (triton_tile), the same o and lse; not for packs or split-K, which stay per token.
    """
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    GP = _pow2(G, 16)
    ksel = idx.shape[-1]
    if splits == 1:
        o = _empty(q.shape, device=q.device, dtype=q.dtype)
        lse = _empty(B, H, T, device=q.device, dtype=torch.float32)
        o_s, lse_s = o.unsqueeze(0), lse.unsqueeze(0)
    else:  # split-K over the block list (decode): fp32 partials merged by their LSE
        o_s = _empty(splits, B, T, H, D, device=q.device, dtype=torch.float32)
        lse_s = _empty(splits, B, H, T, device=q.device, dtype=torch.float32)
    o_in, extra = o_s, {}
    if local is not None and splits == 1:
        init_blocks, win_blocks = local
        o_in = _empty(q.shape, device=q.device, dtype=torch.float32)
        gp_local = _pow2(G)
        tm = max(1, TUNE["local_rows"] // gp_local)
        n_tiles, seqs, tab = _launch(pack, T, tm)
        triton_attn._local_fwd[(n_tiles, B * Hkv)](
            q, k, v, o_in, lse, T, Hkv, q_offset, scale * LOG2E,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o_in.stride(0), o_in.stride(1), o_in.stride(2),
            lse.stride(0), lse.stride(1), seqs, tab,
            G=G, GP=gp_local, D=D, BS=block_size, TM=tm, INIT=init_blocks, WIN_BLOCKS=win_blocks,
            VARLEN=pack is not None, **TUNE["local"])
        extra = dict(FROM_LOCAL=True, INIT=init_blocks, WIN_BLOCKS=win_blocks)
    tile_tokens = TUNE["tile_tokens"] if tile_tokens is None else tile_tokens
    if tile_tokens and splits == 1 and pack is None:
        _tile_fwd(q, k, v, idx, o_in, o, lse, block_size, scale, q_offset, local, tile_tokens)
        return o, lse
    n_tok, seqs, tab = _launch(pack, T, 1)
    triton_attn._sparse_fwd[(n_tok, B * Hkv, splits)](
        q, k, v, idx, o_in, o_s, lse_s, Hkv, q_offset, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), idx.stride(0), idx.stride(1), idx.stride(2),
        o_s.stride(0), o_s.stride(1), o_s.stride(2), o_s.stride(3), lse_s.stride(0), lse_s.stride(1), lse_s.stride(2),
        seqs, tab, G=G, GP=GP, D=D, BS=block_size, KSEL=ksel, KSEL_P=_pow2(ksel), SPLITS=splits,
        VARLEN=pack is not None, **extra, **TUNE["fwd"])
    if splits > 1:
        o = _empty(q.shape, device=q.device, dtype=q.dtype)
        lse = _empty(B, H, T, device=q.device, dtype=torch.float32)
        triton_attn._merge_splits[(T, B)](
            o_s, lse_s, o, lse, splits, o_s.stride(0), o_s.stride(1), o_s.stride(2), o_s.stride(3),
            lse_s.stride(0), lse_s.stride(1), lse_s.stride(2), o.stride(0), o.stride(1), o.stride(2),
            lse.stride(0), lse.stride(1), H=H, HP=_pow2(H), D=D)
    return o, lse


def _tile_fwd(q, k, v, idx, o_in, o, lse, block_size, scale, q_offset, local, tile_tokens: int):
    """_sparse_fwd's scored picks in tiles of tile_tokens tokens × the group's heads (at least 16 rows)."""
    if tile_tokens & (tile_tokens - 1) or not 0 < tile_tokens <= triton_tile.MAX_TILE_TOKENS:
        raise ValueError(f"tile_tokens must be a power of two <= {triton_tile.MAX_TILE_TOKENS}, not {tile_tokens}")
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    blocks, members, count = tile_unions(idx, tile_tokens, block_size, -(-k.shape[1] // block_size), q_offset,
                                         local, backend="triton")
    triton_tile._tile_fwd[(count.shape[1], B * Hkv)](
        q, k, v, blocks, members, count, o_in, o, lse, T, Hkv, q_offset, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), blocks.stride(0), blocks.stride(1), count.stride(0),
        o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
        G=G, GP=_pow2(G, 16 // tile_tokens), D=D, BS=block_size, TT=tile_tokens, FROM_LOCAL=local is not None,
        **TUNE["tile"])


def tile_unions(idx_BKTS, tile_tokens: int, block_size: int, n_key_blocks: int, q_offset=0, local=None,
                backend=None):
    """The sorted union of each tile's picks with its per-token bit masks: (blocks, members, count) as
    naive.tile_unions_ref returns them (the same values up to count; what lies past count differs), built by
    triton_tile._tile_unions_kernel where _use_triton says so, else by the reference. blocks and members share
    their strides (_tile_fwd takes one pair)."""
    if not _use_triton(idx_BKTS, backend):
        return naive.tile_unions_ref(idx_BKTS, tile_tokens, block_size, n_key_blocks, q_offset, local)
    B, Hkv, T, S = idx_BKTS.shape
    n_tiles = triton.cdiv(T, tile_tokens)
    W = max(1, min(tile_tokens * S, n_key_blocks))
    dev = idx_BKTS.device
    blocks = _empty(B * Hkv, n_tiles, W, device=dev, dtype=torch.int32)
    members = _empty(B * Hkv, n_tiles, W, device=dev, dtype=torch.int32)
    count = _empty(B * Hkv, n_tiles, device=dev, dtype=torch.int32)
    init_blocks, win_blocks = local if local is not None else (0, 0)
    triton_tile._tile_unions_kernel[(n_tiles, B * Hkv)](
        idx_BKTS, blocks, members, count, T, Hkv, q_offset, block_size, init_blocks, win_blocks, W,
        *idx_BKTS.stride(), blocks.stride(0), blocks.stride(1), count.stride(0),
        TT=tile_tokens, KSEL=S, KSEL_P=_pow2(S), LOCAL=local is not None, **TUNE["tile_unions"])
    return blocks, members, count


def _dkdv_work(idx, n_blocks: int, chunk: int, valid, pack=None):
    """Reverse the block lists: for each (b*Hkv+kvh, block), the query tokens whose valid picks hold it, in chunks.

    pack: the blocks of all packed sequences are numbered one after another (n_blocks is ignored); the work's
    blocks come back as (sequence, block in it) pairs and its tokens as positions in their sequence."""
    B, Hkv, T, S = idx.shape
    bk = torch.arange(B * Hkv, device=idx.device).view(B, Hkv, 1, 1)
    tok_T = torch.arange(T, device=idx.device)
    block_idx = idx.long()
    if pack is not None:
        n_blocks = int(pack.n_blocks.sum())
        tok_seq = pack.token_seq()
        tok_T = tok_T - pack.start.to(idx.device)[tok_seq]
        block_idx = block_idx + _before(pack.n_blocks).to(idx.device)[tok_seq].view(1, 1, T, 1)
    key = (bk * n_blocks + block_idx)[valid]
    tok = tok_T.to(torch.int32).view(1, 1, T, 1).expand(B, Hkv, T, S)[valid]
    key_sorted, order = torch.sort(key, stable=True)
    tok_list = tok[order].contiguous()
    counts = torch.bincount(key_sorted, minlength=B * Hkv * n_blocks)
    starts = torch.cumsum(counts, 0) - counts
    n_chunks = (counts + chunk - 1) // chunk
    work_key = torch.repeat_interleave(torch.arange(counts.numel(), device=idx.device), n_chunks)
    first_chunk = torch.cumsum(n_chunks, 0) - n_chunks
    chunk_no = torch.arange(work_key.numel(), device=idx.device) - first_chunk[work_key]
    lo = starts[work_key] + chunk_no * chunk
    hi = torch.minimum(lo + chunk, starts[work_key] + counts[work_key])
    as32 = lambda x: x.to(torch.int32).contiguous()
    work_blk = work_key % n_blocks
    if pack is not None:  # global block -> (sequence, block in it)
        block_seq = torch.repeat_interleave(torch.arange(pack.n_blocks.numel()), pack.n_blocks).to(idx.device)
        seq = block_seq[work_blk]
        work_blk = torch.stack([seq, work_blk - _before(pack.n_blocks).to(idx.device)[seq]], 1)
    return as32(work_key // n_blocks), as32(work_blk), as32(lo), as32(hi), tok_list


def _sparse_bwd(q, k, v, idx, o, lse, do, bs, scale, q_offset, local, pack=None):
    B, T, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G, GP = H // Hkv, _pow2(H // Hkv, 16)
    delta = (o.float() * do.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, T]
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2))
    dq = _empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
    dv = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
    picks = idx >= 0  # the (token, block) pairs left to the per-token kernels
    dq_in, extra = dq, {}
    if local is not None:  # forced blocks as dense tiles (see _sparse_fwd); the init blocks' dK/dV stay per token
        init_blocks, win_blocks = local
        dq_in = _empty(q.shape, device=q.device, dtype=torch.float32)
        gp_local = _pow2(G)
        tm = max(1, TUNE["local_rows"] // gp_local)
        n_tiles, seqs, tab = _launch(pack, T, tm)
        triton_attn._local_bwd_dq[(n_tiles, B * Hkv)](
            q, k, v, do, lse, delta, dq_in, T, Hkv, q_offset, scale * LOG2E, *strides, lse.stride(0), lse.stride(1),
            seqs, tab, G=G, GP=gp_local, D=D, BS=bs, TM=tm, INIT=init_blocks, WIN_BLOCKS=win_blocks,
            VARLEN=pack is not None, **TUNE["local_dq"])
        if pack is None:
            n_key_blocks, seqs, tab = -(-Tk // bs) - init_blocks, None, None
        else:
            n_key_blocks, tab = pack.table(torch.clamp(pack.n_blocks - init_blocks, min=0))
        if n_key_blocks > 0:
            tq = max(1, TUNE["local_dkdv_rows"] // gp_local)
            triton_attn._local_bwd_dkdv[(n_key_blocks, B * Hkv)](
                q, k, v, do, lse, delta, dk, dv, T, Tk, Hkv, q_offset, scale * LOG2E, scale, *strides,
                lse.stride(0), lse.stride(1), seqs, tab,
                G=G, GP=gp_local, D=D, BS=bs, TQ=tq, INIT=init_blocks, WIN_BLOCKS=win_blocks,
                VARLEN=pack is not None, **TUNE["local_dkdv"])
        pos_T = torch.arange(T, device=idx.device) + q_offset
        win_T = win_blocks
        if pack is not None:  # positions and windows of each token's own sequence
            tok_seq = pack.token_seq()
            pos_T = pos_T - pack.start.to(idx.device)[tok_seq]
            win_T = pack.win.to(idx.device)[tok_seq]
        window_lo = (pos_T // bs - win_T).clamp_min(init_blocks).view(1, 1, T, 1)
        picks = picks & (idx < window_lo)
        extra = dict(FROM_LOCAL=True, INIT=init_blocks, WIN_BLOCKS=win_blocks)
    ksel = idx.shape[-1]
    n_tok, seqs, tab = _launch(pack, T, 1)
    triton_attn._sparse_bwd_dq[(n_tok, B * Hkv)](
        q, k, v, do, lse, delta, idx, dq_in, dq, Hkv, q_offset, scale * LOG2E, scale, *strides,
        idx.stride(0), idx.stride(1), idx.stride(2), lse.stride(0), lse.stride(1), seqs, tab,
        G=G, GP=GP, D=D, BS=bs, KSEL=ksel, KSEL_P=_pow2(ksel), VARLEN=pack is not None, **extra, **TUNE["dq"])
    tq = max(1, TUNE["dkdv_rows"] // GP)
    work_bk, work_blk, lo, hi, tok_list = _dkdv_work(idx, -(-Tk // bs), TUNE["dkdv_chunk"] * tq, picks, pack)
    if work_bk.numel():
        triton_attn._sparse_bwd_dkdv[(work_bk.numel(),)](
            q, k, v, do, lse, delta, dk, dv, work_bk, work_blk, lo, hi, tok_list, Hkv, Tk, q_offset,
            scale * LOG2E, scale, *strides, lse.stride(0), lse.stride(1), seqs,
            G=G, GP=GP, D=D, BS=bs, TQ=tq, VARLEN=pack is not None, **TUNE["dkdv"])
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _attn_pack(q, idx, block_size, q_offset, local, cu_seqlens, dense_len):
    """The _Packed of a varlen attention op (None without cu_seqlens), after checking its arguments."""
    if cu_seqlens is None:
        return None
    if q.shape[0] != 1 or q_offset or not local:
        raise ValueError("varlen attention needs a batch of 1, q_offset 0 and local=(init_blocks, window_blocks)")
    return _Packed(cu_seqlens, q.shape[1], dense_len, block_size, local[1])


@torch.library.custom_op("hyloom::infllm_v2_sparse_fwd", mutates_args=())
def sparse_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, block_size: int, scale: float,
                  q_offset: int, local: Optional[list[int]], cu_seqlens: Optional[torch.Tensor] = None,
                  dense_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, H, D], lse [B, H, T] fp32 in log2 units); local: (init_blocks, window_blocks) or None.

    cu_seqlens (batch of 1, needs local): each packed sequence attends within itself, its blocks and positions
    counted from its first token; one of fewer than dense_len tokens attends densely (causal, all its keys),
    and its rows of idx need only hold its init blocks (as select_op makes them).
    """
    q, k, v, idx = q.contiguous(), k.contiguous(), v.contiguous(), idx.contiguous()
    pack = _attn_pack(q, idx, block_size, q_offset, local, cu_seqlens, dense_len)
    return _sparse_fwd(q, k, v, idx, block_size, scale, q_offset, local=tuple(local) if local else None, pack=pack)


@sparse_fwd_op.register_fake
def _(q, k, v, idx, block_size, scale, q_offset, local, cu_seqlens=None, dense_len=0):
    B, T, H, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("hyloom::infllm_v2_sparse_bwd", mutates_args=())
def sparse_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, do: torch.Tensor, block_size: int, scale: float, q_offset: int,
                  local: Optional[list[int]], cu_seqlens: Optional[torch.Tensor] = None,
                  dense_len: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of the block-sparse attention whose forward gave o and lse (cu_seqlens: as sparse_fwd_op)."""
    q, k, v, idx, o, do = (x.contiguous() for x in (q, k, v, idx, o, do.to(q.dtype)))
    pack = _attn_pack(q, idx, block_size, q_offset, local, cu_seqlens, dense_len)
    return _sparse_bwd(q, k, v, idx, o, lse.contiguous(), do, block_size, scale, q_offset,
                       tuple(local) if local else None, pack)


@sparse_bwd_op.register_fake
def _(q, k, v, idx, o, lse, do, block_size, scale, q_offset, local, cu_seqlens=None, dense_len=0):
    like = lambda x: torch.empty_like(x, memory_format=torch.contiguous_format)  # noqa: E731
    return like(q), like(k), like(v)


def _sparse_setup(ctx, inputs, output):
    q, k, v, idx, block_size, scale, q_offset, local, cu_seqlens, dense_len = inputs
    ctx.save_for_backward(q, k, v, idx, *output, cu_seqlens)
    ctx.args = (block_size, scale, q_offset, local)
    ctx.dense_len = dense_len


def _sparse_backward(ctx, do, _dlse):
    q, k, v, idx, o, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = sparse_bwd_op(q, k, v, idx, o, lse, do, *ctx.args, cu_seqlens, ctx.dense_len)
    return dq, dk, dv, None, None, None, None, None, None, None


sparse_fwd_op.register_autograd(_sparse_backward, setup_context=_sparse_setup)


def block_sparse_attn(q_BTHD, k_BTKD, v_BTKD, idx_BKTS, block_size: int, scale=None, backend=None, q_offset=0,
                      forced=None):
    """Causal attention of each query over the real K/V of its selected blocks; differentiable in q, k, v.

    forced = (init_blocks, window_blocks) promises that every row of idx holds its init and local blocks (as
    select_blocks guarantees); the forward then runs those as dense tiles. Without it any idx is fine.
    """
    scale = q_BTHD.shape[-1] ** -0.5 if scale is None else scale
    if not _use_triton(q_BTHD, backend):
        return naive.sparse_attn_ref(q_BTHD, k_BTKD, v_BTKD, idx_BKTS, block_size, scale, q_offset)
    local = list(forced) if forced is not None and TUNE["local_split"] else None
    o, _ = sparse_fwd_op(q_BTHD, k_BTKD, v_BTKD, idx_BKTS.to(torch.int32), block_size, float(scale), q_offset, local)
    return o


def dense_causal_attn(q_BTHD, k_BTKD, v_BTKD, scale=None):
    """Plain causal GQA attention through PyTorch SDPA (the layer below dense_len)."""
    q, k, v = (x.transpose(1, 2) for x in (q_BTHD, k_BTKD, v_BTKD))
    G = q.shape[1] // k.shape[1]
    if G > 1:  # repeat rather than enable_gqa: not every SDPA backend takes it
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(1, 2)


def _padded_dense(q_BTHD, k_BTKD, v_BTKD, spans, length: int, scale, backend):
    """Causal attention of the packed sequences spans (start, end) as one batch padded to length: the padding
    sits after every real token, so causal attention never lets a real query see it."""
    pad = lambda x, s, e: F.pad(x[0, s:e], (0, 0, 0, 0, 0, length - (e - s)))
    q, k, v = (torch.stack([pad(x, s, e) for s, e in spans]) for x in (q_BTHD, k_BTKD, v_BTKD))
    if backend == "torch":
        return naive.dense_causal_ref(q, k, v, scale)
    return dense_causal_attn(q, k, v, scale)


def infllm_v2_attn(q_BTHD, k_BTKD, v_BTKD, cfg: SparseConfig, scale=None, cu_seqlens=None, backend=None):
    """The whole layer. Dense causal attention when the key length is < dense_len, else compress -> select -> attend.

    cu_seqlens (int tensor [N+1], batch of 1, sequences packed along T): each sequence decides dense or sparse
    by its own length and runs as if alone. On Triton all sequences run together, two launches for selection
    and two for attention (each sequence's programs find their sequence in a table); the dense ones attend as
    dense tiles. Without Triton, per_sequence_attn.
    """
    if cu_seqlens is not None:
        if q_BTHD.shape[0] != 1:
            raise ValueError("cu_seqlens needs a batch of 1 with the sequences packed along T")
        if not _use_triton(q_BTHD, backend):
            return per_sequence_attn(q_BTHD, k_BTKD, v_BTKD, cfg, scale, cu_seqlens, backend)
        scale = q_BTHD.shape[-1] ** -0.5 if scale is None else float(scale)
        idx = select_op(q_BTHD.detach(), k_BTKD.detach(), list(dataclasses.astuple(cfg)), scale, 0, cu_seqlens)
        o, _ = sparse_fwd_op(q_BTHD, k_BTKD, v_BTKD, idx, cfg.block_size, scale, 0,
                             [cfg.init_blocks, cfg.window // cfg.block_size], cu_seqlens, cfg.dense_len)
        return o
    if k_BTKD.shape[1] < cfg.dense_len:
        if backend == "torch":
            return naive.dense_causal_ref(q_BTHD, k_BTKD, v_BTKD, scale)
        return dense_causal_attn(q_BTHD, k_BTKD, v_BTKD, scale)
    kc = compress_keys(k_BTKD, cfg)
    idx = select_blocks(q_BTHD, kc, cfg, scale, backend=backend)
    return block_sparse_attn(q_BTHD, k_BTKD, v_BTKD, idx, cfg.block_size, scale, backend,
                             forced=(cfg.init_blocks, cfg.window // cfg.block_size))


def per_sequence_attn(q_BTHD, k_BTKD, v_BTKD, cfg: SparseConfig, scale=None, cu_seqlens=None, backend=None):
    """infllm_v2_attn of packed sequences (batch of 1), one sequence at a time: each sparse one (>= dense_len
    keys) on its own, the dense ones as a few padded batches, one per power-of-two length bucket. The torch
    path of varlen, and the baseline the varlen kernels are checked and timed against."""
    bounds = cu_seqlens.tolist()
    spans = [(s, e) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    out = {}
    for s, e in spans:
        if e - s >= cfg.dense_len:
            out[s] = infllm_v2_attn(q_BTHD[:, s:e], k_BTKD[:, s:e], v_BTKD[:, s:e], cfg, scale, None, backend)
    buckets = {}
    for s, e in spans:
        if e - s < cfg.dense_len:
            buckets.setdefault(_pow2(e - s), []).append((s, e))
    for length, group in buckets.items():
        o = _padded_dense(q_BTHD, k_BTKD, v_BTKD, group, length, scale, backend)
        out.update({s: o[i:i + 1, :e - s] for i, (s, e) in enumerate(group)})
    return torch.cat([out[s] for s, _ in spans], dim=1) if spans else q_BTHD[:, :0].clone()


def infllm_v2_decode(q_BHD, k_cache, v_cache, kc_cache, cache_len: int, cfg: SparseConfig, scale=None,
                     backend=None, splits=16):
    """One new query token per sequence over a KV cache that already holds it (positions 0 .. cache_len-1).

    kc_cache holds cfg.n_kernels(cache_len) valid kernels (keep it with update_compressed_keys). Below
    dense_len: dense attention over the cache. Above: selection for the single query (stage 1 with its
    kernels split among programs), then the block-sparse kernel split over the block list.
    """
    B, H, D = q_BHD.shape
    q = q_BHD.unsqueeze(1)  # [B, 1, H, D]
    k, v = k_cache[:, :cache_len], v_cache[:, :cache_len]
    scale = D ** -0.5 if scale is None else scale
    q_offset = cache_len - 1
    if cache_len < cfg.dense_len:
        every_block = torch.arange(cfg.n_blocks(cache_len), device=q.device, dtype=torch.int32)
        idx = every_block.expand(B, k.shape[2], 1, every_block.numel())
    else:
        kc = kc_cache[:, :cfg.n_kernels(cache_len)]
        idx = select_blocks(q, kc, cfg, scale, q_offset, backend)
    if not _use_triton(q, backend):
        return naive.sparse_attn_ref(q, k, v, idx, cfg.block_size, scale, q_offset)[:, 0]
    o, _ = _sparse_fwd(q.contiguous(), k, v, idx.contiguous(), cfg.block_size, scale, q_offset, splits)
    return o[:, 0]


def infllm_v2_decode_static(q_BHD, k_cache, v_cache, kc_cache, lens_B, cfg: SparseConfig, scale=None,
                            backend=None, splits=16):
    """One query per row over caches of a fixed capacity S = k_cache.shape[1], with the lengths on the device:
    lens_B (int32 [B]) holds the keys of each row, its query the newest (position lens_B - 1); rows may differ.
    kc_cache holds the kernels of k_cache (write_decode_kv keeps it). A row below dense_len attends to all of its
    keys, the others select (over all kernel slots, those past the row's length masked; top-k with the forced
    blocks) and attend to their picks, split-K. Every shape is set by the capacity and nothing reaches the host,
    so a CUDA graph can replay it; naive.infllm_v2_decode_static_ref is the reference. Returns [B, H, D]."""
    H, Hkv = q_BHD.shape[1], k_cache.shape[2]
    if H % Hkv:
        raise ValueError(f"q_BHD has {H} heads, not a multiple of k_cache's {Hkv} KV heads (dim 2)")
    _check_decode_caches(k_cache, kc_cache, lens_B, cfg, q_BHD.device)
    scale = q_BHD.shape[-1] ** -0.5 if scale is None else float(scale)
    if q_BHD.is_cuda and cfg.block_size < 16:  # the kernel's tl.dot over a block needs K >= 16 when compiled
        if backend == "triton":
            raise ValueError(f"the Triton decode needs block_size >= 16 on CUDA, not {cfg.block_size}")
        backend = "torch"
    if not _use_triton(q_BHD, backend):
        return naive.infllm_v2_decode_static_ref(q_BHD, k_cache, v_cache, kc_cache, lens_B, cfg, scale)
    return decode_static_op(q_BHD.contiguous(), k_cache, v_cache, kc_cache, lens_B, list(dataclasses.astuple(cfg)),
                            scale, splits)


# An op, so that torch.compile (HybridLM.decode_step(compile=True)) calls the kernels as they are instead of
# re-tracing them with Inductor, which types the Python float scale as fp64 and fails on the loop-carried fp32
# maxima (seen on an H200, torch 2.11).
@torch.library.custom_op("hyloom::infllm_v2_decode_static", mutates_args=())
def decode_static_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kc_cache: torch.Tensor,
                     lens_B: torch.Tensor, cfg: list[int], scale: float, splits: int) -> torch.Tensor:
    """infllm_v2_decode_static on the Triton kernels; cfg: the SparseConfig's fields in order."""
    sparse = SparseConfig(*cfg)
    idx = _decode_select(q, kc_cache.to(q.dtype).contiguous(), lens_B, sparse, scale, k_cache.shape[1])
    return _decode_attn(q, k_cache, v_cache, idx, lens_B, sparse.block_size, scale, splits)


@decode_static_op.register_fake
def _(q, k_cache, v_cache, kc_cache, lens_B, cfg, scale, splits):
    return torch.empty_like(q)


def _decode_lse(q, kc, lens, cfg: SparseConfig, scale: float, GP: int) -> torch.Tensor:
    """[splits, B, H] partial LSEs of the static decode's normaliser (the coarse one with cfg.approx_lse)."""
    B, H, D = q.shape
    Hkv = kc.shape[2]
    fine = dict(n=kc.shape[1], size=cfg.kernel_size, stride=cfg.kernel_stride, parts=1, cstep=1, pstep=1,
                pos_limit=1 << 30)
    passes = [fine]
    if cfg.approx_lse:  # coarse kernel j: the mean of fine kernels j * cstep + p * pstep, p < parts
        n_coarse = cfg.n_coarse_kernels(cfg.kernel_stride * (kc.shape[1] - 1) + cfg.kernel_size) if kc.shape[1] else 0
        coarse = dict(n=n_coarse, size=cfg.lse_kernel_size, stride=cfg.lse_kernel_stride,
                      parts=cfg.lse_kernel_size // cfg.kernel_size, cstep=cfg.lse_kernel_stride // cfg.kernel_stride,
                      pstep=cfg.kernel_size // cfg.kernel_stride, pos_limit=1 << 30)
        # a sparse row that sees no coarse kernel yet keeps the exact normaliser (possible only with a dense_len
        # that short): its fine partials join the coarse ones, which are all -inf for it
        early = [dict(fine, pos_limit=cfg.lse_kernel_size - 1)] if cfg.dense_len < cfg.lse_kernel_size else []
        passes = [coarse] + early
    counts = [max(1, min(TUNE["lse_min_programs"] // (B * Hkv), triton.cdiv(p["n"], TUNE["lse_kernels"])))
              for p in passes]
    lse = _empty(sum(counts), B, H, device=q.device, dtype=torch.float32)
    first = 0
    for p, count in zip(passes, counts):
        out = lse[first:first + count]
        first += count
        triton_decode._decode_lse[(B * Hkv, count)](
            q, kc, lens, out, p["n"], Hkv, scale * LOG2E, p["pos_limit"], q.stride(0), q.stride(1),
            kc.stride(0), kc.stride(1), kc.stride(2), out.stride(0), out.stride(1), out.stride(2),
            G=H // Hkv, GP=GP, BLOCK_N=TUNE["lse_kernels"], D=D, SIZE=p["size"], STRIDE=p["stride"],
            PARTS=p["parts"], CSTEP=p["cstep"], PSTEP=p["pstep"], **TUNE["lse"])
    return lse


def _decode_select(q, kc, lens, cfg: SparseConfig, scale: float, capacity: int) -> torch.Tensor:
    """Stage 1 and top-k of the static decode on the Triton kernels: [B, Hkv, decode_width] int32."""
    B, H, D = q.shape
    Hkv = kc.shape[2]
    G, GP = H // Hkv, _pow2(H // Hkv, 16)
    n_blocks = cfg.n_blocks(capacity)
    lse = _decode_lse(q, kc, lens, cfg, scale, GP)
    scores = _empty(B, Hkv, 1, n_blocks, device=q.device, dtype=torch.float32)
    block_b = TUNE["select_blocks"]
    triton_decode._decode_block_scores[(triton.cdiv(n_blocks, block_b), B * Hkv)](
        q, kc, lens, lse, scores, kc.shape[1], Hkv, n_blocks, scale * LOG2E, lse.shape[0], q.stride(0), q.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
        scores.stride(0), scores.stride(1), G=G, GP=GP, BLOCK_B=block_b, D=D, KSIZE=cfg.kernel_size,
        KSTRIDE=cfg.kernel_stride, BS=cfg.block_size, POOL_W=cfg.pool_window, POOL_S=cfg.pool_stride,
        POOL_P=cfg.pool_padding, INIT=cfg.init_blocks, WIN_BLOCKS=cfg.window // cfg.block_size, **TUNE["scores"])
    picks = topk_blocks(scores, cfg.k_total, backend="triton")[:, :, 0]
    return naive.decode_picks(picks, lens, cfg, capacity).contiguous()


def _decode_attn(q, k, v, idx, lens, block_size: int, scale: float, splits: int) -> torch.Tensor:
    """Split-K attention of the static decode over the picks idx [B, Hkv, W]; [B, H, D] in q's dtype."""
    B, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    o_s = _empty(splits, B, 1, H, D, device=q.device, dtype=torch.float32)  # [splits, B, T=1, H, D]
    lse_s = _empty(splits, B, H, 1, device=q.device, dtype=torch.float32)
    triton_decode._decode_attn[(B * Hkv, splits)](
        q, k, v, idx, lens, o_s, lse_s, Hkv, scale * LOG2E, q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), idx.stride(0), idx.stride(1),
        o_s.stride(0), o_s.stride(1), o_s.stride(3), lse_s.stride(0), lse_s.stride(1), lse_s.stride(2),
        G=G, GP=_pow2(G, 16), D=D, BS=block_size, KSEL=idx.shape[-1], KSEL_P=_pow2(idx.shape[-1]), **TUNE["fwd"])
    o = _empty(B, 1, H, D, device=q.device, dtype=q.dtype)
    lse = _empty(B, H, 1, device=q.device, dtype=torch.float32)
    triton_attn._merge_splits[(1, B)](
        o_s, lse_s, o, lse, splits, o_s.stride(0), o_s.stride(1), o_s.stride(2), o_s.stride(3),
        lse_s.stride(0), lse_s.stride(1), lse_s.stride(2), o.stride(0), o.stride(1), o.stride(2),
        lse.stride(0), lse.stride(1), H=H, HP=_pow2(H), D=D)
    return o[:, 0]
