"""The standard Transformer parts: softmax attention, SwiGLU, RMSNorm.

Registering them imports only their configs: each build function imports its module (and torch) when a model
is built, so that `hyloom ls` and `--help` stay fast."""

from hyloom.hookspecs import hookimpl
from hyloom.plugins.transformer.config import ATTENTION, AttentionConfig, RMSNormConfig, SwiGLUConfig


def build_attention(cfg, layer, model):
    from hyloom.plugins.transformer.attention import Attention

    return Attention(cfg, model.d_model)


def build_swiglu(cfg, d_model):
    from hyloom.plugins.transformer.ffn import SwiGLU

    return SwiGLU(d_model, cfg.hidden)


def build_rmsnorm(cfg, dim):
    from hyloom.plugins.transformer.norm import RMSNorm

    return RMSNorm(dim, cfg.eps)


@hookimpl
def hyloom_register_mixers(register):
    register("attention", build_attention, config=AttentionConfig, capabilities=ATTENTION,
             summary="softmax attention (GQA, sliding window, QK-norm, output gate) via SDPA",
             example={"type": "attention", "heads": 4, "kv_heads": 2, "head_dim": 16, "qk_norm": True, "gate": True})


@hookimpl
def hyloom_register_ffns(register):
    register("swiglu", build_swiglu, config=SwiGLUConfig,
             summary="SwiGLU feed-forward: down(silu(gate(x)) * up(x))", example={"type": "swiglu", "hidden": 128})


@hookimpl
def hyloom_register_norms(register):
    register("rmsnorm", build_rmsnorm, config=RMSNormConfig,
             summary="RMSNorm computed in fp32", example={"type": "rmsnorm", "eps": 1e-6})
