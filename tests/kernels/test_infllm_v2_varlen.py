"""The varlen InfLLM-V2 path (packed sequences, one launch per stage) against the per-sequence loop it replaces
(ops.per_sequence_attn) and the PyTorch reference, in fp32 under the interpreter (see test_infllm_v2.py).

Packs mix sequences shorter than dense_len (dense), exactly dense_len and longer (sparse; lengths that are not
block multiples), empty ones (first, middle, last); every kernel output starts NaN-poisoned."""
import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from hyloom.kernels.infllm_v2 import SparseConfig, compress_keys, infllm_v2_attn, naive, ops, select_blocks

SMALL = SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, topk=3, init_blocks=1, window=32,
                     pool_window=5, pool_stride=4, pool_padding=1, dense_len=64)
# two init blocks, the coarse normaliser (queries before position 15 keep the exact one)
COARSE2 = dataclasses.replace(SMALL, init_blocks=2, topk=3, lse_kernel_size=16, lse_kernel_stride=8)
PACK = [0, 41, 64, 0, 7, 90, 0]  # empty, dense, exactly dense_len, empty, dense, long, empty


pytestmark = pytest.mark.usefixtures("nan_poisoned_outputs")  # tests/kernels/conftest.py


def packed(lengths, H, Hkv, D, seed, device, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(1, T, h, D, generator=gen).to(device).requires_grad_(requires_grad) for h in (H, Hkv, Hkv))
    cu = torch.tensor([0] + lengths).cumsum(0).to(device, torch.int32)
    return q, k, v, cu


def spans(cu):
    bounds = cu.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def close(got, want, name, rtol=1e-5, atol=1e-5):
    assert not got.isnan().any(), f"{name}: NaN (a cell the kernels never wrote?)"
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def reference_and_untied(q, k, v, cfg, cu):
    """(each sequence through the reference, [T] mask of the tokens to compare with it). A token whose k_total-th
    and next-best block scores (any KV head) lie within 1e-6 may pick either block: a one-ulp difference between two
    implementations' scores flips it (seen on one CPU: 0.31663877 vs 0.31663874), and both picks are right."""
    q, k, v = q.detach(), k.detach(), v.detach()
    untied = torch.ones(q.shape[1], dtype=torch.bool, device=q.device)
    for s, e in spans(cu):
        if e - s < cfg.dense_len:
            continue
        kc = naive.compress_keys_ref(k[:, s:e], cfg)
        scores = naive.block_scores_ref(naive.kernel_scores_ref(q[:, s:e], kc, cfg), cfg, cfg.n_blocks(e - s))
        if scores.shape[-1] > cfg.k_total:
            top = scores.topk(cfg.k_total + 1, dim=-1).values
            last, next_ = top[..., -2], top[..., -1]
            tie = torch.isfinite(next_) & ((last - next_).abs() <= 1e-6 * last.abs().clamp(min=1))
            untied[s:e] = ~tie.any(1)[0]
    assert untied.float().mean() > 0.95
    return naive.infllm_v2_attn_varlen_ref(q, k, v, cfg, cu), untied


def test_packed_kernels_are_each_sequences_own(device):
    _, k, _, cu = packed([45, 0, 9, 70, 33], 2, 2, 16, seed=1, device=device)
    got = compress_keys(k, SMALL, cu_seqlens=cu)
    want = torch.cat([compress_keys(k[:, s:e], SMALL) for s, e in spans(cu)], dim=1)
    assert got.shape == want.shape == (1, sum(SMALL.n_kernels(e - s) for s, e in spans(cu)), 2, 16)
    assert torch.equal(got, want)


@pytest.mark.parametrize("cfg,G", [(SMALL, 4), pytest.param(COARSE2, 2, marks=pytest.mark.slow)],  # coarse: ~40 s
                         ids=["exact", "coarse-init2"])
def test_varlen_selection_is_each_sequences_own(cfg, G, device):
    """Sparse sequences pick exactly what select_blocks picks for them alone; dense ones hold their init blocks."""
    q, k, _, cu = packed([41, 64, 0, 7, 90], G, 1, 16, seed=2, device=device)
    idx = ops.select_op(q, k, list(dataclasses.astuple(cfg)), 0.25, 0, cu)
    assert idx.shape == (1, 1, q.shape[1], cfg.k_total)
    for s, e in spans(cu):
        rows = idx[:, :, s:e]
        if e - s >= cfg.dense_len:
            alone = select_blocks(q[:, s:e], compress_keys(k[:, s:e], cfg), cfg, scale=0.25, backend="triton")
            assert torch.equal(rows, alone), f"sequence {s}:{e}"
        else:  # init blocks that exist by then, -1 after
            own = torch.arange(e - s, device=device).view(-1, 1) // cfg.block_size
            slot = torch.arange(cfg.k_total, device=device)
            want = torch.where((slot < cfg.init_blocks) & (slot <= own), slot, -1).to(torch.int32)
            assert torch.equal(rows, want.expand_as(rows)), f"dense sequence {s}:{e}"


@pytest.mark.parametrize("cfg,G,Hkv,lengths,seed", [
    (SMALL, 4, 1, PACK, 3),
    pytest.param(COARSE2, 2, 2, [70, 5, 0, 63], 4, marks=pytest.mark.slow),  # 63: dense_len - 1; ~25 s
    (SMALL, 16, 1, [12, 30, 1], 5),  # dense only
], ids=["mixed", "coarse-init2", "dense-only"])
def test_varlen_forward_and_gradients_equal_the_per_sequence_loop(cfg, G, Hkv, lengths, seed, monkeypatch, device):
    # small dense tiles and dK/dV chunks: tiles and chunks cut across sequence ends
    monkeypatch.setitem(ops.TUNE, "local_rows", 32)
    monkeypatch.setitem(ops.TUNE, "local_dkdv_rows", 32)
    monkeypatch.setitem(ops.TUNE, "dkdv_chunk", 1)
    q, k, v, cu = packed(lengths, G * Hkv, Hkv, 16, seed, device, requires_grad=True)
    out = infllm_v2_attn(q, k, v, cfg, cu_seqlens=cu, backend="triton")
    loop = ops.per_sequence_attn(q, k, v, cfg, cu_seqlens=cu, backend="triton")
    close(out, loop, "out")
    ref, untied = reference_and_untied(q, k, v, cfg, cu)
    close(out[:, untied], ref[:, untied], "out vs reference")
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    grads = torch.autograd.grad(out, (q, k, v), do)
    for name, got, want in zip("qkv", grads, torch.autograd.grad(loop, (q, k, v), do)):
        close(got, want, f"d{name}", rtol=1e-4)


def test_varlen_of_nothing_and_bad_offsets(device):
    q, k, v, cu = packed([0, 0], 2, 1, 16, seed=7, device=device)
    assert infllm_v2_attn(q, k, v, SMALL, cu_seqlens=cu, backend="triton").shape == (1, 0, 2, 16)
    q, k, v, _ = packed([10], 2, 1, 16, seed=7, device=device)
    for bad in ([0, 4], [0, 6, 4, 10], [1, 10]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            infllm_v2_attn(q, k, v, SMALL, cu_seqlens=torch.tensor(bad, device=device), backend="triton")


def test_varlen_ops_pass_opcheck(device, opcheck):
    small = dataclasses.replace(SMALL, dense_len=32)  # few tokens, a sparse and a dense sequence: fast
    q, k, v, cu = packed([9, 0, 40], 2, 1, 16, seed=8, device=device, requires_grad=True)
    cfg = list(dataclasses.astuple(small))
    opcheck(ops.select_op, (q.detach(), k.detach(), cfg, 0.25, 0, cu))
    idx = ops.select_op(q.detach(), k.detach(), cfg, 0.25, 0, cu)
    local = [small.init_blocks, small.window // small.block_size]
    opcheck(ops.sparse_fwd_op, (q, k, v, idx, small.block_size, 0.25, 0, local, cu, small.dense_len))
    o, lse = ops.sparse_fwd_op(q, k, v, idx, small.block_size, 0.25, 0, local, cu, small.dense_len)
    plain = [x.detach() for x in (q, k, v)]
    opcheck(ops.sparse_bwd_op, (*plain, idx, o.detach(), lse.detach(), torch.randn_like(o), small.block_size, 0.25,
                                0, local, cu, small.dense_len))
