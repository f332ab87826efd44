"""The built-in transformer parts against plain-PyTorch references, and the position policies."""

import math

import pytest
import torch

from hyloom.mixer import MixerContext, NoPosition
from hyloom.plugins.position import HypeConfig
from hyloom.plugins.position.policies import Hype
from hyloom.plugins.position.rotary import QueryScaling, Rotary
from hyloom.plugins.transformer import AttentionConfig
from hyloom.plugins.transformer.attention import Attention
from hyloom.plugins.transformer.norm import RMSNorm


def reference_attention(mod: Attention, x, pos, causal, window):
    B, T, _ = x.shape
    H, Hkv, D = mod.heads, mod.kv_heads, mod.head_dim
    q = mod.q_proj(x).view(B, T, H, D)
    k = mod.k_proj(x).view(B, T, Hkv, D)
    v = mod.v_proj(x).view(B, T, Hkv, D)
    if mod.q_norm is not None:
        q, k = mod.q_norm(q), mod.k_norm(k)
    q, k = Rotary(10000.0).apply(q, k, pos)
    k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = torch.ones(T, T, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    if window:
        allowed &= (i - j).abs() < window
    o = torch.einsum("bhij,bjhd->bihd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)
    o = o.reshape(B, T, H * D)
    if mod.g_proj is not None:
        o = o * torch.sigmoid(mod.g_proj(x))
    return mod.o_proj(o)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("cfg", [
    dict(heads=4),
    dict(heads=6, kv_heads=2, head_dim=8, qk_norm=True, gate=True),
    dict(heads=4, kv_heads=1, window=5),
])
def test_attention_matches_reference(cfg, causal):
    torch.manual_seed(0)
    mod = Attention(AttentionConfig(**cfg), d_model=24)
    x = torch.randn(2, 13, 24)
    pos = torch.arange(13)[None].expand(2, 13)
    ctx = MixerContext(pos_BT=pos, position=Rotary(10000.0), causal=causal)
    torch.testing.assert_close(mod(x, ctx), reference_attention(mod, x, pos, causal, cfg.get("window")),
                               rtol=1e-5, atol=1e-5)


def test_attention_config_rejects_bad_gqa():
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        AttentionConfig(heads=6, kv_heads=4)


def test_rope_scores_depend_only_on_relative_position():
    rope = Rotary(10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    def score(pq, pk):
        rq, _ = rope.apply(q, q, torch.tensor([[pq]]))
        _, rk = rope.apply(k, k, torch.tensor([[pk]]))
        return float((rq * rk).sum())
    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)
    rotated, _ = rope.apply(q, k, torch.tensor([[5]]))
    assert float(rotated.norm()) == pytest.approx(float(q.norm()), rel=1e-5)


def test_hype_gives_rope_to_linear_layers_and_nope_to_attention():
    policy = Hype(HypeConfig(rope_theta=1e6))
    assert isinstance(policy.for_layer("linear", 0), Rotary)
    assert isinstance(policy.for_layer("softmax", 1), NoPosition)
    assert isinstance(policy.for_layer("sparse", 2), NoPosition)
    scaled = Hype(HypeConfig(a=500.0)).for_layer("softmax", 0)
    assert isinstance(scaled, QueryScaling)


def test_query_scaling_is_log_length():
    q, k = torch.ones(1, 3, 2, 4), torch.ones(1, 3, 2, 4)
    pos = torch.tensor([[0, 10, 1000]])
    q2, k2 = QueryScaling(500.0).apply(q, k, pos)
    expected = torch.tensor([1.0, math.log(510) / math.log(500), math.log(1500) / math.log(500)])
    torch.testing.assert_close(q2[0, :, 0, 0], expected)
    assert torch.equal(k2, k)


def test_rmsnorm():
    norm = RMSNorm(8, eps=1e-6)
    x = torch.randn(3, 8) * 5
    torch.testing.assert_close(norm(x), x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())


def test_rmsnorm_keeps_the_input_dtype_under_mixed_precision():
    norm = RMSNorm(8)  # fp32 weight, as under autocast
    assert norm(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
