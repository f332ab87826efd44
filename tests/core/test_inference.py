"""The inference engine (hyloom.model prefill/decode_step, hyloom.decode, hyloom.inference): chunked prefill
equals one pass, decode equals a full forward for every mixer family and a hybrid, left-padded batches equal
each row alone, caches allocated once, memory refused up front."""

import pytest
import torch

import hyloom
from hyloom.blueprint import blueprint_model
from hyloom.inference import DoesNotFit, check_fits, estimate

SPARSE = {"type": "infllm_v2", "heads": 4, "kv_heads": 2, "head_dim": 16, "qk_norm": True, "gate": True,
          "block_size": 4, "kernel_size": 8, "kernel_stride": 2, "topk": 2, "window": 4, "dense_len": 16}
MIXERS = {"S": SPARSE, "L": {"type": "lightning", "heads": 2}, "A": {"type": "attention", "heads": 4, "kv_heads": 2},
          "W": {"type": "attention", "heads": 2, "window": 5}}


def model_of(layout: str, position="hype", seed=0):
    used = {k: v for k, v in MIXERS.items() if k in layout}
    spec = {"model": {"d_model": 32, "n_layers": len(layout), "vocab_size": 53, "position": {"type": position},
                      "mixers": used, "layout": layout, "ffn": {"type": "swiglu", "hidden": 64}}}
    torch.manual_seed(seed)
    return hyloom.build_model(blueprint_model().model_validate(spec)).eval()


FAMILIES = ["S", "L", "A", "W", "SLAW"]  # each mixer kind alone, and a hybrid of all of them


@pytest.mark.parametrize("layout", FAMILIES)
def test_chunked_prefill_equals_one_pass(layout):
    model = model_of(layout)
    ids = torch.randint(0, 53, (2, 40))
    whole = model(ids)
    for chunk in (1, 7, 16, 40):
        logits, cache = model.prefill(ids, chunk_size=chunk, logits_at="all")
        torch.testing.assert_close(logits, whole, rtol=1e-4, atol=1e-5, msg=f"chunk {chunk}")
        last, _ = model.prefill(ids, chunk_size=chunk)
        torch.testing.assert_close(last, whole[:, -1:], rtol=1e-4, atol=1e-5)
        assert cache.length == 40 and cache.next_pos_B.tolist() == [40, 40]


@pytest.mark.parametrize("layout", FAMILIES)
def test_decode_equals_a_full_forward_past_dense_len_and_the_capacity(layout):
    model = model_of(layout)
    ids = torch.randint(0, 53, (2, 60))
    full = model(ids)
    logits, cache = model.prefill(ids[:, :20], chunk_size=16)  # no capacity given: the buffers grow by doubling
    steps = [model.decode_step(ids[:, t], cache) for t in range(20, 60)]
    torch.testing.assert_close(torch.cat([logits, torch.stack(steps[:-1], 1)], 1), full[:, 19:59],
                               rtol=1e-4, atol=1e-5)
    assert cache.capacity >= 60 and cache.runner.graphs is False  # CPU: the pieces run eagerly


def test_a_cache_sized_up_front_is_never_reallocated():
    model = model_of("SLAW")
    ids = torch.randint(0, 53, (3, 30))
    cache = model.new_cache(3, capacity=30)
    buffers = [(c.k.data_ptr(), c.v.data_ptr()) for c in cache.layers if hasattr(c, "k")]
    mask = cache.valid_buf_BS.data_ptr()
    logits, _ = model.prefill(ids[:, :12], cache=cache, chunk_size=5)
    runner = None
    for t in range(12, 30):
        model.decode_step(ids[:, t], cache)
        runner = runner or cache.runner
        assert cache.runner is runner  # bound to the same buffers from step to step
    assert [(c.k.data_ptr(), c.v.data_ptr()) for c in cache.layers if hasattr(c, "k")] == buffers
    assert cache.valid_buf_BS.data_ptr() == mask and cache.length == 30


@pytest.mark.parametrize("layout", ["SLAW", "A", "S"])
def test_left_padded_batch_equals_each_row_alone(layout):
    """Different prompt lengths in one batch (random tokens under the padding), chunks shorter than the padding:
    the same logits, prefill and decode, as each row alone. (A prompt shorter than InfLLM-V2's dense_len is
    prefilled dense and decodes across the switch, so its reference is its own prefill + decode.)"""
    model = model_of(layout)
    lengths, steps, T = (40, 5, 30), 8, 40
    rows = [torch.randint(0, 53, (n + steps,)) for n in lengths]
    ids = torch.randint(0, 53, (3, T + steps))
    valid = torch.zeros(3, T, dtype=torch.bool)
    for r, (row, n) in enumerate(zip(rows, lengths)):
        ids[r, T - n:] = row
        valid[r, T - n:] = True
    logits, cache = model.prefill(ids[:, :T], valid, chunk_size=7, capacity=T + steps)
    stepped = torch.stack([model.decode_step(ids[:, t], cache) for t in range(T, T + steps - 1)], 1)
    got = torch.cat([logits, stepped], 1)
    for r, (row, n) in enumerate(zip(rows, lengths)):
        first, cache = model.prefill(row[None, :n], chunk_size=7)
        alone = torch.cat([first, torch.stack([model.decode_step(row[None, t], cache)
                                               for t in range(n, n + steps - 1)], 1)], 1)
        torch.testing.assert_close(got[r], alone[0], rtol=1e-4, atol=1e-5, msg=f"row {r}")
        if n >= 16:  # past InfLLM-V2's dense_len already in the prompt: also one full pass
            torch.testing.assert_close(got[r], model(row[None])[0, n - 1:n - 1 + steps], rtol=1e-4, atol=1e-5)


def test_generate_batched_with_chunks_equals_each_prompt_alone():
    model = model_of("SLAW")
    prompts = [torch.randint(0, 53, (n,)).tolist() for n in (30, 18, 9)]
    batched = model.generate(prompts, max_new_tokens=8, chunk_size=7)
    assert batched == [model.generate([p], max_new_tokens=8)[0] for p in prompts]
    streamed, timings = [], {}
    model.generate([prompts[0]], max_new_tokens=8, on_token=lambda row, tok: streamed.append((row, tok)),
                   timings=timings)
    assert streamed == [(0, t) for t in batched[0]]
    assert timings["decode_steps"] == 7 and timings["prefill_s"] > 0 and timings["decode_s"] > 0


def test_prefill_refuses_bad_arguments():
    model = model_of("A")
    ids = torch.randint(0, 53, (1, 8))
    for chunk in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
            model.prefill(ids, chunk_size=chunk)
    with pytest.raises(ValueError, match="logits_at must be 'last' or 'all'"):
        model.prefill(ids, logits_at="first")
    with pytest.raises(ValueError, match="cuda_graph=True needs"):
        model.decode_step(ids[:, 0], model.prefill(ids)[1], cuda_graph=True)


def test_memory_estimate_counts_the_cache_and_refuses_up_front(monkeypatch):
    model = model_of("SLAW")
    per_token, fixed = model.cache_bytes(4)
    small, large = estimate(model, batch=2, tokens=1000), estimate(model, batch=2, tokens=100_000, chunk_size=64)
    assert large.cache == 2 * (per_token * 100_000 + fixed) + 2 * 100_000
    assert large.weights == small.weights == 4 * model.num_parameters()
    monkeypatch.setattr(hyloom.inference, "free_bytes", lambda device: 10_000_000)
    check_fits(model, batch=1, tokens=100)
    with pytest.raises(DoesNotFit, match=r"a context of 100,000 tokens × 2 row\(s\) needs ~[\d.]+ GiB \(weights"):
        check_fits(model, batch=2, tokens=100_000, chunk_size=64)


def test_decode_and_chunks_through_the_triton_kernels(monkeypatch):
    """The same contracts with the mixers on their Triton kernels (the CPU interpreter here; compiled on a
    GPU machine, where tests/gpu covers them): chunked prefill and decode equal one full pass."""
    import os

    from hyloom.kernels import lightning
    from hyloom.kernels.infllm_v2 import ops

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter is off (a CUDA machine: tests/gpu runs the kernels)")
    monkeypatch.setattr(ops, "TRITON_ON_CPU", True)
    monkeypatch.setattr(lightning, "TRITON_ON_CPU", True, raising=False)
    model = model_of("SLA")
    ids = torch.randint(0, 53, (1, 24))
    full = model(ids)
    logits, cache = model.prefill(ids[:, :20], chunk_size=3, logits_at="all")
    steps = [model.decode_step(ids[:, t], cache) for t in range(20, 24)]
    torch.testing.assert_close(torch.cat([logits, torch.stack(steps[:-1], 1)], 1), full[:, :23], rtol=1e-4, atol=1e-5)


def test_a_static_write_stores_in_the_buffers_dtype():
    """Under autocast a decode step's keys are bf16 while the cache keeps the model's fp32 (as `append` does)."""
    from hyloom.plugins.transformer.kv_cache import KVCache

    cache = KVCache(2, 1, 4, "cpu", torch.float32)
    cache.reserve(3)
    k, v = torch.randn(2, 1, 1, 4).bfloat16(), torch.randn(2, 1, 1, 4).bfloat16()
    cache.write_at(torch.tensor([1]), k, v)
    assert cache.k.dtype == torch.float32
    assert torch.equal(cache.k[:, :, 1:2], k.float()) and torch.equal(cache.v[:, :, 1:2], v.float())


@pytest.mark.parametrize("layout", ["A", "LA"])
def test_under_autocast_the_kv_cache_takes_the_autocast_dtype_and_decodes_the_same(layout):
    """A cache made under autocast (GRPO rollouts: fp32 weights, bf16 compute) keeps its keys and values in bf16,
    half the bytes, and decodes what a cache made outside it (fp32 buffers) decodes, up to bf16 rounding; the
    Lightning state stays fp32."""
    model = model_of(layout)
    ids = torch.randint(0, 53, (2, 30))
    decoded = []
    for cache in (model.new_cache(2), None):  # fp32 buffers, made outside autocast; then made inside it
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, cache = model.prefill(ids[:, :20], cache=cache)
            decoded.append(torch.stack([logits[:, -1]] + [model.decode_step(ids[:, t], cache)
                                                           for t in range(20, 29)]).float())
    kinds = {type(layer).__name__: layer for layer in cache.layers}
    assert kinds["KVCache"].k.dtype == kinds["KVCache"].v.dtype == torch.bfloat16
    if "L" in layout:
        state = [t for t in vars(kinds["RecurrentState"]).values() if isinstance(t, torch.Tensor)]
        assert state and all(t.dtype == torch.float32 for t in state)
    torch.testing.assert_close(decoded[1], decoded[0], rtol=1e-2, atol=1e-2)
    assert model.new_cache(2).layers[-1].k.dtype == torch.float32  # outside autocast: the model's dtype


def test_the_estimate_counts_the_infllm_v2_reference_on_the_cpu():
    """On the CPU InfLLM-V2 runs its PyTorch reference, which holds every query-key pair of a chunk: a 16K
    prefill of builtin:tiny measured 13.5 GiB, which the estimate must cover (or a long --context is killed
    instead of refused)."""
    from hyloom.blueprint import load_blueprint

    model = hyloom.build_model(load_blueprint("builtin:tiny"))
    sparse = [block.mixer for block in model.layers if block.mixer.__class__.__name__ == "InfLLMv2"]
    assert sparse
    need = estimate(model, batch=1, tokens=16384, chunk_size=16384)
    assert need.activations >= sparse[0].heads * 16384 * 16384 * 13
    assert estimate(model, batch=1, tokens=32768, chunk_size=16384).total > 1.9 * need.total
