"""torch.compile with inductor on CUDA: the hybrid (InfLLM-V2 past its dense_len, Lightning, HyPE) compiles
without a graph break, its custom ops in the graph, and gives the eager logits and gradients (skipped without
CUDA). Run on the GPU machine: `python -m pytest tests/gpu -q`."""

import pytest
import torch

import hyloom
from hyloom.blueprint import load_blueprint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_inductor_compiled_hybrid_matches_eager(autocast):
    torch.manual_seed(0)
    model = hyloom.build_model(load_blueprint("builtin:tiny"), device="cuda").train()
    ids = torch.randint(0, 4096, (2, 320), device="cuda")  # past dense_len (128): select + block-sparse kernels

    def step(fn, bf16=autocast):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            logits = fn(ids)
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten()).backward()
        return [logits.float()] + [p.grad.clone() for p in model.parameters()]

    names = ["logits"] + [n for n, _ in model.named_parameters()]
    if not autocast:
        eager = step(model)
        torch._dynamo.reset()
        compiled = step(torch.compile(model, fullgraph=True))
        # inductor reorders sums and its matmuls may use TF32
        worst = max(zip((rel(c, e) for e, c in zip(eager, compiled)), names))
        assert worst[0] < 1e-3, f"{worst[1]}: rel err {worst[0]:.2e}"
        return
    # bf16 rounds at different places compiled and eager: both are held against the fp32 eager pass, and the
    # compiled one may not be much further from it than eager bf16 is
    reference = step(model, bf16=False)
    eager = step(model)
    torch._dynamo.reset()
    compiled = step(torch.compile(model, fullgraph=True))
    for name, r, e, c in zip(names, reference, eager, compiled):
        assert rel(c, r) <= 2 * rel(e, r) + 5e-3, f"{name}: compiled {rel(c, r):.2e}, eager {rel(e, r):.2e} from fp32"


def test_compiled_graph_holds_the_custom_ops():
    torch.manual_seed(0)
    model = hyloom.build_model(load_blueprint("builtin:tiny"), device="cuda").train()
    ids = torch.randint(0, 4096, (1, 320), device="cuda")
    explained = torch._dynamo.explain(model)(ids)
    assert explained.graph_break_count == 0, explained.break_reasons
    # the Lightning layer runs inside a selective-checkpoint region (hyloom.recompute): its ops sit in a nested
    # graph module of the captured graph
    called = {str(n.target) for g in explained.graphs for m in g.modules() if isinstance(m, torch.fx.GraphModule)
              for n in m.graph.nodes if n.op == "call_function"}
    assert {"hyloom.lightning_fwd.default", "hyloom.infllm_v2_select.default",
            "hyloom.infllm_v2_sparse_fwd.default"} <= called, called
