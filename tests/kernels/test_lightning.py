"""Lightning Attention: Triton kernels against the PyTorch reference in fp32.

The kernels run where tests/conftest.py says (`device`: compiled on CUDA, else the CPU interpreter), in each
`dtype` it offers (bf16 on CUDA only), against the fp32 reference on the same values. Outputs are NaN-poisoned
before the kernels write them, and segments are made short (SEGMENT_LEN) so that every case crosses segment and
chunk boundaries and exercises the state scan.
"""
import os

import pytest
import torch

from hyloom.kernels import lightning
from hyloom.kernels.lightning import (decay_alibi, decay_alibi_layer, decay_tnl_linear, lightning_attn,
                                      lightning_attn_decode, naive)

triton_impl = pytest.importorskip("hyloom.kernels.lightning.triton_impl")  # skips when triton is missing


@pytest.fixture(autouse=True)
def short_segments(monkeypatch):
    monkeypatch.setattr(triton_impl, "POISON_OUTPUTS", True)
    monkeypatch.setattr(triton_impl, "SEGMENT_LEN", 128)


REFERENCE_TOL = 1e-5  # two fp32 forms of the reference on the CPU


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def assert_close(a, b, name, tol):
    assert not torch.isnan(a).any(), f"{name}: NaN (an element the kernel never wrote?)"
    err = rel(a, b)
    print(f"{name}: rel err {err:.2e} (tol {tol:.0e})")  # the margins, shown by pytest -rP
    assert err <= tol, f"{name}: rel err {err:.2e} > {tol:.0e}"


def inputs(T, H, D, device, dtype=torch.float32, n_states=None, seed=0):
    """q, k, v in `dtype`, the fp32 initial state and decay, all on `device`, as gradient leaves."""
    gen = torch.Generator().manual_seed(seed)
    leaf = lambda x, dt: x.to(device, dt).requires_grad_()
    q, k, v = (leaf(torch.randn(1, T, H, D, generator=gen), dtype) for _ in range(3))
    h0 = None if n_states is None else leaf(torch.randn(n_states, H, D, D, generator=gen), torch.float32)
    # a non-decaying head, the alibi extremes: λ from 1 down to ~0.14
    g = torch.tensor([0.0, -2.0, -0.05])[:H].to(device)
    return q, k, v, g, h0


def as_fp32_leaves(*xs):
    """The same values in fp32 as new leaves: the reference runs in fp32 on exactly what the kernel saw."""
    return [None if x is None else x.detach().float().requires_grad_() for x in xs]


def run_both(q, k, v, g, h0, cu=None, causal=True, out_grads_seed=1):
    """o, final state and the gradients of a random linear loss, for the Triton path (on q's dtype and device)
    and the fp32 reference (on the same device)."""
    results = []
    for backend, leaves in (("triton", (q, k, v, h0)), ("naive", as_fp32_leaves(q, k, v, h0))):
        o, hT = lightning_attn(*leaves[:3], g, initial_state=leaves[3], output_final_state=h0 is not None,
                               cu_seqlens=cu, causal=causal, backend=backend)
        gen = torch.Generator().manual_seed(out_grads_seed)
        loss = (o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum()
        if hT is not None:
            loss = loss + (hT * torch.randn(hT.shape, generator=gen).to(hT.device)).sum()
        leaves = [x for x in leaves if x is not None]
        results.append((o, hT, torch.autograd.grad(loss, leaves)))
    return results


# T covers T < chunk, T = chunk, chunk + 1 and several chunks over two segments; D two non-powers of two
@pytest.mark.parametrize("T,D", [(1, 64), (63, 48), (64, 96), (65, 64), (200, 48), (200, 96)])
def test_causal_forward_backward_with_states(T, D, device, dtype, tol):
    q, k, v, g, h0 = inputs(T, 3, D, device, dtype, n_states=1, seed=T + D)
    (o, hT, grads), (o_r, hT_r, grads_r) = run_both(q, k, v, g, h0)
    assert o.dtype == dtype and hT.dtype == torch.float32
    assert_close(o, o_r, "o", tol)
    assert_close(hT, hT_r, "final state", tol)
    for name, a, b in zip(("dq", "dk", "dv", "dh0"), grads, grads_r):
        assert_close(a, b, name, tol)


def test_head_dim_256_and_no_initial_state(device, dtype, tol):
    # D > 128 takes the split launches (dv and dk tiled differently)
    q, k, v, g, _ = inputs(70, 2, 256, device, dtype, seed=3)
    (o, hT, grads), (o_r, _, grads_r) = run_both(q, k, v, g, None)
    assert hT is None
    assert_close(o, o_r, "o", tol)
    for name, a, b in zip(("dq", "dk", "dv"), grads, grads_r):
        assert_close(a, b, name, tol)


def test_varlen_equals_each_sequence_alone(device, dtype, tol):
    lengths = [70, 0, 1, 129]  # an empty sequence, a single token, one over a segment boundary
    cu = torch.tensor([0, 70, 70, 71, 200], dtype=torch.int32, device=device)
    q, k, v, g, h0 = inputs(200, 2, 48, device, dtype, n_states=4, seed=5)
    (o, hT, grads), (o_r, hT_r, grads_r) = run_both(q, k, v, g, h0, cu=cu)
    assert_close(o, o_r, "o", tol)
    assert_close(hT, hT_r, "final state", tol)
    for name, a, b in zip(("dq", "dk", "dv", "dh0"), grads, grads_r):
        assert_close(a, b, name, tol)
    # packed output == each sequence run alone through the Triton path (the same kernels: fp32-tight in any dtype
    # but for the rounding of o to the dtype)
    start = 0
    for n, length in enumerate(lengths):
        sl = slice(start, start + length)
        o_n, hT_n = lightning_attn(q[:, sl], k[:, sl], v[:, sl], g, initial_state=h0[n:n + 1],
                                   output_final_state=True, backend="triton")
        if length:
            assert_close(o[:, sl], o_n, f"o of sequence {n}", tol)
        assert_close(hT[n:n + 1], hT_n, f"final state of sequence {n}", tol)
        start += length


def test_prefill_in_two_calls_then_decode_equals_one_pass(device, dtype, tol):
    q, k, v, g, h0 = inputs(150, 3, 64, device, dtype, n_states=1, seed=7)
    with torch.no_grad():
        o_full, h_full = lightning_attn(q.float(), k.float(), v.float(), g, initial_state=h0,
                                        output_final_state=True, backend="naive")
        o1, h1 = lightning_attn(q[:, :90], k[:, :90], v[:, :90], g, initial_state=h0, output_final_state=True,
                                backend="triton")
        o2, h2 = lightning_attn(q[:, 90:140], k[:, 90:140], v[:, 90:140], g, initial_state=h1,
                                output_final_state=True, backend="triton")
        assert_close(torch.cat([o1, o2], 1), o_full[:, :140], "chunked prefill o", tol)
        state = h2
        for t in range(140, 150):
            o_t, state = lightning_attn_decode(q[:, t], k[:, t], v[:, t], g, state, backend="triton")
            assert o_t.dtype == dtype and state.dtype == torch.float32
            assert_close(o_t, o_full[:, t], f"decode o at {t}", tol)
        assert_close(state, h_full, "state after decode", tol)


def test_decode_step_against_reference_batch(device, dtype, tol):
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(3, 2, 96, generator=gen).to(device, dtype) for _ in range(3))
    state = torch.randn(3, 2, 96, 96, generator=gen).to(device)
    g = decay_alibi(2).to(device)
    o, s = lightning_attn_decode(q, k, v, g, state, backend="triton")
    o_r, s_r = naive.decode(q.float(), k.float(), v.float(), g, state)
    assert_close(o, o_r, "decode o", tol)
    assert_close(s, s_r, "decode state", tol)


@pytest.mark.parametrize("cu", [None, [0, 50, 150]])
def test_non_causal_against_definition(cu, device, dtype, tol):
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
    q, k, v, g, _ = inputs(150, 3, 48, device, dtype, seed=13)
    q32, k32, v32 = as_fp32_leaves(q, k, v)
    o = lightning_attn(q, k, v, g, causal=False, cu_seqlens=cu_t, backend="triton")[0]
    o_def = naive.parallel_noncausal(q32, k32, v32, g, cu_seqlens=cu_t)
    assert_close(o, o_def, "non-causal o", tol)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(device)
    grads = torch.autograd.grad((o.float() * do).sum(), (q, k, v))
    grads_def = torch.autograd.grad((o_def * do).sum(), (q32, k32, v32))
    for name, a, b in zip(("dq", "dk", "dv"), grads, grads_def):
        assert_close(a, b, f"non-causal {name}", tol)


def test_non_causal_without_decay_is_q_times_ktv(device, dtype, tol):
    q, k, v, _, _ = inputs(80, 2, 32, device, dtype, seed=17)
    o = lightning_attn(q, k, v, torch.zeros(2, device=device), causal=False, scale=1.0, backend="triton")[0]
    expected = torch.einsum("bthd,bshd,bshe->bthe", q.float(), k.float(), v.float())
    assert_close(o, expected, "Q (Kᵀ V)", tol)


def test_recurrent_and_chunked_reference_agree():
    q, k, v, g, h0 = inputs(130, 3, 48, "cpu", n_states=2, seed=19)
    cu = torch.tensor([0, 61, 130], dtype=torch.int32)
    kw = dict(initial_state=h0, output_final_state=True, cu_seqlens=cu)
    o_rec, h_rec = naive.causal(q, k, v, g, form="recurrent", **kw)
    o_chk, h_chk = naive.causal(q, k, v, g, form="chunked", chunk=16, **kw)
    assert_close(o_chk, o_rec, "o", REFERENCE_TOL)
    assert_close(h_chk, h_rec, "state", REFERENCE_TOL)
    # and the causal parallel form O = [(Q Kᵀ) ⊙ M] V on one sequence, no initial state
    i = torch.arange(61.0)
    M = torch.where(i[:, None] >= i[None, :], g[:, None, None] * (i[:, None] - i[None, :]), float("-inf")).exp()
    scores = torch.einsum("thd,shd->hts", q[0, :61], k[0, :61]) * M * 48 ** -0.5
    o_par = torch.einsum("hts,she->the", scores, v[0, :61])
    o_nostate, _ = naive.causal(q[:, :61], k[:, :61], v[:, :61], g, form="recurrent")
    assert_close(o_nostate[0], o_par, "parallel form", REFERENCE_TOL)


def test_decay_conventions():
    g = decay_alibi(32)
    assert g.shape == (32,) and (g < 0).all()
    lam = g.exp()
    assert abs(lam[0].item() - 0.4313) < 1e-3 and abs(lam[-1].item() - 0.99610) < 1e-4
    assert torch.allclose(decay_alibi_layer(32, 0, 24), g * (1 + 1e-5))
    assert torch.allclose(decay_alibi_layer(32, 23, 24), g * 1e-5)  # last layer: almost no decay
    tnl = decay_tnl_linear(8, 2, 4)
    assert torch.allclose(tnl, -(8 / 8) * (1 - 2 / 4) * torch.arange(8.0))


def test_backend_choice_and_bf16_reference_on_cpu():
    # CPU tensors default to the reference; the reference keeps the input dtype for o and fp32 states
    q, k, v, g, _ = inputs(10, 2, 16, "cpu", seed=23)
    o, hT = lightning_attn(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, output_final_state=True)
    assert o.dtype == torch.bfloat16 and hT.dtype == torch.float32
    with pytest.raises(ValueError):
        lightning_attn(q, k, v, g, causal=False, output_final_state=True)


def test_kernels_compiled_on_cuda_interpreted_on_cpu_and_picked_by_the_tensors_device(device):
    # tests/conftest.py sets TRITON_INTERPRET only without a GPU: on CUDA it would reach the model tests too
    assert (os.environ.get("TRITON_INTERPRET") == "1") == (device.type == "cpu")
    assert lightning._pick_backend(None, torch.zeros(1)) == "naive"
    assert lightning._pick_backend(None, torch.zeros(1, device=device)) == ("triton" if device.type == "cuda"
                                                                           else "naive")
