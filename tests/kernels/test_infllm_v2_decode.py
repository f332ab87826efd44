"""InfLLM-V2's static decode step (lengths on the device, shapes set by the capacity): the PyTorch reference
against the per-row decode it replaces, the Triton kernels against the reference (fp32 on the CPU interpreter or
CUDA, bf16 too on CUDA, see tests/conftest.py), over several steps with rows of different lengths crossing kernel,
block and dense_len boundaries, and the compressed keys it keeps against compress_keys."""
import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from hyloom.kernels.infllm_v2 import (SparseConfig, compress_keys, infllm_v2_decode, infllm_v2_decode_static, naive,
                                      ops, triton_decode, update_compressed_keys, write_decode_kv)

SMALL = SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, topk=3, init_blocks=1, window=32,
                     pool_window=5, pool_stride=4, pool_padding=1, dense_len=64)
COARSE = dataclasses.replace(SMALL, lse_kernel_size=16, lse_kernel_stride=8)
# dense_len below the coarse kernel: a sparse row's first queries see no coarse kernel yet (the exact normaliser)
EARLY = dataclasses.replace(SMALL, block_size=4, window=8, dense_len=12, lse_kernel_size=32, lse_kernel_stride=8)
CAPACITY, B, H, HKV, D = 160, 3, 4, 2, 16


pytestmark = pytest.mark.usefixtures("nan_poisoned_outputs")  # tests/kernels/conftest.py


def caches(cfg, lengths, seed, device="cpu", capacity=CAPACITY):
    """Caches of `capacity` slots holding `lengths` keys per row (as a prefill leaves them), lens_B, and the keys
    and values still to come. Slots past a row's length hold large junk, which every path must mask out."""
    gen = torch.Generator().manual_seed(seed)
    k_all, v_all = (torch.randn(B, capacity, HKV, D, generator=gen) for _ in range(2))
    k, v = torch.full_like(k_all, 5.0), torch.full_like(v_all, -5.0)
    kc = torch.full((B, cfg.n_kernels(capacity), HKV, D), 5.0)
    for row, n in enumerate(lengths):
        k[row, :n], v[row, :n] = k_all[row, :n], v_all[row, :n]
        update_compressed_keys(k[row:row + 1], kc[row:row + 1], 0, n, cfg)
    lens = torch.tensor(lengths, dtype=torch.int32)
    return [x.to(device) for x in (k, v, kc, lens, k_all, v_all)]


def per_row_decode(q, k, v, kc, lens, cfg):
    """The decode the static step replaces: each row alone over its first lens[row] keys (PyTorch reference)."""
    return torch.cat([infllm_v2_decode(q[r:r + 1], k[r:r + 1], v[r:r + 1], kc[r:r + 1], int(lens[r]), cfg,
                                       backend="torch") for r in range(q.shape[0])])


def test_compressed_keys_kept_step_by_step_equal_compress_keys():
    k, v, kc, lens, k_all, v_all = caches(SMALL, [0, 5, 30], seed=1)
    for _ in range(21):  # kernels complete at 8, 12, 16, ... keys: rows reach them at different steps
        at = lens.long()
        write_decode_kv(k, v, kc, lens, k_all[torch.arange(B), at], v_all[torch.arange(B), at], SMALL)
    assert lens.tolist() == [21, 26, 51]
    for row, n in enumerate(lens.tolist()):
        held = SMALL.n_kernels(n)
        torch.testing.assert_close(kc[row, :held], compress_keys(k_all[row:row + 1, :n], SMALL)[0])
        torch.testing.assert_close(k[row, :n], k_all[row, :n])
        assert (kc[row, held:] == 5.0).all() and (k[row, n:] == 5.0).all()  # nothing written past the length


@pytest.mark.parametrize("cfg", [SMALL, COARSE, EARLY], ids=["exact", "coarse", "early"])
def test_static_reference_equals_the_per_row_decode(cfg):
    """Awkward lengths in one batch: below and at dense_len, one past it, a partial last block, near capacity."""
    gen = torch.Generator().manual_seed(2)
    for lengths in ([1, 63, 64], [65, 100, 159], [13, 12, 11]):
        k, v, kc, lens, _, _ = caches(cfg, lengths, seed=3)
        q = torch.randn(B, H, D, generator=gen)
        torch.testing.assert_close(naive.infllm_v2_decode_static_ref(q, k, v, kc, lens, cfg),
                                   per_row_decode(q, k, v, kc, lens, cfg), rtol=1e-5, atol=1e-5)


def decode_steps(cfg, lengths, steps, device, seed, capacity=CAPACITY):
    """Yields (q, caches after the append) for `steps` static decode steps from rows holding `lengths` keys."""
    k, v, kc, lens, k_all, v_all = caches(cfg, lengths, seed, device, capacity)
    gen = torch.Generator().manual_seed(seed + 1)
    rows = torch.arange(B, device=device)
    for _ in range(steps):
        at = lens.long()
        write_decode_kv(k, v, kc, lens, k_all[rows, at], v_all[rows, at], cfg)
        yield torch.randn(B, H, D, generator=gen).to(device), k, v, kc, lens


@pytest.mark.parametrize("cfg,lengths,splits", [(SMALL, [50, 61, 3], 3), (COARSE, [57, 90, 64], 4),
                                                pytest.param(EARLY, [9, 30, 2], 2, marks=pytest.mark.slow)],
                         ids=["exact", "coarse", "early"])  # early: ~27 s on 2 CPU cores, out of CI
def test_triton_static_decode_matches_the_reference_over_steps(cfg, lengths, splits, device, dtype, tol):
    """8 steps: rows cross dense_len, block and kernel boundaries at different steps. Picks equal exactly, on fp32
    inputs (in bf16 a near-tie may flip a pick); attention in `dtype`: fp32 through the public call, bf16 (CUDA
    only, see tests/conftest.py) over the reference's picks, by the relative L2 error."""
    if device.type == "cuda" and cfg.block_size < 16:  # compiled tl.dot needs K >= 16: the interpreter runs EARLY
        q, k, v, kc, lens = next(decode_steps(cfg, lengths, 1, device, seed=4))
        with pytest.raises(ValueError, match="block_size >= 16"):
            infllm_v2_decode_static(q.to(dtype), k.to(dtype), v.to(dtype), kc.to(dtype), lens, cfg, backend="triton")
        return
    for q, k, v, kc, lens in decode_steps(cfg, lengths, 8, device, seed=4):
        want_idx = naive.decode_select_ref(q, kc, lens, cfg, CAPACITY)
        got_idx = ops._decode_select(q, kc, lens, cfg, D ** -0.5, CAPACITY)
        assert torch.equal(got_idx, want_idx), lens.tolist()
        if dtype == torch.float32:
            got = infllm_v2_decode_static(q, k, v, kc, lens, cfg, backend="triton", splits=splits)
            want = naive.infllm_v2_decode_static_ref(q, k, v, kc, lens, cfg)
            assert not got.isnan().any()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"lengths {lens.tolist()}: {m}")
            continue
        q_, k_, v_, kc_ = (t.to(dtype) for t in (q, k, v, kc))
        got = ops._decode_attn(q_, k_, v_, want_idx, lens, cfg.block_size, D ** -0.5, splits)
        want = naive.decode_attn_ref(q_, k_, v_, want_idx, lens, cfg.block_size)  # fp32 over the same bf16 values
        assert got.dtype == dtype and not got.isnan().any()
        err = ((got.float() - want).norm() / want.norm()).item()
        assert err <= tol, f"lengths {lens.tolist()}: rel err {err:.2e} > {tol:.0e}"
        whole = infllm_v2_decode_static(q_, k_, v_, kc_, lens, cfg, backend="triton", splits=splits)
        assert whole.dtype == dtype and not whole.isnan().any()  # bf16 selection runs (its picks may differ)
    assert lens.tolist() == [n + 8 for n in lengths]


class GridSpy:
    """Stands in for a Triton kernel: records each launch's grid, then launches the kernel."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("cfg", [SMALL, COARSE], ids=["exact", "coarse"])
def test_triton_static_decode_splits_its_passes_among_programs(cfg, device, monkeypatch):
    """At CAPACITY every pass runs one program; here a larger capacity and 16 kernels a program make the LSE pass
    run several programs along the kernels (partial LSEs merged by the scores kernel) and the block scores several
    along the blocks (program_id(0) > 0: blocks 16 and up), with rows past, at and below dense_len."""
    capacity = 320
    monkeypatch.setitem(ops.TUNE, "lse_kernels", 16)
    lse, scores = GridSpy(triton_decode._decode_lse), GridSpy(triton_decode._decode_block_scores)
    monkeypatch.setattr(triton_decode, "_decode_lse", lse)
    monkeypatch.setattr(triton_decode, "_decode_block_scores", scores)
    for q, k, v, kc, lens in decode_steps(cfg, [290, 63, 200], 2, device, seed=7, capacity=capacity):
        want_idx = naive.decode_select_ref(q, kc, lens, cfg, capacity)
        assert torch.equal(ops._decode_select(q, kc, lens, cfg, D ** -0.5, capacity), want_idx), lens.tolist()
        got = infllm_v2_decode_static(q, k, v, kc, lens, cfg, backend="triton", splits=3)
        torch.testing.assert_close(got, naive.infllm_v2_decode_static_ref(q, k, v, kc, lens, cfg), rtol=1e-5,
                                   atol=1e-5)
    assert lse.grids and all(grid[1] > 1 for grid in lse.grids)
    assert scores.grids and all(grid[0] == 2 for grid in scores.grids)
    assert (want_idx[0] >= 16).any()  # among the picks, a block that the second scores program scored


def test_the_static_decode_op_passes_opcheck_and_compiles_without_retracing_its_kernels(device):
    """hyloom::infllm_v2_decode_static: schema and fake output (torch.library.opcheck), and a torch.compile'd call
    (Inductor once re-traced the Triton kernels inside and failed on the GPU) equal to the eager one."""
    q, k, v, kc, lens = next(decode_steps(COARSE, [57, 90, 64], 1, device, seed=3))
    args = (q, k, v, kc, lens, list(dataclasses.astuple(COARSE)), D ** -0.5, 2)
    results = torch.library.opcheck(ops.decode_static_op, args)
    assert set(results.values()) == {"SUCCESS"}, results
    compiled = torch.compile(ops.decode_static_op, fullgraph=True)
    torch.testing.assert_close(compiled(*args), ops.decode_static_op(*args), rtol=0, atol=0)


def test_selection_is_really_sparse_past_dense_len():
    """A row past dense_len drops blocks (k_total 5 of 10): the static decode is not dense attention."""
    k, v, kc, lens, _, _ = caches(SMALL, [150, 150, 40], seed=5)
    q = torch.randn(B, H, D, generator=torch.Generator().manual_seed(6))
    idx = naive.decode_select_ref(q, kc, lens, SMALL, CAPACITY)
    assert ((idx[:2] >= 0).sum(-1) == SMALL.k_total).all() and ((idx[2] >= 0).sum(-1) == 3).all()
    dense = naive.decode_attn_ref(q, k, v, torch.arange(10).expand(B, HKV, 10), lens, 16)
    assert (naive.decode_attn_ref(q, k, v, idx, lens, 16) - dense)[:2].abs().max() > 1e-2


def test_the_static_decode_refuses_caches_and_lengths_it_would_misuse():
    """Checked on the host before anything runs: too few kernel slots (the clamped write would land in the last
    one), lengths that are not int32 [B] on the query's device, query heads that the KV heads do not divide."""
    k, v, kc, lens, k_all, v_all = caches(SMALL, [20, 30, 40], seed=8)
    q = torch.randn(B, H, D)
    new = k_all[:, 40], v_all[:, 40]
    short, k_before = kc[:, :-1], k.clone()
    for bad_kc, bad_lens, match in [
            (short, lens, rf"kc_cache has {kc.shape[1] - 1} kernel slots.*cfg.n_kernels\(160\) = {kc.shape[1]}"),
            (kc, lens.long(), r"lens_B must be int32 \[3\] on cpu, not int64 \[3\]"),
            (kc, lens[:2], r"lens_B must be int32 \[3\] on cpu, not int32 \[2\]"),
            (kc, lens.to("meta"), r"lens_B must be int32 \[3\] on cpu, not int32 \[3\] on meta")]:
        with pytest.raises(ValueError, match=match):
            write_decode_kv(k, v, bad_kc, bad_lens, *new, SMALL)
        with pytest.raises(ValueError, match=match):
            infllm_v2_decode_static(q, k, v, bad_kc, bad_lens, SMALL, backend="torch")
    with pytest.raises(ValueError, match=r"q_BHD has 3 heads, not a multiple of k_cache's 2 KV heads"):
        infllm_v2_decode_static(q[:, :3], k, v, kc, lens, SMALL, backend="torch")
    assert lens.tolist() == [20, 30, 40] and torch.equal(k, k_before)  # refused before writing anything
