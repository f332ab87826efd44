"""The `infllm_v2` mixer through the model: sparse decoding, padding, chunked prefill, the dense switch."""

import torch

import hyloom
from hyloom.blueprint import blueprint_model

SPARSE = {"type": "infllm_v2", "heads": 4, "kv_heads": 2, "head_dim": 16, "qk_norm": True, "gate": True,
          "block_size": 4, "kernel_size": 8, "kernel_stride": 2, "topk": 2, "window": 4, "dense_len": 16}


def model_with(mixer, layout="SLS"):
    spec = {"model": {"d_model": 32, "n_layers": len(layout), "vocab_size": 53, "position": {"type": "hype"},
                      "mixers": {"S": mixer, "L": {"type": "lightning", "heads": 2}}, "layout": layout,
                      "ffn": {"type": "swiglu", "hidden": 64}}}
    torch.manual_seed(0)
    return hyloom.build_model(blueprint_model().model_validate(spec)).eval()


def test_selection_is_really_sparse_here():
    dense = model_with({**SPARSE, "dense_len": 10_000})
    sparse = model_with(SPARSE)
    sparse.load_state_dict(dense.state_dict())
    ids = torch.randint(0, 53, (1, 48))
    # k_total = topk 2 + window 4/4 = 3 blocks: the first 12 tokens see every block either way, later ones do not
    torch.testing.assert_close(sparse(ids)[:, :12], dense(ids)[:, :12], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(dense(ids)[:, -1], sparse(ids)[:, -1], atol=1e-3)


def test_prefill_then_decode_equals_a_full_pass_past_dense_len():
    model = model_with(SPARSE)
    ids = torch.randint(0, 53, (2, 44))
    full = model(ids)
    logits, cache = model.prefill(ids[:, :20], logits_at="all")
    steps = [model.decode_step(ids[:, t], cache) for t in range(20, 44)]
    torch.testing.assert_close(torch.cat([logits, torch.stack(steps, 1)], 1), full, rtol=1e-4, atol=1e-5)


def test_coarse_normaliser_option_reaches_the_layer_and_decodes_like_a_full_pass():
    coarse = {**SPARSE, "lse_kernel_size": 16, "lse_kernel_stride": 4}
    model = model_with(coarse)
    assert model.layers[0].mixer.sparse.approx_lse
    ids = torch.randint(0, 53, (2, 44))
    full = model(ids)
    logits, cache = model.prefill(ids[:, :20], logits_at="all")
    steps = [model.decode_step(ids[:, t], cache) for t in range(20, 44)]
    torch.testing.assert_close(torch.cat([logits, torch.stack(steps, 1)], 1), full, rtol=1e-4, atol=1e-5)


def test_chunked_prefill_equals_one_prefill():
    model = model_with(SPARSE)
    ids = torch.randint(0, 53, (1, 40))
    whole, _ = model.prefill(ids, logits_at="all")
    first, cache = model.prefill(ids[:, :24], logits_at="all")
    second, _ = model.prefill(ids[:, 24:], cache=cache, logits_at="all")
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-4, atol=1e-5)


def test_padded_batch_generates_what_each_prompt_generates_alone():
    model = model_with(SPARSE)
    prompts = [torch.randint(0, 53, (n,)).tolist() for n in (30, 18, 9)]
    batched = model.generate(prompts, max_new_tokens=8)
    assert batched == [model.generate([p], max_new_tokens=8)[0] for p in prompts]


def test_hybrid_with_sparse_layers_trains():
    model = model_with(SPARSE).train()
    data = torch.arange(53).repeat(2)[None, :41].repeat(2, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(model(data[:, :-1]).reshape(-1, 53), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
