"""Token-tile block-sparse forward (issue 13 §3): one program per (tile of TT consecutive tokens, KV head).

Its rows are the tile's TT tokens × the group's GP heads (row = token * GP + head, as _local_fwd). Neighbouring
tokens pick mostly the same blocks on trained activations, so the program walks the UNION of its tokens' picks
and loads each K/V block once for the whole tile, where _sparse_fwd (one token per program) loads it once per
token. A row takes a block only if its own token picked it (a bit in the union entry's token mask) and only up
to its own position; a row skipping a block keeps its online-softmax state exactly (alpha = 1, p = 0), and the
union is ascending like every token's list, so each row sees the same sequence of updates as in _sparse_fwd.
The price: every row computes scores for every union block (masked), about TT / load_ratio times the FLOPs.

The union is prepared in PyTorch (tile_unions: one segmented sort of the tile's TT * KSEL picks, a cumsum and
two scatters, all on the device, no host sync); the bench times it with the kernel. With FROM_LOCAL the
forced blocks are left to _local_fwd as in the per-token path and the union holds only each token's picks
between its init blocks and its local window. Forward only, non-varlen, no split-K: ops._sparse_fwd uses it
for tile_tokens > 0 in exactly that case and falls back to the per-token kernel otherwise. Each token's picks
must be distinct (select_blocks makes them so; the per-token kernel would attend a repeated pick twice).
"""
import torch
import triton
import triton.language as tl

from .triton_attn import attend_step, load_kv
from .triton_select import group_tile, load_group_queries

MAX_TILE_TOKENS = 32  # one int32 of token bits per union entry


def tile_unions(idx_BKTS, tile_tokens: int, block_size: int, n_key_blocks: int, q_offset=0, local=None):
    """The sorted union of the picks of every tile of tile_tokens consecutive tokens, per (batch row, KV head).

    Returns (blocks, members, count): blocks int32 [B*Hkv, n_tiles, W] ascending, valid up to count
    [B*Hkv, n_tiles] int32 (the rest is junk the kernel never reads); members int32, bit j set where token j of
    the tile picked the block. W = min(tile_tokens * KSEL, n_key_blocks), the most a union can hold. local =
    (init_blocks, window_blocks): keep only picks >= init_blocks and before the token's window (the blocks
    _sparse_fwd walks after _local_fwd). Cost: a sort of B*Hkv*n_tiles rows of tile_tokens*KSEL int32 keys.
    """
    B, Hkv, T, S = idx_BKTS.shape
    TT = tile_tokens
    n_tiles = triton.cdiv(T, TT)
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


@triton.jit
def _tile_fwd(q_ptr, k_ptr, v_ptr, blocks_ptr, members_ptr, count_ptr, oin_ptr, o_ptr, lse_ptr, T, Hkv, q_offset,
              qk_scale, s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ub, s_ut, s_cb,
              s_ob, s_ot, s_oh, s_lb, s_lh,
              G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, TT: tl.constexpr,
              FROM_LOCAL: tl.constexpr = False):
    # blocks and members share strides (s_ub, s_ut); o and the fp32 oin share theirs (s_o*)
    pid_t = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b, kvh, tok, g, row_ok = group_tile(pid_t, pid_bk, T, Hkv, TT, GP, G)
    heads = kvh * G + g
    pos = tok + q_offset
    member = (tl.zeros_like(tok) + 1) << (tok - pid_t * TT)  # the row's token's bit
    last_pos = tl.minimum(pid_t * TT + TT - 1, T - 1) + q_offset
    d = tl.arange(0, D)
    q = load_group_queries(q_ptr, b, kvh, tok, g, row_ok, s_qb, s_qt, s_qh, G, D)
    m = tl.full([TT * GP], float("-inf"), tl.float32)
    l = tl.zeros([TT * GP], tl.float32)
    acc = tl.zeros([TT * GP, D], tl.float32)
    if FROM_LOCAL:  # continue from _local_fwd's normalised partial (as _sparse_fwd does)
        acc = tl.load(oin_ptr + b * s_ob + tok[:, None] * s_ot + heads[:, None] * s_oh + d[None, :],
                      mask=row_ok[:, None], other=0.0).to(tl.float32)
        m = tl.load(lse_ptr + b * s_lb + heads * s_lh + tok, mask=row_ok, other=0.0)
        l = tl.where(m == float("-inf"), 0.0, 1.0)
    union = pid_bk * s_ub + pid_t * s_ut
    n_union = tl.load(count_ptr + pid_bk * s_cb + pid_t)
    for i in range(0, n_union):
        blk = tl.load(blocks_ptr + union + i)
        picked = (tl.load(members_ptr + union + i) & member) != 0
        kpos = blk * BS + tl.arange(0, BS)
        k, v = load_kv(k_ptr, v_ptr, b, kvh, kpos, kpos <= last_pos, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, D)
        seen = picked[:, None] & (kpos[None, :] <= pos[:, None])
        m, l, acc = attend_step(q, k, v, seen, m, l, acc, qk_scale)
    l_safe = tl.where(l > 0, l, 1.0)  # a row that saw nothing: zeros and lse = -inf, as _sparse_fwd
    tl.store(o_ptr + b * s_ob + tok[:, None] * s_ot + heads[:, None] * s_oh + d[None, :],
             (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + b * s_lb + heads * s_lh + tok, tl.where(l > 0, m + tl.log2(l_safe), float("-inf")),
             mask=row_ok)
