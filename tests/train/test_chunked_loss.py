"""The lm objective's chunked cross-entropy (issue 16): past CHUNKED_LOSS_LOGITS logits the loss is taken one
chunk of tokens at a time, with the loss and gradients of the full-logits path and none of its [B, T, V]
tensors kept for the backward pass."""

import pytest
import torch

import hyloom
from hyloom.blueprint import blueprint_model
from hyloom.plugins.train import lm

MODEL = {"model": {
    "d_model": 32, "n_layers": 2, "vocab_size": 300, "dim_model_base": 16,
    "mixers": {"A": {"type": "attention", "heads": 4, "kv_heads": 2}},
    "layout": "AA", "ffn": {"type": "swiglu", "hidden": 64}}}


def tiny(tie=True):
    torch.manual_seed(0)
    return hyloom.build_model(blueprint_model().model_validate(
        {"model": {**MODEL["model"], "tie_embeddings": tie}}))


def loss_and_grads(model, batch):
    loss = lm.lm_loss(model, batch)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_loss_and_gradients_match_the_full_logits(tie, monkeypatch):
    model = tiny(tie)
    batch = torch.randint(0, 300, (3, 41), generator=torch.Generator().manual_seed(1))
    want, want_grads = loss_and_grads(model, batch)
    # just under the 120 tokens' logits: chunks of 29 tokens, the last one shorter (4)
    monkeypatch.setattr(lm, "CHUNKED_LOSS_LOGITS", 120 * 300 - 1)
    monkeypatch.setattr(lm, "LOSS_CHUNK_LOGITS", 29 * 300)
    got, grads = loss_and_grads(model, batch)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_chunked_loss_keeps_no_full_logits(monkeypatch):
    model = tiny()
    batch = torch.randint(0, 300, (2, 257), generator=torch.Generator().manual_seed(2))
    biggest = []

    def pack(t):
        biggest.append(t.numel())
        return t

    monkeypatch.setattr(lm, "CHUNKED_LOSS_LOGITS", 0)
    monkeypatch.setattr(lm, "LOSS_CHUNK_LOGITS", 64 * 300)  # chunks of 64 tokens
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lm.lm_loss(model, batch)
    assert max(biggest) < 2 * 256 * 300 // 4  # never the [512, 300] logits, a chunk's at most
    loss.backward()  # the chunks' logits made again, one at a time
    assert all(p.grad is not None for p in model.parameters())
