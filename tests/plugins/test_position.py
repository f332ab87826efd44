"""Rotary positions: LongRoPE against the published formula and transformers, MiniCPM4-8B's factors, and the one
name (`rope_theta`) both rotary policies use for the base."""

import math
import warnings

import pytest
import torch

from hyloom import load_blueprint
from hyloom.plugins.hf.formats import LLAMA, ConversionError
from hyloom.plugins.position import _WARNED, HypeConfig, LongRopeScaling, RopeConfig
from hyloom.plugins.position.policies import rotary

SHORT = [1.0, 1.5, 2.0, 4.0]  # head_dim 8: four rotary pairs
LONG = [1.0, 3.0, 8.0, 16.0]

# The rope_scaling block of openbmb/MiniCPM4-8B (model card / OpenBMB README): 64 factors, first and last.
MINICPM4_FIRST, MINICPM4_LAST, MINICPM4_N = 0.9977997200264581, 124.09569231686116, 64


def longrope(max_pos, original=16, **extra):
    return LongRopeScaling(type="longrope", short_factor=SHORT, long_factor=LONG,
                           original_max_position_embeddings=original, max_position_embeddings=max_pos, **extra)


def published_formula(q, pos, theta, factors, magnitude):
    """MiniCPMLongRoPE written out by hand, in float64: pair i of a head of size D turns by
    pos / factors[i] · θ^(-2i/D); cos and sin are multiplied by the magnitude; rotate-half layout."""
    D = q.shape[-1]
    out = torch.empty_like(q, dtype=torch.float64)
    for t, p in enumerate(pos):
        for i in range(D // 2):
            angle = p / factors[i] * theta ** (-2 * i / D)
            c, s = math.cos(angle) * magnitude, math.sin(angle) * magnitude
            x1, x2 = q[:, t, :, i].double(), q[:, t, :, i + D // 2].double()
            out[:, t, :, i] = x1 * c - x2 * s
            out[:, t, :, i + D // 2] = x2 * c + x1 * s
    return out


@pytest.mark.parametrize("max_pos, factors, magnitude", [
    (16, SHORT, 1.0),  # context not extended: short factors, no magnitude change
    (64, LONG, math.sqrt(1 + math.log(4) / math.log(16))),  # extended 4×: long factors, √(1 + ln 4 / ln 16)
])
def test_longrope_matches_the_published_formula(max_pos, factors, magnitude):
    torch.manual_seed(0)
    q = torch.randn(1, 6, 2, 8)
    pos = [0, 1, 5, 15, 16, 40]
    enc = rotary(500.0, longrope(max_pos))
    got, _ = enc.apply(q, q, torch.tensor([pos]))
    want = published_formula(q, pos, 500.0, factors, magnitude)
    assert torch.allclose(got.double(), want, atol=1e-5), (got.double() - want).abs().max()


def _transformers_longrope(scaling: LongRopeScaling, theta, head_dim, seq_len):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = transformers.LlamaConfig(
        hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
        max_position_embeddings=scaling.max_position_embeddings,
        rope_parameters={"rope_type": "longrope", "rope_theta": theta, "short_factor": scaling.short_factor,
                         "long_factor": scaling.long_factor,
                         "original_max_position_embeddings": scaling.original_max_position_embeddings})
    return ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=seq_len)


@pytest.mark.parametrize("max_pos, seq_len", [(16, 10), (16, None), (64, 40)])
def test_longrope_matches_transformers_where_both_pick_the_same_list(max_pos, seq_len):
    scaling = longrope(max_pos)
    inv_freq, attention_factor = _transformers_longrope(scaling, 1e4, 8, seq_len)
    ours = rotary(1e4, scaling)
    assert torch.allclose(ours.inv_freq(8), inv_freq, rtol=1e-6)
    assert ours.attention_factor == pytest.approx(attention_factor, rel=1e-12)


def test_longrope_picks_one_list_per_context_like_minicpm_not_per_pass_like_transformers():
    """MiniCPM's code builds its table once for max_position_embeddings, so an extended model uses long_factor
    at every position; transformers re-picks short_factor for passes within the original context. hyloom
    follows MiniCPM (a cache never holds keys rotated two ways). Equal lists (MiniCPM4-8B) make it moot."""
    scaling = longrope(64)
    short_pass, _ = _transformers_longrope(scaling, 1e4, 8, seq_len=10)
    assert not torch.allclose(rotary(1e4, scaling).inv_freq(8), short_pass)
    equal = LongRopeScaling(type="longrope", short_factor=LONG, long_factor=LONG,
                            original_max_position_embeddings=16, max_position_embeddings=64)
    for seq_len in (10, 40):
        assert torch.allclose(rotary(1e4, equal).inv_freq(8), _transformers_longrope(equal, 1e4, 8, seq_len)[0])


def test_minicpm4_8b_uses_the_published_longrope():
    model = load_blueprint("builtin:minicpm4-8b").model
    pos = model.position
    assert (pos.type, pos.rope_theta) == ("rope", 1e4)
    s = pos.scaling
    assert (s.type, s.original_max_position_embeddings, s.max_position_embeddings) == ("longrope", 32768, 32768)
    assert len(s.short_factor) == len(s.long_factor) == MINICPM4_N == model.layers[0].head_dim // 2
    assert s.short_factor == s.long_factor  # the published block repeats one list
    assert (s.short_factor[0], s.short_factor[-1]) == (MINICPM4_FIRST, MINICPM4_LAST)
    assert all(a < b for a, b in zip(s.short_factor, s.short_factor[1:]))  # monotone, as published
    enc = rotary(pos.rope_theta, s)
    assert enc.attention_factor == 1.0  # not extended past the original 32K
    # a 128K context (the model card's verified extension) scales cos/sin by √(1 + ln 4 / ln 32768)
    long_ctx = load_blueprint("builtin:minicpm4-8b", ["model.max_seq_len=131072"]).model.position.scaling
    assert rotary(1e4, long_ctx).attention_factor == pytest.approx(math.sqrt(1 + math.log(4) / math.log(32768)))


def test_factor_list_that_does_not_fit_the_head_is_named():
    enc = rotary(1e4, longrope(16))
    with pytest.raises(ValueError, match=r"model\.position\.scaling\.short_factor has 4 values.*16 dimensions"):
        enc.apply(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="short_factor has 4 values and long_factor 3"):
        LongRopeScaling(type="longrope", short_factor=SHORT, long_factor=LONG[:3],
                        original_max_position_embeddings=16, max_position_embeddings=16)


# ---- one name for the base ----------------------------------------------------------------------------------

def test_both_rotary_policies_call_the_base_rope_theta():
    assert RopeConfig(rope_theta=5e5).rope_theta == HypeConfig(rope_theta=5e5).rope_theta == 5e5
    # switching a blueprint's policy keeps its base: no key to rename
    bp = load_blueprint("builtin:llama3-8b", ["model.position.type=hype"])
    assert (bp.model.position.type, bp.model.position.rope_theta) == ("hype", 5e5)


def test_old_theta_spelling_still_works_and_warns():
    _WARNED.clear()  # the note is shown once per process
    with pytest.warns(FutureWarning, match="`theta` is deprecated, write `rope_theta`"):
        cfg = RopeConfig.model_validate({"theta": 5e5})
    assert cfg.rope_theta == 5e5
    with pytest.raises(ValueError, match=r"`theta` \(500000.0\) and `rope_theta` \(10000.0\) are both set"):
        RopeConfig.model_validate({"theta": 5e5, "rope_theta": 1e4})
    _WARNED.clear()
    with pytest.warns(FutureWarning):  # an old child restating its parent's base is fine
        assert RopeConfig.model_validate({"theta": 5e5, "rope_theta": 5e5}).rope_theta == 5e5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RopeConfig.model_validate({"rope_theta": 5e5})  # the current name never warns


def test_old_theta_in_a_blueprint_loads(tmp_path):
    path = tmp_path / "bp.yaml"
    path.write_text("model: {d_model: 32, n_layers: 1, vocab_size: 50, position: {type: rope, theta: 500000},\n"
                    "        mixers: {A: {type: attention, heads: 2}}, layout: A, ffn: {type: swiglu, hidden: 64}}\n")
    _WARNED.clear()
    with pytest.warns(FutureWarning):
        assert load_blueprint(str(path)).model.position.rope_theta == 5e5


# ---- import-hf / export -------------------------------------------------------------------------------------

HF_BASE = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "vocab_size": 50,
           "num_attention_heads": 4, "intermediate_size": 64, "rope_theta": 1e4}


def test_import_hf_maps_longrope_and_export_writes_it_back():
    config = {**HF_BASE, "max_position_embeddings": 16,
              "rope_scaling": {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                               "original_max_position_embeddings": 16}}
    position = LLAMA.blueprint(config)["model"]["position"]
    assert position == {"type": "rope", "rope_theta": 1e4, "scaling": {
        "type": "longrope", "short_factor": SHORT, "long_factor": LONG, "original_max_position_embeddings": 16,
        "max_position_embeddings": 16}}
    bp = load_blueprint("builtin:llama3-8b", [
        "model.d_model=32", "model.n_layers=1", "model.vocab_size=50", "model.max_seq_len=16",
        "model.layout={repeat: A, times: 1}", "model.mixers.A={type: attention, heads: 4, kv_heads: 4}",
        "model.ffn.hidden=64", f"model.position={position}"])
    out = LLAMA.hf_config(bp)
    assert out["rope_parameters"]["rope_type"] == out["rope_scaling"]["rope_type"] == "longrope"
    assert out["rope_parameters"]["long_factor"] == LONG and out["rope_parameters"]["attention_factor"] == 1.0


@pytest.mark.parametrize("scaling, field", [
    ({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "original_max_position_embeddings": 16},
     "rope_scaling.long_factor"),  # extended context with two different lists: transformers switches mid-context
    ({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG}, "original_max_position_embeddings"),
    ({"rope_type": "longrope", "short_factor": SHORT, "long_factor": "x", "original_max_position_embeddings": 16},
     "rope_scaling.long_factor"),
    ({"rope_type": "longrope", "short_factor": SHORT, "long_factor": SHORT, "original_max_position_embeddings": 16,
      "short_mscale": 1.2}, "rope_scaling.short_mscale"),
])
def test_import_hf_refuses_longrope_it_cannot_match(scaling, field):
    with pytest.raises(ConversionError, match=field.replace(".", r"\.")):
        LLAMA.blueprint({**HF_BASE, "max_position_embeddings": 64, "rope_scaling": scaling})


@pytest.mark.parametrize("max_seq_len, max_pos, field", [
    (16, 32, "model.position.scaling.max_position_embeddings"),  # config.json has a single max_position_embeddings
    (64, 64, "model.position.scaling.long_factor"),  # extended, lists differ: transformers switches mid-context
])
def test_export_refuses_a_longrope_transformers_would_run_differently(max_seq_len, max_pos, field):
    scaling = {"type": "longrope", "short_factor": SHORT, "long_factor": LONG, "original_max_position_embeddings": 16,
               "max_position_embeddings": max_pos}
    bp = load_blueprint("builtin:llama3-8b", [
        "model.d_model=32", "model.n_layers=1", "model.vocab_size=50", f"model.max_seq_len={max_seq_len}",
        "model.layout={repeat: A, times: 1}", "model.mixers.A={type: attention, heads: 4, kv_heads: 4}",
        "model.ffn.hidden=64", f"model.position={{type: rope, rope_theta: 10000, scaling: {scaling}}}"])
    with pytest.raises(ConversionError, match=field.replace(".", r"\.")):
        LLAMA.hf_config(bp)
