"""The built-in blueprints of released models against their published configs (SPEC §1, §4): parameter counts,
sparse-layer options, ALiBi slopes, context lengths. Each number here comes from the published config.json or
the official code, not from hyloom."""

import math

import pytest
import torch

import hyloom
from hyloom import load_blueprint
from hyloom.kernels.lightning.decay import alibi_slopes, decay_alibi
from hyloom.plugins.infllm_v2 import InfLLMv2Config
from hyloom.plugins.infllm_v2.mixer import InfLLMv2
from hyloom.plugins.lightning import LightningConfig


def minicpm_sala_parameters() -> int:
    """openbmb/MiniCPM-SALA config.json: hidden 4096, 32 layers, intermediate 16384, vocab 73448, untied head,
    32 heads × 128 with 2 KV heads in the sparse (`minicpm4`) layers at 0, 9, 16, 17, 22, 29, 30, 31 (q/k/v/o and
    o_gate, no q/k norm), lightning layers 32×128 MHA with q_norm, k_norm, o_norm and z_proj elsewhere."""
    d, L, ffn, vocab, H, D, Hkv = 4096, 32, 16384, 73448, 32, 128, 2
    sparse = d * H * D + 2 * d * Hkv * D + H * D * d + d * H * D  # q, k, v, o, o_gate
    lightning = 4 * d * H * D + 2 * D + H * D + d * H * D  # q, k, v, o; q/k norm; o_norm; z_proj
    per_layer = 2 * d + 3 * d * ffn  # two RMSNorms, SwiGLU
    return 2 * vocab * d + d + L * per_layer + 8 * sparse + 24 * lightning


def test_minicpm_sala_has_exactly_the_released_parameter_count():
    assert minicpm_sala_parameters() == 9_477_203_968
    model = hyloom.build_model(load_blueprint("builtin:minicpm-sala"), device="meta")
    assert model.num_parameters() == 9_477_203_968  # 2,048 more while the sparse layers had a QK-norm
    for i in (0, 9, 16, 17, 22, 29, 30, 31):
        names = {n for n, _ in model.layers[i].mixer.named_parameters()}
        assert not any("norm" in n for n in names), names


def test_infllm_v2_without_qk_norm_has_no_norm_weights_and_runs():
    cfg = InfLLMv2Config(heads=4, kv_heads=2, head_dim=8, qk_norm=False, block_size=4, kernel_size=4,
                         kernel_stride=2, topk=2, window=4, dense_len=4)
    with_norm = InfLLMv2(cfg.model_copy(update={"qk_norm": True}), d_model=32)
    without = InfLLMv2(cfg, d_model=32)
    assert sum(p.numel() for p in with_norm.parameters()) - sum(p.numel() for p in without.parameters()) == 16
    bp = load_blueprint("builtin:tiny", ["model.mixers.S.qk_norm=false"])
    model = hyloom.build_model(bp)
    assert torch.isfinite(model(torch.randint(0, 4096, (1, 40)))).all()


@pytest.mark.parametrize("name", ["minicpm-sala", "minicpm4-8b"])
def test_minicpm_blueprints_select_with_the_coarse_normaliser_like_the_released_models(name):
    sparse = [c for c in load_blueprint(f"builtin:{name}").model.layers if c.type == "infllm_v2"]
    assert sparse and all((c.lse_kernel_size, c.lse_kernel_stride, c.qk_norm) == (128, 64, False) for c in sparse)


def test_alibi_slopes_follow_the_alibi_recipe():
    # H = 32 (MiniCPM-SALA, SPEC §1): λ = exp(-2^(-8(h+1)/32)) from 0.431 to 0.9961
    lam = torch.exp(decay_alibi(32).double())
    assert lam[0].item() == pytest.approx(0.4313, abs=1e-4) and lam[-1].item() == pytest.approx(0.99610, abs=1e-5)
    # H = 12, by hand: the 8 slopes of H' = 8 (2^-1 … 2^-8), then slopes 1, 3, 5, 7 of H' = 16 (2^-0.5 … 2^-3.5)
    want = [2.0 ** -k for k in range(1, 9)] + [2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5, 2.0 ** -3.5]
    assert alibi_slopes(12).tolist() == pytest.approx(want, rel=1e-12)
    # H = 24: 16 slopes 2^(-k/2), then 2^-0.25, 2^-0.75, … (odd multiples of 1/4)
    assert alibi_slopes(24).tolist() == pytest.approx(
        [2.0 ** (-k / 2) for k in range(1, 17)] + [2.0 ** (-(2 * k + 1) / 4) for k in range(8)], rel=1e-12)
    assert len(set(alibi_slopes(24).tolist())) == 24  # every head its own decay
    assert alibi_slopes(6).tolist() == pytest.approx([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8,
                                                       2.0 ** -1, 2.0 ** -3], rel=1e-12)
    assert math.isclose(alibi_slopes(1).item(), 2.0 ** -8)


def test_alibi_layer_is_described_as_minimax_decay_only():
    text = LightningConfig.model_fields["decay"].description
    assert "only the decay" in text and "SiLU" in text


def test_hypenet_2b_matches_its_published_config():
    """thunlp/hybrid-linear-attention halo/configs/model/hypenet/hypenet-2b.json."""
    m = load_blueprint("builtin:hypenet-2b").model
    assert m.max_seq_len == 1_048_576  # max_position_embeddings
    assert (m.d_model, m.n_layers, m.vocab_size, m.ffn.hidden, m.tie_embeddings) == (2048, 28, 151936, 6144, True)
    assert [i for i, s in enumerate(m.layout) if s == "A"] == [2, 3, 6, 8, 9, 21, 25]  # mixer_types "attn"
    assert (m.position.type, m.position.rope_theta) == ("hype", 1e6)
    lightning = m.layers[0]
    assert (lightning.heads, lightning.head_dim, lightning.qk_norm, lightning.output_norm, lightning.gate) == \
        (16, 128, True, True, True)  # lightning_nh/nkv 16, lightning_use_qk_norm/output_norm/output_gate
