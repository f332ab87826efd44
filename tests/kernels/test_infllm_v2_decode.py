"""InfLLM-V2's static decode step (lengths on the device, shapes set by the capacity): the PyTorch reference
against the per-row decode it replaces, the Triton kernels against the reference (fp32; the CPU interpreter or
CUDA, see tests/conftest.py), over several steps with rows of different lengths crossing kernel, block and
dense_len boundaries, and the compressed keys it keeps against compress_keys."""
import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from hyloom.kernels.infllm_v2 import (SparseConfig, compress_keys, infllm_v2_decode, infllm_v2_decode_static, naive,
                                      ops, update_compressed_keys, write_decode_kv)

SMALL = SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, topk=3, init_blocks=1, window=32,
                     pool_window=5, pool_stride=4, pool_padding=1, dense_len=64)
COARSE = dataclasses.replace(SMALL, lse_kernel_size=16, lse_kernel_stride=8)
# dense_len below the coarse kernel: a sparse row's first queries see no coarse kernel yet (the exact normaliser)
EARLY = dataclasses.replace(SMALL, block_size=4, window=8, dense_len=12, lse_kernel_size=32, lse_kernel_stride=8)
CAPACITY, B, H, HKV, D = 160, 3, 4, 2, 16


@pytest.fixture(autouse=True)
def nan_poisoned_outputs(monkeypatch):
    """Every kernel output starts as NaN (-12345 for indices), so a cell the kernel forgets to write fails."""
    def nan_empty(*shape, device=None, dtype=None):
        shape = shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape
        poison = float("nan") if dtype is None or dtype.is_floating_point else -12345
        return torch.full(tuple(shape), poison, device=device, dtype=dtype)
    monkeypatch.setattr(ops, "_empty", nan_empty)


def caches(cfg, lengths, seed, device="cpu"):
    """Caches of CAPACITY slots holding `lengths` keys per row (as a prefill leaves them), lens_B, and the keys
    and values still to come. Slots past a row's length hold large junk, which every path must mask out."""
    gen = torch.Generator().manual_seed(seed)
    k_all, v_all = (torch.randn(B, CAPACITY, HKV, D, generator=gen) for _ in range(2))
    k, v = torch.full_like(k_all, 5.0), torch.full_like(v_all, -5.0)
    kc = torch.full((B, cfg.n_kernels(CAPACITY), HKV, D), 5.0)
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


def decode_steps(cfg, lengths, steps, device, seed):
    """Yields (q, caches after the append) for `steps` static decode steps from rows holding `lengths` keys."""
    k, v, kc, lens, k_all, v_all = caches(cfg, lengths, seed, device)
    gen = torch.Generator().manual_seed(seed + 1)
    rows = torch.arange(B, device=device)
    for _ in range(steps):
        at = lens.long()
        write_decode_kv(k, v, kc, lens, k_all[rows, at], v_all[rows, at], cfg)
        yield torch.randn(B, H, D, generator=gen).to(device), k, v, kc, lens


@pytest.mark.parametrize("cfg,lengths,splits", [(SMALL, [50, 61, 3], 3), (COARSE, [57, 90, 64], 4),
                                                (EARLY, [9, 30, 2], 2)], ids=["exact", "coarse", "early"])
def test_triton_static_decode_matches_the_reference_over_steps(cfg, lengths, splits, device):
    """8 steps: rows cross dense_len, block and kernel boundaries at different steps; picks equal exactly."""
    if device.type == "cuda" and cfg.block_size < 16:  # compiled tl.dot needs K >= 16: the interpreter runs EARLY
        q, k, v, kc, lens = next(decode_steps(cfg, lengths, 1, device, seed=4))
        with pytest.raises(ValueError, match="block_size >= 16"):
            infllm_v2_decode_static(q, k, v, kc, lens, cfg, backend="triton")
        return
    for q, k, v, kc, lens in decode_steps(cfg, lengths, 8, device, seed=4):
        want_idx = naive.decode_select_ref(q, kc, lens, cfg, CAPACITY)
        got_idx = ops._decode_select(q, kc, lens, cfg, D ** -0.5, CAPACITY)
        assert torch.equal(got_idx, want_idx), lens.tolist()
        got = infllm_v2_decode_static(q, k, v, kc, lens, cfg, backend="triton", splits=splits)
        want = naive.infllm_v2_decode_static_ref(q, k, v, kc, lens, cfg)
        assert not got.isnan().any()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"lengths {lens.tolist()}: {m}")
    assert lens.tolist() == [n + 8 for n in lengths]


def test_selection_is_really_sparse_past_dense_len():
    """A row past dense_len drops blocks (k_total 5 of 10): the static decode is not dense attention."""
    k, v, kc, lens, _, _ = caches(SMALL, [150, 150, 40], seed=5)
    q = torch.randn(B, H, D, generator=torch.Generator().manual_seed(6))
    idx = naive.decode_select_ref(q, kc, lens, SMALL, CAPACITY)
    assert ((idx[:2] >= 0).sum(-1) == SMALL.k_total).all() and ((idx[2] >= 0).sum(-1) == 3).all()
    dense = naive.decode_attn_ref(q, k, v, torch.arange(10).expand(B, HKV, 10), lens, 16)
    assert (naive.decode_attn_ref(q, k, v, idx, lens, 16) - dense)[:2].abs().max() > 1e-2
