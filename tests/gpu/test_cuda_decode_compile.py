"""The compiled decode step (decode_step(compile=True): inductor, then captured in CUDA graphs) against eager
decode, on a small MiniCPM-SALA-shaped model whose left-padded rows cross InfLLM-V2's kernel, block and dense_len
boundaries; it is still one CUDA graph, and a model twice as deep compiles nothing more. Skipped without CUDA.
Run on the GPU machine: `python -m pytest -q tests/gpu/test_cuda_decode_compile.py`."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import hyloom
import hyloom.decode
from hyloom.blueprint import blueprint_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# as tests/gpu/test_cuda_decode.py: sparse layers first and last, G = 8, the coarse normaliser, dense_len 160
SALA_LIKE = {"d_model": 128, "vocab_size": 512, "position": {"type": "hype"},
             "mixers": {"S": {"type": "infllm_v2", "heads": 16, "kv_heads": 2, "head_dim": 32, "gate": True,
                              "block_size": 16, "kernel_size": 8, "kernel_stride": 4, "topk": 4, "window": 32,
                              "dense_len": 160, "lse_kernel_size": 32, "lse_kernel_stride": 16},
                        "L": {"type": "lightning", "heads": 4, "head_dim": 32, "gate": True, "output_norm": True}},
             "ffn": {"type": "swiglu", "hidden": 256}, "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 16}


def sala_like(layout="SLLSLS", dtype=torch.float32, **changes):
    torch.manual_seed(0)
    model = {**SALA_LIKE, **changes, "n_layers": len(layout), "layout": layout}
    spec = blueprint_model().model_validate({"model": model})
    return hyloom.build_model(spec, device="cuda", dtype=dtype).eval()


@pytest.fixture
def counter(monkeypatch):
    torch._dynamo.reset()
    counting = CompileCounterWithBackend("inductor")
    monkeypatch.setattr(hyloom.decode, "COMPILE_BACKEND", counting)
    yield counting
    torch._dynamo.reset()


def run(model, graphs: bool, compile: bool, steps=41):
    # row 0 prefills dense and turns sparse at 160 keys; row 1 is sparse throughout; row 2 stays dense
    lengths, T = (150, 203, 37), 203
    torch.manual_seed(1)
    ids = torch.randint(0, 512, (3, T + steps), device="cuda")
    valid = torch.zeros(3, T, dtype=torch.bool, device="cuda")
    for r, n in enumerate(lengths):
        valid[r, T - n:] = True
    logits, cache = model.prefill(ids[:, :T], valid, capacity=T + steps, chunk_size=64)
    stepped = [model.decode_step(ids[:, t], cache, cuda_graph=graphs, compile=compile)
               for t in range(T, T + steps - 1)]
    return torch.cat([logits, torch.stack(stepped, 1)], 1), cache


def test_compiled_graph_decode_equals_eager_decode_in_one_graph(counter):
    model = sala_like()
    eager, _ = run(model, graphs=False, compile=False)
    compiled, cache = run(model, graphs=True, compile=True)
    assert cache.runner.graphs and [entry[0] for entry in cache.runner.plan] == ["graph"]  # captured, no fallback
    assert (compiled - eager).abs().max() <= 1e-4 * eager.abs().max()
    assert counter.frame_count > 0


def test_a_model_twice_as_deep_compiles_nothing_more(counter):
    """Blocks of one kind share their compiled graphs. (Without scale_depth: the residual scale, a float that
    Dynamo specialises on, would differ with the depth.)"""
    run(sala_like(scale_depth=None), graphs=True, compile=True, steps=8)
    compiles = counter.frame_count
    _, cache = run(sala_like("SLLSLSSLLSLS", scale_depth=None), graphs=True, compile=True, steps=8)
    assert cache.runner.plan is not None and counter.frame_count == compiles


def test_bf16_compiled_graph_decode_is_close_to_the_uncompiled_graphs(counter):
    model = sala_like(dtype=torch.bfloat16)
    graphed, _ = run(model, graphs=True, compile=False, steps=16)
    compiled, cache = run(model, graphs=True, compile=True, steps=16)
    assert cache.runner.plan is not None
    rel = (compiled.float() - graphed.float()).norm() / graphed.float().norm()
    assert rel < 2e-2, rel
