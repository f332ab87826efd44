"""The standard Transformer parts: softmax attention, SwiGLU, RMSNorm."""

from hyloom.hookspecs import hookimpl
from hyloom.plugins.transformer.attention import Attention, AttentionConfig
from hyloom.plugins.transformer.ffn import SwiGLU, SwiGLUConfig
from hyloom.plugins.transformer.norm import RMSNorm, RMSNormConfig


@hookimpl
def hyloom_register_mixers(register):
    register("attention", lambda cfg, layer, model: Attention(cfg, model.d_model), config=AttentionConfig,
             capabilities=Attention.capabilities,
             summary="softmax attention (GQA, sliding window, QK-norm, output gate) via SDPA",
             example={"type": "attention", "heads": 4, "kv_heads": 2, "head_dim": 16, "qk_norm": True, "gate": True})


@hookimpl
def hyloom_register_ffns(register):
    register("swiglu", lambda cfg, d_model: SwiGLU(d_model, cfg.hidden), config=SwiGLUConfig,
             summary="SwiGLU feed-forward: down(silu(gate(x)) * up(x))", example={"type": "swiglu", "hidden": 128})


@hookimpl
def hyloom_register_norms(register):
    register("rmsnorm", lambda cfg, dim: RMSNorm(dim, cfg.eps), config=RMSNormConfig,
             summary="RMSNorm computed in fp32", example={"type": "rmsnorm", "eps": 1e-6})
