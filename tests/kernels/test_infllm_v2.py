"""InfLLM-V2 Triton kernels vs the PyTorch reference in fp32, where tests/conftest.py says (`device`: compiled on
CUDA, else Triton's CPU interpreter), in each `dtype` it offers (bf16 on CUDA only). Shapes are tiny (block 16,
kernel 8 stride 4, window 32) so the file stays well under three minutes on two cores; speed is checked on the
GPU by bench/infllm_v2.py."""
import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from hyloom.kernels import infllm_v2
from hyloom.kernels.infllm_v2 import (SparseConfig, block_scores, block_sparse_attn, compress_keys, infllm_v2_attn,
                                      infllm_v2_decode, naive, ops, select_blocks, topk_blocks,
                                      update_compressed_keys)

SMALL = SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, topk=3, init_blocks=1, window=32,
                     pool_window=5, pool_stride=4, pool_padding=1, dense_len=64)
COARSE = dataclasses.replace(SMALL, lse_kernel_size=16, lse_kernel_stride=8)  # the normaliser over 2-kernel means


pytestmark = pytest.mark.usefixtures("nan_poisoned_outputs")  # tests/kernels/conftest.py


def qkv(B, T, H, Hkv, D, seed, requires_grad=False, device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, h, D, generator=gen).to(device, dtype) for h in (H, Hkv, Hkv))
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


def fp32(*xs):
    """The same values in fp32 as new leaves (with gradients where the originals have them): the reference runs
    in fp32 on exactly what the kernel saw."""
    return [x.detach().float().requires_grad_(x.requires_grad) for x in xs]


@pytest.fixture
def matches(dtype, tol):
    """check(got, want, rtol, atol): fp32 elementwise within (rtol, atol); bf16 by the relative L2 error (<= tol),
    since elementwise bounds loose enough for bf16 rounding would say little."""
    def check(got, want, rtol=1e-5, atol=1e-5, name="out"):
        got, want = got.float(), want.float()
        assert not got.isnan().any(), f"{name}: NaN (a cell the kernel never wrote?)"
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
        else:
            err = ((got - want).norm() / want.norm()).item()
            print(f"{name}: rel err {err:.2e} (tol {tol:.0e})")  # the margins, shown by pytest -rP
            assert err <= tol, f"{name}: rel err {err:.2e} > {tol:.0e}"
    return check


def test_compress_keys_and_incremental_update():
    _, k, _ = qkv(2, 45, 2, 2, 16, seed=1)
    kc = compress_keys(k, SMALL)
    assert kc.shape == (2, SMALL.n_kernels(45), 2, 16) == (2, 10, 2, 16)
    for j in (0, 3, 9):  # kernel j averages keys 4j .. 4j+7
        torch.testing.assert_close(kc[:, j], k[:, 4 * j:4 * j + 8].mean(1))
    kc_cache = torch.full((2, 12, 2, 16), float("nan"))
    n = 0
    for prev, now in [(0, 7), (7, 8), (8, 13), (13, 30), (30, 45)]:  # a kernel completes every 4 tokens after 8
        n = update_compressed_keys(k, kc_cache, prev, now, SMALL)
        assert n == SMALL.n_kernels(now)
    torch.testing.assert_close(kc_cache[:, :n], kc)


@pytest.mark.parametrize("B,T,H,Hkv,q_offset,seed", [(1, 83, 16, 1, 0, 2), (2, 37, 4, 2, 50, 3), (1, 70, 2, 2, 0, 4)])
def test_stage1_scores_and_selection_match_reference(B, T, H, Hkv, q_offset, seed, device, dtype):
    check_stage1(SMALL, B, T, H, Hkv, q_offset, seed, device, dtype)


@pytest.mark.parametrize("B,T,H,Hkv,q_offset,seed", [(1, 83, 16, 1, 0, 20), (2, 37, 4, 2, 50, 21)])
def test_stage1_with_the_coarse_normaliser_matches_reference(B, T, H, Hkv, q_offset, seed, device, dtype):
    check_stage1(COARSE, B, T, H, Hkv, q_offset, seed, device, dtype)


@pytest.mark.parametrize("window,stride,padding", [(3, 3, 1), (2, 4, 0), (9, 4, 2)])
def test_stage1_with_other_pooling(window, stride, padding, device):
    """Pooling windows that are all strided runs (stride 3), shorter than the stride, or span three strides."""
    cfg = dataclasses.replace(SMALL, pool_window=window, pool_stride=stride, pool_padding=padding)
    check_stage1(cfg, 1, 75, 4, 1, 9, 25, device)


@pytest.mark.parametrize("cfg", [SMALL, pytest.param(COARSE, marks=pytest.mark.slow)], ids=["exact", "coarse"])
def test_stage1_with_the_kernels_split_among_programs(cfg, monkeypatch, device):
    """Chunks of 16 kernels: the normaliser pass splits its kernels among programs and merges their LSEs."""
    monkeypatch.setitem(ops.TUNE, "lse_kernels", 16)
    check_stage1(cfg, 1, 200, 4, 1, 0, 24, device)  # 4 splits exact, 2 coarse (+ the exact early rows)


def test_coarse_normaliser_reference_is_the_log_sum_exp_over_coarse_kernels():
    q, _, _ = qkv(1, 40, 2, 1, 16, seed=22)
    _, k, _ = qkv(1, 40, 2, 1, 16, seed=23)
    kc = compress_keys(k, SMALL)
    kcc = naive.coarse_keys(kc, COARSE)
    assert kcc.shape[1] == COARSE.n_coarse_kernels(40) == 4
    for j in range(4):  # coarse kernel j averages keys 8j .. 8j+15
        torch.testing.assert_close(kcc[:, j], k[:, 8 * j:8 * j + 16].mean(1))
    got = naive.kernel_scores_ref(q, kc, COARSE)[0, 0]  # [T, n_kernels]
    exact = naive.kernel_scores_ref(q, kc, SMALL)[0, 0]
    for t in (3, 14, 15, 27, 39):
        n_fine, n_coarse = SMALL.n_kernels(t + 1), COARSE.n_coarse_kernels(t + 1)
        if n_coarse == 0:  # nothing coarse to see yet: the exact normaliser
            torch.testing.assert_close(got[t], exact[t])
            continue
        want = torch.zeros(kc.shape[1])
        for h in range(2):
            fine = (kc[0, :n_fine, 0] @ q[0, t, h]) * 16 ** -0.5
            lse = ((k[0, :t + 1].unfold(0, 16, 8).mean(-1)[:n_coarse, 0] @ q[0, t, h]) * 16 ** -0.5).logsumexp(0)
            want[:n_fine] += (fine - lse).exp()
        torch.testing.assert_close(got[t], want)


def check_stage1(cfg, B, T, H, Hkv, q_offset, seed, device, dtype=torch.float32):
    """Stage 1 of the kernels against the reference on the same (dtype-rounded) values. The scores are fp32 in
    either dtype (bf16 products are exact in fp32, accumulated in fp32), but in bf16 the coarse normaliser's keys
    are means rounded to bf16 while the reference averages in fp32 (2e-4 apart on an H200)."""
    fp32_run = dtype == torch.float32
    bound = dict(rtol=1e-5, atol=1e-6) if fp32_run else dict(rtol=1e-3, atol=1e-3)
    pick_bound = dict(rtol=1e-6, atol=1e-7) if fp32_run else bound
    q, _, _ = qkv(B, T, H, Hkv, 16, seed, device=device, dtype=dtype)
    _, k, _ = qkv(B, q_offset + T, H, Hkv, 16, seed + 100, device=device, dtype=dtype)
    kc = compress_keys(k, cfg)
    got = block_scores(q, kc, cfg, q_offset=q_offset)
    want = naive.block_scores_ref(naive.kernel_scores_ref(q.float(), kc.float(), cfg, q_offset=q_offset), cfg,
                                  cfg.n_blocks(q_offset + T), q_offset)
    assert not got.isnan().any()
    assert torch.equal(got.isinf() & (got > 0), want.isinf() & (want > 0))  # forced blocks
    assert torch.equal(got.isinf() & (got < 0), want.isinf() & (want < 0))  # future blocks
    finite = want.isfinite()
    assert finite.any()
    torch.testing.assert_close(got[finite], want[finite], **bound)

    idx = select_blocks(q, kc, cfg, q_offset=q_offset, backend="triton")
    ref_idx = select_blocks(q.float(), kc.float(), cfg, q_offset=q_offset, backend="torch")
    assert idx.shape == (B, Hkv, T, cfg.k_total) and idx.dtype == torch.int32
    # identical up to exact ties: the reference scores of the two picks agree, value for value
    picked = lambda i: want.gather(-1, i.long().clamp(min=0)).masked_fill(i < 0, -1.0).sort(-1).values
    torch.testing.assert_close(picked(idx), picked(ref_idx), **pick_bound)
    assert (idx == ref_idx).float().mean() > 0.99
    # conventions: ascending, -1 last, never a future block, own block and block 0 always in
    valid = idx >= 0
    assert torch.all(valid[..., :-1] | ~valid[..., 1:])
    assert torch.all(torch.where(valid[..., 1:] & valid[..., :-1], idx[..., 1:] > idx[..., :-1], True))
    own_block = (torch.arange(T, device=device) + q_offset) // cfg.block_size
    assert torch.all(idx.max(-1).values == own_block)
    assert torch.all(idx[..., 0] == 0)


def test_topk_kernel_picks_like_the_reference_with_ties(device):
    gen = torch.Generator().manual_seed(13)
    scores = (torch.randint(0, 4, (3, 50, 37), generator=gen).float() / 4).to(device)  # few distinct values: ties
    scores[0, :, :3] = float("inf")
    scores[1, :, 20:] = float("-inf")  # 20 candidates for 9 picks
    scores[2, :, 5:] = float("-inf")  # fewer candidates than picks: -1 padding
    got = topk_blocks(scores, 9, backend="triton")
    torch.testing.assert_close(got, naive.topk_blocks(scores, 9), rtol=0, atol=0)
    assert (got[2, :, 5:] == -1).all() and (got[0, :, :3] == torch.arange(3, device=device)).all()


@pytest.mark.parametrize("G,Hkv,T,seed,keys_as_m", [(1, 2, 45, 5, False), (4, 1, 70, 6, True), (16, 1, 36, 7, False)])
def test_sparse_attention_forward_and_gradients_match_reference(G, Hkv, T, seed, keys_as_m, monkeypatch, device,
                                                                dtype, matches):
    monkeypatch.setitem(ops.TUNE, "dkdv", dict(ops.TUNE["dkdv"], KEYS_AS_M=keys_as_m))  # both product orientations
    q, k, v = qkv(1, T, G * Hkv, Hkv, 16, seed, requires_grad=True, device=device, dtype=dtype)
    q32, k32, v32 = fp32(q, k, v)
    with torch.no_grad():
        idx = select_blocks(q32, compress_keys(k32, SMALL), SMALL, backend="torch")
        # on odd tokens drop ~30% of the picks (never block 0): rows of different lengths, own block sometimes out
        drop = (torch.rand(idx.shape, generator=torch.Generator().manual_seed(seed)).to(device) < 0.3) & (idx > 0)
        drop[:, :, ::2] = False
        idx = torch.where(drop | (idx < 0), 10_000, idx).sort(-1).values
        idx = idx.masked_fill(idx == 10_000, -1)
    assert (idx < 0).any() and (idx >= 0).any()
    out = block_sparse_attn(q, k, v, idx, SMALL.block_size, backend="triton")
    ref = naive.sparse_attn_ref(q32, k32, v32, idx, SMALL.block_size)
    assert out.dtype == dtype
    matches(out, ref)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    grads = torch.autograd.grad(out, (q, k, v), do.to(dtype))
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), do)
    for name, got, want in zip("qkv", grads, ref_grads):
        matches(got, want, rtol=1e-4, name=f"d{name}")


@pytest.mark.parametrize("G,init_blocks,T,q_offset,seed,rows", [(1, 1, 150, 0, 14, 128), (4, 2, 40, 37, 15, 128),
                                                                 (16, 1, 50, 70, 16, 64), (2, 1, 90, 5, 17, 16)])
def test_forced_blocks_as_dense_tiles_match_reference(G, init_blocks, T, q_offset, seed, rows, monkeypatch, device,
                                                      dtype, matches):
    """With forced=..., the init and local blocks run as dense tiles of several tokens (tiles straddle query blocks
    when q_offset is not a multiple of the block), the rest per token, merged by LSE; the backward likewise
    (dq tiles as in the forward, dK/dV per key block over the query range whose window holds it)."""
    monkeypatch.setitem(ops.TUNE, "local_rows", rows)
    monkeypatch.setitem(ops.TUNE, "local_dkdv_rows", rows)
    # 16 rows = 8 tokens of 2 heads, the fewest a compiled tl.dot takes (K >= 16); the other product orientation
    monkeypatch.setitem(ops.TUNE, "local_dkdv", dict(ops.TUNE["local_dkdv"], KEYS_AS_M=rows != 16))
    cfg = SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, topk=3, init_blocks=init_blocks, window=32)
    q, k, v = qkv(1, q_offset + T, G, 1, 16, seed, requires_grad=True, device=device, dtype=dtype)
    q32, k32, v32 = fp32(q, k, v)
    idx = select_blocks(q32[:, q_offset:], compress_keys(k32.detach(), cfg), cfg, q_offset=q_offset, backend="torch")
    forced = (cfg.init_blocks, cfg.window // cfg.block_size)
    out = block_sparse_attn(q[:, q_offset:], k, v, idx, cfg.block_size, backend="triton", q_offset=q_offset,
                            forced=forced)
    ref = naive.sparse_attn_ref(q32[:, q_offset:], k32, v32, idx, cfg.block_size, q_offset=q_offset)
    matches(out, ref)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    grads = torch.autograd.grad(out, (q, k, v), do.to(dtype))
    for name, got, want in zip("qkv", grads, torch.autograd.grad(ref, (q32, k32, v32), do)):
        matches(got, want, rtol=1e-4, name=f"d{name}")


def test_sparse_equals_dense_when_topk_covers_every_block_and_switch_at_dense_len(device, dtype, matches):
    q, k, v = qkv(1, 64, 4, 2, 16, seed=8, device=device, dtype=dtype)
    cover_all = SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, topk=8, window=32, dense_len=64)
    matches(infllm_v2_attn(q, k, v, cover_all, backend="triton"), ops.dense_causal_attn(*fp32(q, k, v)))
    # from dense_len keys on, SMALL runs sparse (5 of the 6 blocks of 96 keys); one key fewer runs dense
    long_q, long_k, long_v = qkv(1, 96, 4, 2, 16, seed=9, device=device, dtype=dtype)
    sparse = infllm_v2_attn(long_q, long_k, long_v, SMALL, backend="triton")
    matches(sparse, naive.infllm_v2_attn_ref(*fp32(long_q, long_k, long_v), SMALL))
    assert (sparse.float() - ops.dense_causal_attn(*fp32(long_q, long_k, long_v))).abs().max() > 1e-1
    short = infllm_v2_attn(long_q[:, :63], long_k[:, :63], long_v[:, :63], SMALL, backend="triton")
    matches(short, ops.dense_causal_attn(*fp32(long_q[:, :63], long_k[:, :63], long_v[:, :63])))


@pytest.mark.parametrize("lse_kernels", [64, 16])  # 16: decode's normaliser pass splits its kernels
def test_prefill_then_decode_equals_one_full_pass(lse_kernels, monkeypatch, device, dtype, matches):
    monkeypatch.setitem(ops.TUNE, "lse_kernels", lse_kernels)
    B, T, H, Hkv, D = 2, 100, 8, 2, 16
    q, k, v = qkv(B, T, H, Hkv, D, seed=10, device=device, dtype=dtype)
    full = infllm_v2_attn(*fp32(q, k, v), SMALL, backend="torch")  # reference of the whole sequence
    k_cache, v_cache = (torch.zeros(B, 128, Hkv, D, device=device, dtype=dtype) for _ in range(2))
    kc_cache = torch.zeros(B, SMALL.n_kernels(128), Hkv, D, device=device, dtype=dtype)
    # a prefill below dense_len; decode crosses the switch to sparse at 64 keys. The full pass ran sparse for every
    # token, but the 64 tokens of blocks 0-3 are all forced (init + own + 2 local), so dense equals sparse there.
    prefill = 60
    k_cache[:, :prefill], v_cache[:, :prefill] = k[:, :prefill], v[:, :prefill]
    update_compressed_keys(k_cache, kc_cache, 0, prefill, SMALL)
    for t in range(prefill, T):
        k_cache[:, t], v_cache[:, t] = k[:, t], v[:, t]
        update_compressed_keys(k_cache, kc_cache, t, t + 1, SMALL)
        if t in (62, 63, 64, 80, 99):  # the kernel runs a few steps; the cache is kept at every step
            out = infllm_v2_decode(q[:, t], k_cache, v_cache, kc_cache, t + 1, SMALL, backend="triton", splits=3)
            matches(out, full[:, t], name=f"token {t}")


@pytest.mark.slow  # ~37 s on 2 CPU cores; tests/kernels/test_infllm_v2_varlen.py checks the same packs in CI
def test_varlen_equals_per_sequence_runs(device, dtype, matches):
    """The varlen kernels on a pack of two sparse sequences (>= dense_len 64), dense ones and an empty one: outputs
    and gradients match per-sequence references (tests/kernels/test_infllm_v2_varlen.py checks more)."""
    lengths = [40, 70, 20, 9, 0, 33, 64]
    q, k, v = qkv(1, sum(lengths), 4, 1, 16, seed=11, requires_grad=True, device=device, dtype=dtype)
    q32, k32, v32 = fp32(q, k, v)
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(device, torch.int32)
    packed = infllm_v2_attn(q, k, v, SMALL, cu_seqlens=cu, backend="triton")
    spans = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    alone = torch.cat([naive.infllm_v2_attn_ref(q32[:, s:e], k32[:, s:e], v32[:, s:e], SMALL) for s, e in spans],
                      dim=1)
    matches(packed, alone)
    do = torch.randn(packed.shape, generator=torch.Generator().manual_seed(11)).to(device)
    grads = torch.autograd.grad(packed, (q, k, v), do.to(dtype))
    for name, got, want in zip("qkv", grads, torch.autograd.grad(alone, (q32, k32, v32), do)):
        matches(got, want, rtol=1e-4, name=f"d{name}")


def test_imports_without_triton_fall_back_to_reference():
    q, k, v = qkv(1, 70, 2, 1, 16, seed=12)
    torch.testing.assert_close(infllm_v2_attn(q, k, v, SMALL, backend="torch"), naive.infllm_v2_attn_ref(q, k, v, SMALL))
    assert set(infllm_v2.__all__) >= {"SparseConfig", "compress_keys", "select_blocks", "block_sparse_attn",
                                      "infllm_v2_attn", "infllm_v2_decode", "update_compressed_keys"}


@pytest.mark.parametrize("size,stride", [(12, 8), (16, 6), (16, 0), (0, 8)])
def test_coarse_kernels_must_tile_whole_fine_kernels(size, stride):
    with pytest.raises(ValueError, match="lse_kernel"):
        dataclasses.replace(SMALL, lse_kernel_size=size, lse_kernel_stride=stride)
