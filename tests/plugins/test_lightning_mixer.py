"""The `lightning` mixer: SPEC §1 layer math, bidirectional mode, and a hybrid that trains and generates."""

import math

import torch

import hyloom
from hyloom.blueprint import blueprint_model
from hyloom.kernels.lightning import decay_alibi
from hyloom.mixer import MixerContext, NoPosition
from hyloom.plugins.lightning import LightningConfig
from hyloom.plugins.lightning.mixer import Lightning
from hyloom.plugins.position.rotary import Rotary


def reference_layer(mod: Lightning, x, pos, rope):
    """SPEC §1 step by step with an explicit per-token recurrence."""
    B, T, _ = x.shape
    H, D = mod.heads, mod.head_dim
    q = mod.q_norm(mod.q_proj(x).view(B, T, H, D))
    k = mod.k_norm(mod.k_proj(x).view(B, T, H, D))
    v = mod.v_proj(x).view(B, T, H, D)
    q, k = rope.apply(q, k, pos)
    lam = torch.exp(decay_alibi(H)).double()[None, :, None, None]
    S = torch.zeros(B, H, D, D, dtype=torch.float64)
    outs = []
    for t in range(T):
        S = lam * S + k[:, t, :, :, None].double() * v[:, t, :, None, :].double()
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, t].double(), S) / math.sqrt(D))
    o = torch.stack(outs, 1).float().reshape(B, T, H * D)
    return mod.o_proj(mod.o_norm(o) * torch.sigmoid(mod.z_proj(x)))


def test_layer_matches_spec():
    torch.manual_seed(0)
    mod = Lightning(LightningConfig(heads=3, head_dim=8), layer=0, n_layers=4, d_model=20)
    x = torch.randn(2, 9, 20)
    pos = torch.arange(9)[None].expand(2, 9)
    ctx = MixerContext(pos_BT=pos, position=Rotary(10000.0))
    torch.testing.assert_close(mod(x, ctx), reference_layer(mod, x, pos, Rotary(10000.0)), rtol=1e-4, atol=1e-5)


def test_bidirectional_sees_the_future():
    torch.manual_seed(0)
    mod = Lightning(LightningConfig(heads=2, head_dim=8), layer=0, n_layers=2, d_model=16)
    x = torch.randn(1, 6, 16)
    pos = torch.arange(6)[None]
    causal = MixerContext(pos_BT=pos, position=NoPosition(), causal=True)
    both = MixerContext(pos_BT=pos, position=NoPosition(), causal=False)
    changed = x.clone()
    changed[:, -1] += 1.0
    assert torch.allclose(mod(x, causal)[:, 0], mod(changed, causal)[:, 0])
    assert not torch.allclose(mod(x, both)[:, 0], mod(changed, both)[:, 0])


HYBRID = {"model": {
    "d_model": 48, "n_layers": 4, "vocab_size": 40, "position": {"type": "hype", "rope_theta": 10000.0},
    "mixers": {"A": {"type": "attention", "heads": 4, "kv_heads": 2, "qk_norm": True, "gate": True},
               "L": {"type": "lightning", "heads": 4}},
    "layout": "ALLA", "ffn": {"type": "swiglu", "hidden": 96}}}


def test_hybrid_trains_and_generates():
    torch.manual_seed(0)
    model = hyloom.build_model(blueprint_model().model_validate(HYBRID))
    assert [type(b.position).__name__ for b in model.layers] == ["NoPosition", "Rotary", "Rotary", "NoPosition"]
    data = torch.arange(40).repeat(4)[None, :64].repeat(4, 1)  # a counting sequence: easy to learn
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        logits = model(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    model.eval()
    prompts = [[3, 4, 5, 6], [20, 21]]
    out = model.generate(prompts, max_new_tokens=4)
    assert out == [model.generate([p], max_new_tokens=4)[0] for p in prompts]
    assert out[0] == [7, 8, 9, 10]
