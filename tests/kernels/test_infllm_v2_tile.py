"""The token-tile forward (kernels/infllm_v2/triton_tile.py) against the per-token forward and the reference, fp32,
where tests/conftest.py says (`device`: compiled on CUDA, else the Triton interpreter). Awkward shapes: T not a
multiple of the tile, a partial last key block, GQA groups 2..4, -1 padding, a token without picks, duplicate
picks across a tile and a tile whose tokens pick disjoint blocks; outputs start NaN-poisoned. The union preparation
(ops.tile_unions: _tile_unions_kernel) against its PyTorch reference (naive.tile_unions_ref), entry for entry."""
import math

import pytest
import torch

pytest.importorskip("triton")

from hyloom.kernels.infllm_v2 import SparseConfig, block_sparse_attn, compress_keys, naive, ops, select_blocks

pytestmark = pytest.mark.usefixtures("nan_poisoned_outputs")  # tests/kernels/conftest.py


def qkv(T, Tk, G, Hkv, D, seed, device):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, n, h, D, generator=gen).to(device) for n, h in ((T, G * Hkv), (Tk, Hkv), (Tk, Hkv))]


def lse_ref(q, k, idx, block_size, q_offset):
    """[B, H, T] log2-unit log-sum-exp of each query's logits over its selected real keys (-inf: none)."""
    G = q.shape[2] // k.shape[2]
    mask = naive.block_mask_ref(idx, block_size, k.shape[1], q_offset).repeat_interleave(G, dim=1)
    logits = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(G, dim=2)) * q.shape[-1] ** -0.5
    return logits.masked_fill(~mask, float("-inf")).logsumexp(-1) / math.log(2)


def random_picks(T, q_offset, block_size, ksel, Hkv, seed):
    """[1, Hkv, T, ksel]: each token picks up to ksel distinct blocks it can see (ascending, -1 padded)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.full((1, Hkv, T, ksel), -1, dtype=torch.int32)
    for h in range(Hkv):
        for t in range(T):
            seen = (q_offset + t) // block_size + 1
            n = int(torch.randint(1, min(ksel, seen) + 1, (), generator=gen))
            idx[0, h, t, :n] = torch.randperm(seen, generator=gen)[:n].sort().values
    return idx


def check(q, k, v, idx, block_size, q_offset, local, tile_tokens, empty_rows=()):
    want_o, want_lse = ops._sparse_fwd(q, k, v, idx, block_size, q.shape[-1] ** -0.5, q_offset, local=local,
                                       tile_tokens=0)
    got_o, got_lse = ops._sparse_fwd(q, k, v, idx, block_size, q.shape[-1] ** -0.5, q_offset, local=local,
                                     tile_tokens=tile_tokens)
    assert not got_o.isnan().any() and not got_lse.isnan().any()  # every cell written
    torch.testing.assert_close(got_o, want_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_lse, want_lse, rtol=1e-5, atol=1e-5)
    rows = [t for t in range(q.shape[1]) if t not in empty_rows]
    ref = naive.sparse_attn_ref(q, k, v, idx, block_size, q_offset=q_offset)
    torch.testing.assert_close(got_o[:, rows], ref[:, rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_lse[..., rows], lse_ref(q, k, idx, block_size, q_offset)[..., rows],
                               rtol=1e-5, atol=1e-5)
    for t in empty_rows:  # a token without picks: zeros and lse -inf, as the per-token kernel
        assert (got_o[:, t] == 0).all() and (got_lse[..., t] == float("-inf")).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_union_lists_every_tile_block_once_with_its_tokens(backend, device):
    idx = torch.tensor([[3, 7, -1], [1, 3, -1], [-1, -1, -1], [7, 9, 2], [5, -1, -1]], dtype=torch.int32)
    blocks, members, count = ops.tile_unions(idx[None, None].to(device), 4, 16, 10, backend=backend)
    assert count.tolist() == [[5, 1]]
    assert blocks[0, 0, :5].tolist() == [1, 2, 3, 7, 9] and blocks[0, 1, 0].item() == 5
    assert members[0, 0, :5].tolist() == [0b0010, 0b1000, 0b0011, 0b1001, 0b1000] and members[0, 1, 0].item() == 1
    # local (1 init block, 1 window block): token t keeps picks in [1, own block - 1) only
    pos_idx = torch.tensor([[0, 1, 5], [0, 2, 6]], dtype=torch.int32)  # tokens at positions 100, 101: own block 6
    blocks, members, count = ops.tile_unions(pos_idx[None, None].to(device), 2, 16, 7, q_offset=100, local=(1, 1),
                                             backend=backend)
    assert count.tolist() == [[2]] and blocks[0, 0, :2].tolist() == [1, 2] and members[0, 0, :2].tolist() == [1, 2]


@pytest.mark.parametrize("tile_tokens,T,q_offset,local,seed",
                         [(4, 45, 0, None, 11), (16, 45, 37, (1, 1), 12), (32, 70, 5, None, 13),
                          (32, 75, 100, (2, 1), 14), (16, 33, 0, None, 15)])
def test_union_kernel_equals_the_reference(tile_tokens, T, q_offset, local, seed, device):
    """Batch 2 × 2 KV heads, -1 padding, picks in any order, strided picks (a transposed view), a token without
    picks, a tile without picks, a tile of identical picks, a tile of disjoint ones, unions that fill every key
    block (W) and, with 32-token tiles, token 31's bit (the sign bit)."""
    bs, ksel, TT = 16, 5, tile_tokens
    n_key_blocks = -(-(q_offset + T) // bs)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.cat([random_picks(T, q_offset, bs, ksel, 2, seed + b) for b in range(2)])  # [2, 2, T, ksel]
    idx = idx.gather(-1, torch.rand(idx.shape, generator=gen).argsort(-1))  # each token's picks shuffled
    idx[1, 0, T - 3] = -1  # a token that picks nothing
    idx[0, 0, (T - 1) // TT * TT:] = -1  # the last (partial) tile of one head: an empty union
    idx[0, 1, :TT] = torch.tensor([n_key_blocks - 1, 0, -1, 2, 1])  # tile 0 of one head: identical picks
    idx[0, 1, TT:2 * TT] = -1
    idx[0, 1, TT:2 * TT, 0] = torch.arange(TT) % n_key_blocks  # tile 1: one pick per token, disjoint where possible
    idx[1, 1, :, 2] = n_key_blocks - 1 - torch.arange(T) % 2  # the last blocks in every tile: unions fill up
    idx_BKTS = idx.transpose(1, 2).contiguous().transpose(1, 2).to(device)  # strides of a [B, T, Hkv, S] layout
    blocks, members, count = ops.tile_unions(idx_BKTS, TT, bs, n_key_blocks, q_offset, local, backend="triton")
    want = naive.tile_unions_ref(idx_BKTS, TT, bs, n_key_blocks, q_offset, local)
    assert [x.shape for x in (blocks, members, count)] == [x.shape for x in want]
    assert torch.equal(count, want[2])
    listed = torch.arange(blocks.shape[-1], device=device) < count[..., None]
    assert torch.equal(blocks[listed], want[0][listed]) and torch.equal(members[listed], want[1][listed])
    assert blocks.stride() == members.stride()
    assert (count == 0).any()
    if local is None:
        assert (count == blocks.shape[-1]).any()
        assert TT < 32 or (members[listed] < 0).any()  # token 31 picked something: bit 31 set


@pytest.mark.parametrize("G,Hkv,T,q_offset,tile_tokens,seed",
                         [(2, 2, 45, 0, 8, 1), (3, 1, 70, 20, 4, 2), (4, 1, 37, 9, 16, 3), (4, 2, 29, 0, 32, 4)])
def test_tile_forward_equals_per_token_forward(G, Hkv, T, q_offset, tile_tokens, seed, device):
    """Random picks (-1 padded, duplicates across tiles); keys end in a partial block (Tk = q_offset + T)."""
    bs, ksel = 16, 4
    q, k, v = qkv(T, q_offset + T, G, Hkv, 16, seed, device)
    idx = random_picks(T, q_offset, bs, ksel, Hkv, seed)
    empty = (T - 2,)  # a token that picks nothing at all
    idx[:, :, empty[0]] = -1
    check(q, k, v, idx.to(device), bs, q_offset, None, tile_tokens, empty)


def test_tile_of_disjoint_picks_and_of_identical_picks(device):
    """Tokens 64..67 (one tile of 4) pick one block each, all different; tokens 68..71 all pick the same three."""
    bs, T = 16, 75  # keys 0..74: block 4 partial
    q, k, v = qkv(T, T, 2, 1, 16, 5, device)
    idx = random_picks(T, 0, bs, 3, 1, 5)
    for j in range(4):
        idx[0, 0, 64 + j] = torch.tensor([j, -1, -1])
        idx[0, 0, 68 + j] = torch.tensor([0, 2, 4])
    check(q, k, v, idx.to(device), bs, 0, None, 4)


@pytest.mark.parametrize("G,init_blocks,T,q_offset,tile_tokens,seed",
                         [(2, 1, 150, 0, 16, 6), (4, 2, 70, 37, 8, 7), (3, 1, 90, 5, 32, 8)])
def test_tile_forward_continues_from_the_forced_tiles(G, init_blocks, T, q_offset, tile_tokens, seed, device):
    """With local: _local_fwd takes the forced blocks, the tiles the scored picks between them (tiles that
    straddle query blocks, where tokens of one tile have different windows); picks dropped at random."""
    cfg = SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, topk=5, init_blocks=init_blocks, window=32)
    q, k, v = qkv(T, q_offset + T, G, 1, 16, seed, device)
    idx = select_blocks(q, compress_keys(k, cfg), cfg, q_offset=q_offset, backend="torch")
    pos = (torch.arange(T, device=device) + q_offset).view(1, 1, T, 1)
    scored = (idx >= init_blocks) & (idx < pos // cfg.block_size - cfg.window // cfg.block_size)
    drop = scored & (torch.rand(idx.shape, generator=torch.Generator().manual_seed(seed)).to(device) < 0.3)
    idx = torch.where(drop, 10_000, idx.masked_fill(idx < 0, 10_000)).sort(-1).values
    idx = idx.masked_fill(idx == 10_000, -1).to(torch.int32)
    assert (scored & ~drop).sum() >= T // 4  # the tiles have scored picks to walk
    check(q, k, v, idx, cfg.block_size, q_offset, (init_blocks, cfg.window // cfg.block_size), tile_tokens)


def test_layer_uses_the_tiles_when_tuned_on(monkeypatch, device):
    """TUNE["tile_tokens"] routes the public forward (block_sparse_attn, the layer's) through the tiles."""
    cfg = SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, topk=3, window=32, dense_len=64)
    q, k, v = qkv(70, 70, 2, 2, 16, 9, device)
    idx = select_blocks(q, compress_keys(k, cfg), cfg, backend="torch")
    forced = (cfg.init_blocks, cfg.window // cfg.block_size)
    calls, real = [], ops._tile_fwd
    monkeypatch.setitem(ops.TUNE, "tile_tokens", 8)
    monkeypatch.setattr(ops, "_tile_fwd", lambda *a: calls.append(a[-1]) or real(*a))
    torch.testing.assert_close(block_sparse_attn(q, k, v, idx, cfg.block_size, backend="triton", forced=forced),
                               naive.sparse_attn_ref(q, k, v, idx, cfg.block_size), rtol=1e-5, atol=1e-5)
    assert calls == [8]


@pytest.mark.parametrize("tile_tokens", [3, 64])
def test_tile_tokens_must_be_a_power_of_two_up_to_32(tile_tokens, device):
    q, k, v = qkv(20, 20, 2, 1, 16, 10, device)
    idx = random_picks(20, 0, 16, 2, 1, 10).to(device)
    with pytest.raises(ValueError, match="tile_tokens"):
        ops._sparse_fwd(q, k, v, idx, 16, 0.25, 0, tile_tokens=tile_tokens)
