"""The Triton kernels as torch custom ops (hyloom::*): torch.library.opcheck on each op (schema, fake shapes,
autograd registration; AOT dispatch with dynamic shapes in the slow run: the `opcheck` fixture), and a tiny hybrid
on the Triton path traced by torch.compile with fullgraph=True (no graph break) giving the eager outputs and
gradients.

fp32 and tiny shapes: on CPU the kernels run in Triton's interpreter (see tests/conftest.py)."""
import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from hyloom.kernels import lightning  # noqa: E402
from hyloom.kernels.infllm_v2 import SparseConfig, compress_keys, ops  # noqa: E402
from hyloom.kernels.lightning import ops as lightning_ops  # noqa: E402
from hyloom.kernels.lightning import triton_impl  # noqa: E402
from hyloom.testing import tiny_model  # noqa: E402

SMALL = SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, topk=2, init_blocks=1, window=16,
                     pool_window=5, pool_stride=4, pool_padding=1, dense_len=32)


@pytest.fixture(autouse=True)
def short_segments(monkeypatch):
    monkeypatch.setattr(triton_impl, "SEGMENT_LEN", 64)  # several segments per row: the state scan runs


def randn(*shape, device, grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed + len(shape) + shape[-1])
    return torch.randn(*shape, generator=gen).to(device).requires_grad_(grad)


@pytest.mark.parametrize("case", ["state", "plain", "varlen"])
def test_lightning_ops_pass_opcheck(device, case, opcheck):
    T, H, D = 80, 2, 16
    B = 1 if case == "varlen" else 2
    q, k, v = (randn(B, T, H, D, device=device, grad=True, seed=i) for i in range(3))
    g = torch.tensor([0.0, -0.5], device=device)
    h0 = randn(B, H, D, D, device=device, grad=True) if case == "state" else None
    cu = torch.tensor([0, 30, 80], dtype=torch.int32, device=device) if case == "varlen" else None
    opcheck(lightning_ops.lightning_fwd, (q, k, v, g, h0, 0.25, case != "plain", cu))
    o, final, states = lightning_ops.lightning_fwd(q, k, v, g, h0, 0.25, case != "plain", cu)
    do = torch.randn_like(o)
    dht = torch.randn_like(final) if case != "plain" else None
    plain = [x.detach() for x in (q, k, v)]
    opcheck(lightning_ops.lightning_bwd, (*plain, g, do, dht, states.detach(), 0.25, case == "state", cu))


def test_infllm_v2_ops_pass_opcheck(device, opcheck):
    B, T, H, Hkv, D = 1, 48, 2, 1, 16
    q = randn(B, T, H, D, device=device, grad=True)
    k, v = (randn(B, T, Hkv, D, device=device, grad=True, seed=i) for i in (1, 2))
    kc = compress_keys(k.detach(), SMALL)
    cfg = list(dataclasses.astuple(SMALL))
    opcheck(ops.select_op, (q.detach(), kc, cfg, 0.25, 0))
    idx = ops.select_op(q.detach(), kc, cfg, 0.25, 0)
    assert idx.shape == (B, Hkv, T, SMALL.k_total) and idx.dtype == torch.int32
    opcheck(ops.sparse_fwd_op, (q, k, v, idx, SMALL.block_size, 0.25, 0, [1, 1]))
    o, lse = ops.sparse_fwd_op(q, k, v, idx, SMALL.block_size, 0.25, 0, None)
    plain = [x.detach() for x in (q, k, v)]
    do = torch.randn_like(o)
    opcheck(ops.sparse_bwd_op, (*plain, idx, o.detach(), lse.detach(), do, SMALL.block_size, 0.25, 0, None))


def hybrid(seed=0):
    """Two layers, InfLLM-V2 (past its dense_len: compress, select, sparse attention) then Lightning, HyPE."""
    sparse = {"type": "infllm_v2", "heads": 2, "kv_heads": 1, "head_dim": 16, "qk_norm": True, "gate": True,
              **{k: getattr(SMALL, k) for k in ("block_size", "kernel_size", "kernel_stride", "topk", "init_blocks",
                                                 "window", "dense_len")}}
    linear = {"type": "lightning", "heads": 2, "head_dim": 16, "decay": "alibi"}
    return tiny_model(sparse, mixers={"L": linear}, layout="ML", position={"type": "hype", "rope_theta": 10000},
                      seed=seed).train()


def test_compiled_hybrid_has_no_graph_break_and_matches_eager(device, monkeypatch):
    monkeypatch.setattr(lightning, "TRITON_ON_CPU", True)  # the Triton path on CPU tensors too (interpreter)
    monkeypatch.setattr(ops, "TRITON_ON_CPU", True)
    model = hybrid().to(device)
    ids = torch.randint(0, 61, (1, 48), generator=torch.Generator().manual_seed(0)).to(device)
    graphs = []

    def recording_backend(gm, example_inputs):  # aot_eager, keeping each traced graph for the check below
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    def step(fn):
        model.zero_grad()
        logits = fn(ids)
        logits.float().square().mean().backward()
        return [logits] + [p.grad.clone() for p in model.parameters()]

    eager = step(model)
    compiled = step(torch.compile(model, backend=recording_backend, fullgraph=True))
    assert len(graphs) == 1
    # Lightning runs inside a selective-checkpoint region (hyloom.recompute): its ops sit in a nested graph module
    called = {str(n.target) for m in graphs[0].modules() if isinstance(m, torch.fx.GraphModule)
              for n in m.graph.nodes if n.op == "call_function"}
    for op in ("hyloom.lightning_fwd.default", "hyloom.infllm_v2_select.default",
               "hyloom.infllm_v2_sparse_fwd.default"):
        assert op in called, f"{op} is not in the traced graph (the reference path ran?)"
    for name, a, b in zip(["logits"] + [n for n, _ in model.named_parameters()], eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
