"""The decode step through torch.compile (HybridLM.decode_step(compile=True), hyloom.decode) against the same step
uncompiled: a small MiniCPM-SALA-shaped model (InfLLM-V2 + Lightning, HyPE) whose rows cross InfLLM-V2's kernel,
block and dense_len boundaries while decoding, and a dense model; blocks of one kind share one compiled graph.
On the CPU the backend is "aot_eager" (Dynamo's tracing and graph breaks, without inductor's code generation,
whose C++ compile would take minutes on this machine); tests/gpu/test_cuda_decode_compile.py runs inductor."""


import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from bench_scripts import load_bench

import hyloom
import hyloom.decode
from hyloom.blueprint import blueprint_model
from hyloom.checkpoint import save_checkpoint
from hyloom.cli import main
from hyloom.plugins.data import bpe

SALA_LIKE = {"d_model": 32, "vocab_size": 61, "position": {"type": "hype"},
             "mixers": {"S": {"type": "infllm_v2", "heads": 8, "kv_heads": 2, "head_dim": 8, "qk_norm": True,
                              "gate": True, "block_size": 4, "kernel_size": 4, "kernel_stride": 2, "topk": 2,
                              "window": 4, "dense_len": 24, "lse_kernel_size": 8, "lse_kernel_stride": 4},
                        "L": {"type": "lightning", "heads": 2, "head_dim": 16, "gate": True, "output_norm": True}},
             "ffn": {"type": "swiglu", "hidden": 64}, "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 16}
DENSE = {"d_model": 32, "vocab_size": 61, "position": {"type": "rope"},
         "mixers": {"A": {"type": "attention", "heads": 4, "kv_heads": 2}}, "ffn": {"type": "swiglu", "hidden": 64}}


def model_of(spec: dict, layout: str):
    torch.manual_seed(0)
    full = {**spec, "n_layers": len(layout), "layout": layout}
    return hyloom.build_model(blueprint_model().model_validate({"model": full})).eval()


@pytest.fixture
def backend(monkeypatch):
    """Counts the graphs Dynamo hands to aot_eager; a fresh Dynamo cache, so that earlier tests compile nothing
    for this one."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(hyloom.decode, "COMPILE_BACKEND", counter)
    yield counter
    torch._dynamo.reset()


def decode(model, ids, valid, prompt: int, compile: bool):
    logits, cache = model.prefill(ids[:, :prompt], valid, capacity=ids.shape[1], chunk_size=16)
    steps = [model.decode_step(ids[:, t], cache, compile=compile) for t in range(prompt, ids.shape[1])]
    return torch.cat([logits[:, 0], *steps]), cache


def left_padded(lengths, T: int, total: int):
    ids = torch.randint(0, 61, (len(lengths), total))
    valid = torch.zeros(len(lengths), T, dtype=torch.bool)
    for row, n in enumerate(lengths):
        valid[row, T - n:] = True
    return ids, valid


def test_compiled_sala_shaped_decode_equals_the_uncompiled_one_and_compiles_once_per_block_kind(backend):
    model = model_of(SALA_LIKE, "SLLSLL")
    # row 0 prefills dense and turns sparse at 24 keys, row 1 is sparse throughout, row 2 stays dense; 15 steps
    # cross kernel (stride 2) and block (4) boundaries in every row, at different steps
    ids, valid = left_padded((20, 30, 5), T=30, total=45)
    plain, _ = decode(model, ids, valid, 30, compile=False)
    assert backend.frame_count == 0
    compiled, cache = decode(model, ids, valid, 30, compile=True)
    torch.testing.assert_close(compiled, plain, rtol=0, atol=1e-6)
    assert cache.runner.compile and cache.runner.graphs is False  # CPU: compiled pieces, no CUDA graphs
    # the embedding, one InfLLM-V2 block, one Lightning block, the head: four layers of each kind share them
    assert backend.frame_count == 4


def test_a_model_twice_as_deep_compiles_nothing_more(backend):
    """(Without scale_depth: the residual scale, a float Dynamo specialises on, would change with the depth.)"""
    ids, valid = left_padded((20, 30), T=30, total=34)
    decode(model_of({**SALA_LIKE, "scale_depth": None}, "SLLS"), ids, valid, 30, compile=True)
    assert backend.frame_count == 4
    decode(model_of({**SALA_LIKE, "scale_depth": None}, "SLLSSLLS"), ids, valid, 30, compile=True)
    assert backend.frame_count == 4


def test_compiled_dense_decode_equals_the_uncompiled_one(backend):
    model = model_of(DENSE, "AAA")
    ids, valid = left_padded((12, 7), T=12, total=30)
    plain, _ = decode(model, ids, valid, 12, compile=False)
    compiled, _ = decode(model, ids, valid, 12, compile=True)
    torch.testing.assert_close(compiled, plain, rtol=0, atol=1e-6)
    assert backend.frame_count == 3  # embedding, attention block, head


def test_a_grown_cache_compiles_again_and_still_matches(backend):
    """Without a capacity the cache doubles, the runner is rebuilt over the new buffers and Dynamo compiles the
    new shapes (dynamic=False): bounded by the kinds times the capacities, never per layer."""
    model = model_of(SALA_LIKE, "SLLS")
    ids = torch.randint(0, 61, (1, 40))

    def run(compile):
        _, cache = model.prefill(ids[:, :14])  # capacity 16: grows to 32, then 64
        return torch.stack([model.decode_step(ids[:, t], cache, compile=compile) for t in range(14, 40)]), cache

    plain, _ = run(False)
    compiled, cache = run(True)
    torch.testing.assert_close(compiled, plain, rtol=0, atol=1e-6)
    # each capacity (16, 32, 64) recompiles the embedding and both block kinds (the mask and the KV buffers they
    # get change shape); the head sees no capacity-shaped tensor: compiled once
    assert cache.capacity == 64 and backend.frame_count == 3 * 3 + 1


def test_switching_compile_rebuilds_the_runner(backend):
    model = model_of(DENSE, "A")
    ids = torch.randint(0, 61, (1, 10))
    _, cache = model.prefill(ids[:, :5], capacity=10)
    model.decode_step(ids[:, 5], cache)
    first = cache.runner
    model.decode_step(ids[:, 6], cache, compile=True)
    assert first.compile is False and cache.runner is not first and cache.runner.compile is True


def test_the_benchmark_checks_and_times_the_compiled_decode(backend):
    """bench/e2e.py --compile-decode: its check compares the compiled step with eager decode, its rows say so."""
    e2e = load_bench("e2e")
    model = e2e.build("minicpm-sala", quick=True)
    checked = e2e.check(model, 40, compile=True)
    assert checked["compiled_vs_eager_rel_err"] < 1e-6
    row = e2e.measure(model, "minicpm-sala", 64, 1, 3, 32, compile=True)
    assert row["compiled_decode"] and row["decode_ms_per_token"] > 0 and "error" not in row
    assert backend.frame_count > 0


def test_generate_with_compile_prints_what_it_prints_without(backend, tmp_path, capsys):
    """`hyloom generate --compile` (greedy): the same text as the uncompiled decode."""
    text = "def add(a, b):\n    return a + b\n" * 4
    tokenizer = bpe.BPETrainer(bpe.BPEConfig(vocab_size=280, min_frequency=1)).train([text], cache_dir=tmp_path)
    model = model_of({**SALA_LIKE, "vocab_size": 280}, "SLS")
    spec = {**SALA_LIKE, "vocab_size": 280, "n_layers": 3, "layout": "SLS", "max_seq_len": 128}
    tokens = tokenizer.save(tmp_path / "tok" / "tokenizer.json")
    folder = save_checkpoint(tmp_path / "ckpt", model, blueprint_model().model_validate({"model": spec}).model_dump(
        mode="json"), extra_files={"tokenizer.json": tokens.read_text()})
    argv = ["generate", str(folder), "--prompt", "def add", "--temperature", "0", "--max-new-tokens", "30",
            "--device", "cpu"]
    texts = []
    for extra in ([], ["--compile"]):
        assert main(argv + extra) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and backend.frame_count > 0


@pytest.mark.slow
def test_inductor_on_the_cpu_matches_the_uncompiled_decode():
    """The real backend, C++ code generation included (about 40 s on two cores): within fp32 rounding."""
    torch._dynamo.reset()
    model = model_of(SALA_LIKE, "SLLSLL")
    ids, valid = left_padded((20, 30, 5), T=30, total=45)
    plain, _ = decode(model, ids, valid, 30, compile=False)
    compiled, _ = decode(model, ids, valid, 30, compile=True)
    torch.testing.assert_close(compiled, plain, rtol=0, atol=1e-6)
    torch._dynamo.reset()
