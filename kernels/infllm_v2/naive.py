"""Readable, differentiable PyTorch reference of InfLLM-V2 (SPEC §2). Slow and memory-hungry: O(T²) tensors.

Layout: q [B, T, H, D], k/v [B, Tk, Hkv, D], G = H // Hkv; query i sits at absolute position q_offset + i, key j
at position j (causal self-attention over a prefix of Tk = q_offset + T keys).

Conventions (also in docs/kernels-infllm_v2.md):
- kernel j = mean(K[j*stride : j*stride + kernel_size]); only full kernels exist.
- causal at kernel granularity: a query at position t may score kernel j only if its last key is <= t,
  i.e. j*stride + kernel_size - 1 <= t. A query that sees no kernel gets all-zero kernel scores.
- kernel scores: softmax over the visible kernels of q·kc*scale per query head, summed over the G heads of the group.
  With cfg.approx_lse the normaliser is the log-sum-exp over the visible *coarse* kernels (size/stride
  lse_kernel_*), each the mean of the fine kernels tiling it; a query that sees no coarse kernel yet keeps the
  exact normaliser.
- block b's score: max of the kernel scores over kernels [b*pool_stride - pool_padding, ... + pool_window)
  (missing or invisible kernels count 0; scores are probabilities, so 0 never beats a visible kernel).
- forced (+inf): init blocks b < init_blocks and local blocks bq - window//block_size <= b <= bq, bq = t // block_size.
  future blocks b > bq: -inf. Top-k_total by score, ties to the later block; -inf picks become -1; indices
  sorted ascending, -1 last.
"""
import torch
import torch.nn.functional as F

from .config import SparseConfig


def compress_keys_ref(k_BTKD: torch.Tensor, cfg: SparseConfig) -> torch.Tensor:
    """Mean of each full kernel of keys: [B, n_kernels, Hkv, D]."""
    B, T, Hkv, D = k_BTKD.shape
    n = cfg.n_kernels(T)
    if n == 0:
        return k_BTKD.new_zeros(B, 0, Hkv, D)
    windows = k_BTKD.unfold(1, cfg.kernel_size, cfg.kernel_stride)  # [B, n, Hkv, D, kernel_size]
    return windows[:, :n].float().mean(-1).to(k_BTKD.dtype)


def coarse_keys(kc_BNKD, cfg: SparseConfig) -> torch.Tensor:
    """[B, n_coarse, Hkv, D]: coarse kernel j = mean of keys [j*lse_stride, j*lse_stride + lse_size), computed as
    the mean of the lse_size // kernel_size fine kernels that tile it (fine kernel i starts at i*kernel_stride)."""
    B, N, Hkv, D = kc_BNKD.shape
    n = cfg.n_coarse_kernels((N - 1) * cfg.kernel_stride + cfg.kernel_size if N else 0)
    first = torch.arange(n, device=kc_BNKD.device) * (cfg.lse_kernel_stride // cfg.kernel_stride)
    parts = torch.arange(cfg.lse_kernel_size // cfg.kernel_size, device=kc_BNKD.device) * (cfg.kernel_size // cfg.kernel_stride)
    fine = kc_BNKD.float()[:, (first[:, None] + parts[None, :]).flatten()]  # [B, n * parts, Hkv, D]
    return fine.view(B, n, parts.numel(), Hkv, D).mean(2).to(kc_BNKD.dtype)  # n may be 0


def _masked_logits(q_BKGTD, keys_BNKD, size: int, stride: int, q_offset: int, scale: float) -> torch.Tensor:
    """[B, Hkv, G, T, N] logits, -inf where kernel n (keys n*stride .. n*stride + size - 1) is not visible yet."""
    logits = torch.einsum("bkgtd,bnkd->bkgtn", q_BKGTD, keys_BNKD.float()) * scale
    pos_T = torch.arange(q_BKGTD.shape[3], device=logits.device) + q_offset
    last_key_N = torch.arange(keys_BNKD.shape[1], device=logits.device) * stride + size - 1
    return logits.masked_fill(last_key_N[None, :] > pos_T[:, None], float("-inf"))


def kernel_scores_ref(q_BTHD, kc_BNKD, cfg: SparseConfig, scale=None, q_offset=0) -> torch.Tensor:
    """Group-summed softmax probabilities over kernels: [B, Hkv, T, n_kernels] (fp32)."""
    B, T, H, D = q_BTHD.shape
    Hkv = kc_BNKD.shape[2]
    scale = D ** -0.5 if scale is None else scale
    q = q_BTHD.float().view(B, T, Hkv, H // Hkv, D).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, T, D]
    logits = _masked_logits(q, kc_BNKD, cfg.kernel_size, cfg.kernel_stride, q_offset, scale)
    lse = logits.logsumexp(-1, keepdim=True)  # -inf for a query that sees no kernel
    if cfg.approx_lse:
        coarse = _masked_logits(q, coarse_keys(kc_BNKD, cfg), cfg.lse_kernel_size, cfg.lse_kernel_stride,
                                q_offset, scale).logsumexp(-1, keepdim=True)
        lse = torch.where(coarse.isfinite(), coarse, lse)
    probs = (logits - lse).exp().nan_to_num(0.0)  # rows without a visible kernel -> zeros
    return probs.sum(2)


def pool_blocks(kernel_scores_N, cfg: SparseConfig, n_blocks: int) -> torch.Tensor:
    """Max-pool kernel scores (last dim) onto n_blocks blocks (missing kernels count 0)."""
    N = kernel_scores_N.shape[-1]
    need = (n_blocks - 1) * cfg.pool_stride + cfg.pool_window
    padded = F.pad(kernel_scores_N, (cfg.pool_padding, max(0, need - N - cfg.pool_padding)))[..., :need]
    return padded.unfold(-1, cfg.pool_window, cfg.pool_stride).amax(-1)


def mark_blocks(scores_NB, query_block, cfg: SparseConfig) -> torch.Tensor:
    """Forced blocks (init, the query's own and the window before it) to +inf, future ones to -inf;
    query_block broadcasts against scores_NB[..., :1]."""
    b = torch.arange(scores_NB.shape[-1], device=scores_NB.device)
    forced = (b < cfg.init_blocks) | ((b <= query_block) & (b >= query_block - cfg.window // cfg.block_size))
    return scores_NB.masked_fill(forced, float("inf")).masked_fill(b > query_block, float("-inf"))


def block_scores_ref(kernel_scores_BKTN, cfg: SparseConfig, n_blocks: int, q_offset=0) -> torch.Tensor:
    """Max-pool kernel scores onto blocks, then force init/local blocks (+inf) and drop future ones (-inf)."""
    T = kernel_scores_BKTN.shape[-2]
    scores = pool_blocks(kernel_scores_BKTN, cfg, n_blocks)  # [B, Hkv, T, n_blocks]
    block_T = (torch.arange(T, device=scores.device) + q_offset) // cfg.block_size
    return mark_blocks(scores, block_T[:, None], cfg)


def topk_blocks(block_scores, k_total: int) -> torch.Tensor:
    """Top-k_total block indices per row, ascending, -1 (dropped or missing) last: int32 [..., k_total].

    Ties are common, not rare: neighbouring blocks share a kernel in their pooling windows, so both often get
    that kernel's score. They are broken towards the later block (nearer the query), so every implementation
    picks the same blocks: the key is (score bits, block index) as one int64 (scores are >= 0 or ±inf, and
    the bits of non-negative floats sort like the floats).
    """
    n_blocks = block_scores.shape[-1]
    k = min(k_total, n_blocks)
    b = torch.arange(n_blocks, device=block_scores.device)
    key = (block_scores.float().view(torch.int32).long() << 32) | b
    key = key.masked_fill(block_scores == float("-inf"), -1)
    idx = key.topk(k, dim=-1, sorted=False).values
    idx = torch.where(idx < 0, n_blocks, idx & 0xFFFFFFFF)  # dropped picks sort after every real block
    idx = idx.sort(dim=-1).values
    idx = idx.masked_fill(idx == n_blocks, -1).to(torch.int32)
    if k < k_total:
        idx = F.pad(idx, (0, k_total - k), value=-1)
    return idx


def select_blocks_ref(q_BTHD, kc_BNKD, cfg: SparseConfig, scale=None, q_offset=0) -> torch.Tensor:
    """[B, Hkv, T, k_total] int32 selected blocks for keys 0 .. q_offset + T - 1."""
    n_blocks = cfg.n_blocks(q_offset + q_BTHD.shape[1])
    scores = kernel_scores_ref(q_BTHD, kc_BNKD, cfg, scale, q_offset)
    return topk_blocks(block_scores_ref(scores, cfg, n_blocks, q_offset), cfg.k_total)


def block_mask_ref(idx_BKTS, block_size: int, n_keys: int, q_offset=0) -> torch.Tensor:
    """Token-level mask [B, Hkv, T, n_keys]: key in a selected block and not after the query."""
    B, Hkv, T, _ = idx_BKTS.shape
    n_blocks = -(-n_keys // block_size)
    chosen = torch.zeros(B, Hkv, T, n_blocks + 1, dtype=torch.bool, device=idx_BKTS.device)
    chosen.scatter_(-1, idx_BKTS.long().masked_fill(idx_BKTS < 0, n_blocks), True)
    mask = chosen[..., :n_blocks].repeat_interleave(block_size, dim=-1)[..., :n_keys]
    causal = torch.arange(n_keys, device=mask.device)[None, :] <= (torch.arange(T, device=mask.device) + q_offset)[:, None]
    return mask & causal


def sparse_attn_ref(q_BTHD, k_BTKD, v_BTKD, idx_BKTS, block_size: int, scale=None, q_offset=0) -> torch.Tensor:
    """Softmax attention of each query over its selected blocks' real keys (fp32 math, differentiable)."""
    B, T, H, D = q_BTHD.shape
    Tk, Hkv = k_BTKD.shape[1], k_BTKD.shape[2]
    G = H // Hkv
    scale = D ** -0.5 if scale is None else scale
    mask = block_mask_ref(idx_BKTS, block_size, Tk, q_offset).repeat_interleave(G, dim=1)  # [B, H, T, Tk]
    k = k_BTKD.float().repeat_interleave(G, dim=2)
    v = v_BTKD.float().repeat_interleave(G, dim=2)
    logits = torch.einsum("bthd,bshd->bhts", q_BTHD.float(), k) * scale
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("bhts,bshd->bthd", probs, v).to(q_BTHD.dtype)


def tile_unions_ref(idx_BKTS, tile_tokens: int, block_size: int, n_key_blocks: int, q_offset=0, local=None):
    """The sorted union of the picks of every tile of tile_tokens consecutive tokens, per (batch row, KV head);
    the readable reference of ops.tile_unions (Triton: triton_tile._tile_unions_kernel, the same arrays).

    Returns (blocks, members, count): blocks int32 [B*Hkv, n_tiles, W] ascending, valid up to count
    [B*Hkv, n_tiles] int32 (the rest is junk the kernel never reads); members int32, bit j set where token j of
    the tile picked the block. W = min(tile_tokens * KSEL, n_key_blocks), the most a union can hold. local =
    (init_blocks, window_blocks): keep only picks >= init_blocks and before the token's window (the blocks
    _sparse_fwd walks after _local_fwd). Cost: a sort of B*Hkv*n_tiles rows of tile_tokens*KSEL int32 keys.
    """
    B, Hkv, T, S = idx_BKTS.shape
    TT = tile_tokens
    n_tiles = -(-T // TT)
    dev = idx_BKTS.device
    idx = idx_BKTS.to(torch.int32)
    keep = idx >= 0
    if local is not None:
        init_blocks, win_blocks = local
        pos_T = torch.arange(T, device=dev) + q_offset
        window_lo = (pos_T // block_size - win_blocks).clamp_min(init_blocks).view(1, 1, T, 1)
        keep &= (idx >= init_blocks) & (idx < window_lo)
    none = torch.iinfo(torch.int32).max  # sorts after every real key
    tok_in_tile = (torch.arange(T, device=dev, dtype=torch.int32) % TT).view(1, 1, T, 1)
    key = torch.where(keep, idx * TT + tok_in_tile, none)  # block-major, so a sort groups a block's tokens
    key = torch.nn.functional.pad(key, (0, 0, 0, n_tiles * TT - T), value=none)
    key = key.view(B * Hkv, n_tiles, TT * S).sort(-1).values
    real = key != none
    blk = key // TT
    first = real.clone()
    first[..., 1:] &= blk[..., 1:] != blk[..., :-1]
    count = first.sum(-1, dtype=torch.int32)
    W = max(1, min(TT * S, n_key_blocks))
    slot = torch.where(real, first.cumsum(-1) - 1, W).long()  # entries of one block share a slot; W: discarded
    blocks = torch.full((B * Hkv, n_tiles, W + 1), -1, device=dev, dtype=torch.int32).scatter_(-1, slot, blk)
    bit = torch.where(real, torch.ones_like(key, dtype=torch.int64) << (key % TT).long(), 0)
    members = torch.zeros((B * Hkv, n_tiles, W + 1), device=dev, dtype=torch.int64).scatter_add_(-1, slot, bit)
    members = torch.where(members >= 2 ** 31, members - 2 ** 32, members).to(torch.int32)  # bit 31: the sign
    return blocks[..., :W], members[..., :W], count  # views: the kernel takes their (shared) strides


def dense_causal_ref(q_BTHD, k_BTKD, v_BTKD, scale=None, q_offset=0) -> torch.Tensor:
    B, T, H, D = q_BTHD.shape
    Tk = k_BTKD.shape[1]
    every_key = torch.arange(Tk, device=q_BTHD.device, dtype=torch.int32)
    idx = every_key.expand(B, k_BTKD.shape[2], T, Tk)  # blocks of one key, all of them
    return sparse_attn_ref(q_BTHD, k_BTKD, v_BTKD, idx, 1, scale, q_offset)


def infllm_v2_attn_ref(q_BTHD, k_BTKD, v_BTKD, cfg: SparseConfig, scale=None) -> torch.Tensor:
    """The whole layer: dense below dense_len keys, else compress -> select -> block-sparse attention."""
    if k_BTKD.shape[1] < cfg.dense_len:
        return dense_causal_ref(q_BTHD, k_BTKD, v_BTKD, scale)
    kc = compress_keys_ref(k_BTKD, cfg)
    idx = select_blocks_ref(q_BTHD, kc, cfg, scale)
    return sparse_attn_ref(q_BTHD, k_BTKD, v_BTKD, idx, cfg.block_size, scale)


def infllm_v2_attn_varlen_ref(q_1THD, k_1TKD, v_1TKD, cfg: SparseConfig, cu_seqlens, scale=None) -> torch.Tensor:
    """Packed sequences (batch of 1, offsets cu_seqlens): each one through infllm_v2_attn_ref as if alone."""
    bounds = cu_seqlens.tolist()
    outs = [infllm_v2_attn_ref(q_1THD[:, s:e], k_1TKD[:, s:e], v_1TKD[:, s:e], cfg, scale)
            for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=1) if outs else q_1THD.clone()


# ---- a static decode step: one query per row, caches of a fixed capacity, the lengths as a tensor ----------------
# Every shape is set by the capacity and nothing is read back to the host, so the same code (and the Triton path
# in ops.infllm_v2_decode_static) can be captured in a CUDA graph. lens_B: the keys each row holds, its query
# (the newest key) at position lens_B - 1; slots past a row's length are masked, whatever they hold.

def decode_width(cfg: SparseConfig, capacity: int) -> int:
    """Picks per (row, KV head) in a static decode step: k_total for a sparse row, every block of up to
    dense_len - 1 keys for a dense one."""
    return max(cfg.k_total, cfg.n_blocks(min(cfg.dense_len - 1, capacity)))


def decode_picks(topk_BKS, lens_B, cfg: SparseConfig, capacity: int) -> torch.Tensor:
    """[B, Hkv, decode_width] int32: a row below dense_len takes every block it has (dense attention), the others
    their top-k picks; -1 pads."""
    width = decode_width(cfg, capacity)
    every = torch.arange(width, device=lens_B.device)
    dense_BW = torch.where(every < (lens_B[:, None] + cfg.block_size - 1) // cfg.block_size, every, -1)
    picks = F.pad(topk_BKS, (0, width - topk_BKS.shape[-1]), value=-1)
    return torch.where((lens_B < cfg.dense_len)[:, None, None], dense_BW[:, None], picks).to(torch.int32)


def complete_at(pos_B, n: int, size: int, stride: int) -> torch.Tensor:
    """[B, n]: whether kernel j (keys j*stride .. j*stride + size - 1) is complete at each row's position."""
    last_key = torch.arange(n, device=pos_B.device) * stride + size - 1
    return last_key[None, :] <= pos_B[:, None]


def decode_select_ref(q_BHD, kc_BNKD, lens_B, cfg: SparseConfig, capacity: int, scale=None) -> torch.Tensor:
    """The blocks each row's query attends to: [B, Hkv, decode_width(cfg, capacity)] int32 (see decode_picks);
    kc_BNKD: the kernels of a cache of `capacity` keys (those past a row's length are not looked at)."""
    B, H, D = q_BHD.shape
    Hkv = kc_BNKD.shape[2]
    scale = D ** -0.5 if scale is None else scale
    pos_B = lens_B.long() - 1
    q_BKGD = q_BHD.float().view(B, Hkv, H // Hkv, D)

    def logits(keys_BNKD, size, stride):  # [B, Hkv, G, N]; -inf for kernels not complete at the row's position
        s = torch.einsum("bkgd,bnkd->bkgn", q_BKGD, keys_BNKD.float()) * scale
        return s.masked_fill(~complete_at(pos_B, keys_BNKD.shape[1], size, stride)[:, None, None], float("-inf"))

    fine = logits(kc_BNKD, cfg.kernel_size, cfg.kernel_stride)
    lse = fine.logsumexp(-1, keepdim=True)
    if cfg.approx_lse:
        coarse = logits(coarse_keys(kc_BNKD, cfg), cfg.lse_kernel_size, cfg.lse_kernel_stride)
        coarse = coarse.logsumexp(-1, keepdim=True)
        lse = torch.where(coarse.isfinite(), coarse, lse)
    probs_BKN = (fine - lse).exp().nan_to_num(0.0).sum(2)
    scores = pool_blocks(probs_BKN, cfg, cfg.n_blocks(capacity))
    scores = mark_blocks(scores, (pos_B // cfg.block_size).view(B, 1, 1), cfg)
    return decode_picks(topk_blocks(scores, cfg.k_total), lens_B, cfg, capacity)


def decode_attn_ref(q_BHD, k_BSKD, v_BSKD, idx_BKW, lens_B, block_size: int, scale=None) -> torch.Tensor:
    """[B, H, D]: each row's query over the keys of its picked blocks that it holds (index < lens_B)."""
    B, H, D = q_BHD.shape
    S, Hkv = k_BSKD.shape[1], k_BSKD.shape[2]
    G = H // Hkv
    scale = D ** -0.5 if scale is None else scale
    n_blocks = -(-S // block_size)
    chosen = torch.zeros(B, Hkv, n_blocks + 1, dtype=torch.bool, device=q_BHD.device)
    chosen.scatter_(-1, idx_BKW.long().masked_fill(idx_BKW < 0, n_blocks), True)
    held_BS = torch.arange(S, device=q_BHD.device)[None, :] < lens_B[:, None]
    mask_BKS = chosen[..., :n_blocks].repeat_interleave(block_size, dim=-1)[..., :S] & held_BS[:, None]
    logits = torch.einsum("bhd,bshd->bhs", q_BHD.float(), k_BSKD.float().repeat_interleave(G, dim=2)) * scale
    probs = torch.softmax(logits.masked_fill(~mask_BKS.repeat_interleave(G, dim=1), float("-inf")), dim=-1)
    return torch.einsum("bhs,bshd->bhd", probs, v_BSKD.float().repeat_interleave(G, dim=2)).to(q_BHD.dtype)


def infllm_v2_decode_static_ref(q_BHD, k_BSKD, v_BSKD, kc_BNKD, lens_B, cfg: SparseConfig, scale=None):
    """A static decode step over caches of capacity S = k_BSKD.shape[1]: selection, then attention."""
    idx = decode_select_ref(q_BHD, kc_BNKD, lens_B, cfg, k_BSKD.shape[1], scale)
    return decode_attn_ref(q_BHD, k_BSKD, v_BSKD, idx, lens_B, cfg.block_size, scale)
