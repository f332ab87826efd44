"""The model: decoding matches one full pass for every mixer, generation, padding, packing, scalars."""

import pytest
import torch

import hyloom
from hyloom.blueprint import blueprint_model
from hyloom.generate import sample
from hyloom.registry import registry
from hyloom.testing import check_decode, check_mixer, tiny_model


def tiny_spec(mixer: dict, position=None, n_layers=2, **model):
    data = {"model": {"d_model": 32, "n_layers": n_layers, "vocab_size": 61, "mixers": {"M": mixer},
                      "layout": "M" * n_layers, "ffn": {"type": "swiglu", "hidden": 48},
                      "position": position or {"type": "rope"}, **model}}
    return blueprint_model().model_validate(data)


def test_every_mixer_keeps_the_mixer_contract(tmp_path):
    """Each registered mixer's `example`, through every check of hyloom.testing (what a plugin's tests run),
    causal and, where declared, bidirectional."""
    for reg in registry().all("mixer"):
        assert reg.example is not None, f"mixer {reg.name} registers no example config"
        check_mixer(tiny_model(reg.example), tmp_path / reg.name)
        if reg.capabilities.bidirectional:
            check_mixer(tiny_model(reg.example, causal=False), tmp_path / f"{reg.name}-bidirectional")


@pytest.mark.parametrize("position", [{"type": "hype", "a": 50.0}, {"type": "nope"}])
def test_prefill_and_decode_match_one_full_pass_under_every_position(position):
    for reg in registry().all("mixer"):
        if reg.capabilities.decode:
            check_decode(tiny_model(reg.example, position=position))


def test_sliding_window_attention_decodes_like_a_full_pass():
    check_decode(tiny_model({"type": "attention", "heads": 2, "window": 3}))


def test_prefill_in_chunks_equals_one_prefill():
    model = hyloom.build_model(tiny_spec(registry().get("mixer", "attention").example)).eval()
    ids = torch.randint(0, 61, (3, 12))
    whole, _ = model.prefill(ids, logits_at="all")
    first, cache = model.prefill(ids[:, :5], logits_at="all")
    second, _ = model.prefill(ids[:, 5:], cache=cache, logits_at="all")
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-5, atol=1e-5)


def test_padded_batch_generates_what_each_prompt_generates_alone():
    torch.manual_seed(0)
    model = hyloom.build_model(tiny_spec(registry().get("mixer", "attention").example, n_layers=3)).eval()
    prompts = [[5, 9, 13, 2, 7, 1], [3], [8, 8, 4]]
    batched = model.generate(prompts, max_new_tokens=6)
    alone = [model.generate([p], max_new_tokens=6)[0] for p in prompts]
    assert batched == alone
    assert all(len(out) == 6 for out in batched)


def test_generation_stops_before_a_stop_token():
    model = hyloom.build_model(tiny_spec(registry().get("mixer", "attention").example)).eval()
    free = model.generate([[1, 2, 3]], max_new_tokens=8)[0]
    stopped = model.generate([[1, 2, 3]], max_new_tokens=8, stop_tokens=[free[3]])[0]
    assert stopped == free[: free.index(free[3])]


def test_sampling_filters():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    greedy = logits.argmax(-1)
    assert torch.equal(sample(logits), greedy)
    assert torch.equal(sample(logits, temperature=1.0, top_k=1), greedy)
    assert torch.equal(sample(logits, temperature=1.0, top_p=1e-6), greedy)
    top5 = logits.topk(5, dim=-1).indices
    draws = torch.stack([sample(logits, temperature=2.0, top_k=5) for _ in range(50)], 1)
    assert all(set(draws[r].tolist()) <= set(top5[r].tolist()) for r in range(4))
    probs = logits.softmax(-1)
    nucleus = probs.sort(-1, descending=True).values.cumsum(-1)
    keep = (nucleus < 0.5).sum(-1) + 1  # tokens needed to reach p = 0.5
    draws = torch.stack([sample(logits, temperature=1.0, top_p=0.5) for _ in range(50)], 1)
    for r in range(4):
        allowed = set(probs[r].topk(int(keep[r])).indices.tolist())
        assert set(draws[r].tolist()) <= allowed


def test_mup_scalars():
    torch.manual_seed(0)
    attention = registry().get("mixer", "attention").example
    plain = hyloom.build_model(tiny_spec(attention, n_layers=4))
    scaled = hyloom.build_model(tiny_spec(attention, n_layers=4, scale_emb=3.0, scale_depth=2.0, dim_model_base=8))
    scaled.load_state_dict(plain.state_dict())
    assert scaled.residual_scale == 1.0 and scaled.logit_scale == 0.25  # 2/√4 and 8/32
    ids = torch.randint(0, 61, (1, 6))
    # scale_emb changes only the input: feed plain model 3× embeddings to compare
    with torch.no_grad():
        plain.embed_tokens.weight.mul_(3.0)
        expected = plain(ids) * 0.25
        plain.embed_tokens.weight.div_(3.0)
    # tied embeddings off: the head is separate, so only the input embedding was scaled
    torch.testing.assert_close(scaled(ids), expected, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_share_the_matrix():
    model = hyloom.build_model(tiny_spec(registry().get("mixer", "attention").example, tie_embeddings=True))
    assert model.lm_head is None
    ids = torch.randint(0, 61, (1, 4))
    assert model(ids).shape == (1, 4, 61)


def test_meta_device_builds_a_9b_blueprint_without_memory():
    bp = hyloom.load_blueprint("builtin:llama3-8b")
    model = hyloom.build_model(bp, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert model.cache_bytes(2) == (32 * 2 * 8 * 128 * 2, 0)


@pytest.mark.parametrize("cu_seqlens, message", [
    ([0, 3, 5], r"rise from 0 to the row length 6; got \[0, 3, 5\]"),
    ([1, 6], "rise from 0"),
    ([0, 4, 2, 6], "rise from 0"),
    ([[0, 6]], r"integer offsets \[N \+ 1\]"),
    ([0.0, 6.0], r"integer offsets .* torch\.float32"),
])
def test_bad_cu_seqlens_are_refused(cu_seqlens, message):
    model = hyloom.build_model(tiny_spec(registry().get("mixer", "attention").example))
    with pytest.raises(ValueError, match=message):
        model(torch.randint(0, 61, (1, 6)), cu_seqlens=torch.tensor(cu_seqlens))
    with pytest.raises(ValueError, match="batch of one row"):
        model(torch.randint(0, 61, (2, 3)), cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="decode cache"):
        model(torch.randint(0, 61, (1, 3)), cu_seqlens=torch.tensor([0, 3]), cache=model.new_cache(1))
