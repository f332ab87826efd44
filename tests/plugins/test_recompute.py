"""hyloom.recompute.keep_products in the Lightning layer: the same outputs and gradients as a plain call, and fewer bytes
kept for the backward pass (issue 16: the hybrid trained at 64K with more memory than the dense model)."""

import torch

from hyloom.kernels import lightning
from hyloom.mixer import MixerContext
from hyloom.plugins.lightning import LightningConfig
from hyloom.plugins.lightning.mixer import Lightning
from hyloom.plugins.position.rotary import Rotary
from hyloom.plugins.lightning import mixer as lightning_module
from hyloom.recompute import kept_bytes


def plain(fn, *args):
    return fn(*args)


def run(mod, x, ctx):
    """(output, gradients of the input and of every parameter) of one forward and backward."""
    x = x.detach().requires_grad_()
    out = mod(x, ctx)
    out.square().sum().backward()
    grads = [x.grad] + [p.grad for p in mod.parameters()]
    mod.zero_grad(set_to_none=True)
    return out.detach(), grads


def ctx_for(T, position=None):
    return MixerContext(pos_BT=torch.arange(T)[None].expand(2, T), position=position or Rotary(10000.0))


def lightning_layer():
    torch.manual_seed(0)
    return Lightning(LightningConfig(heads=2, head_dim=16), layer=1, n_layers=4, d_model=32)


def test_same_outputs_and_gradients_as_a_plain_call(monkeypatch):
    mod, x, ctx = lightning_layer(), torch.randn(2, 24, 32), ctx_for(24)
    out, grads = run(mod, x, ctx)
    monkeypatch.setattr(lightning_module, "keep_products", plain)
    want_out, want_grads = run(mod, x, ctx)
    assert torch.equal(out, want_out)
    for got, want in zip(grads, want_grads):
        assert torch.equal(got, want)


def test_lightning_keeps_less_and_no_more_than_its_inputs_and_products(monkeypatch):
    """On the Triton path (custom ops, what a GPU runs): the layer keeps its input, the q/k/v/gate projections,
    the attention's output and o_proj's: 7 tensors of H·D per token (and the segment states), where a plain
    call also kept the QK-norm, rotary, output-norm and gate intermediates."""
    monkeypatch.setattr(lightning, "TRITON_ON_CPU", True)
    mod, T = lightning_layer(), 128
    x = torch.randn(1, T, 32, requires_grad=True)
    ctx = MixerContext(pos_BT=torch.arange(T)[None], position=Rotary(10000.0))
    kept = kept_bytes(lambda: mod(x, ctx))
    monkeypatch.setattr(lightning_module, "keep_products", plain)
    before = kept_bytes(lambda: mod(x, ctx))
    width = mod.heads * mod.head_dim * 4  # fp32 bytes per token of one [T, H·D] tensor
    states = mod.heads * mod.head_dim ** 2 * 4  # one segment's start state at this length
    assert kept <= 7 * width * T + states + 64 * T  # + the decay and small per-token norms
    assert kept < 0.7 * before
