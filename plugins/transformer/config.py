"""The configs and capabilities of the Transformer parts: all that registering them needs, without torch."""

from __future__ import annotations

from pydantic import BaseModel, Field, PositiveInt, model_validator

from hyloom.registry import MixerCapabilities

ATTENTION = MixerCapabilities(family="softmax", causal=True, bidirectional=True, decode=True, varlen=True)


class AttentionConfig(BaseModel):
    heads: PositiveInt
    kv_heads: PositiveInt | None = Field(None, description="key/value heads for GQA (default: heads)")
    head_dim: PositiveInt | None = Field(None, description="default: d_model // heads")
    window: PositiveInt | None = Field(None, description="sliding window in tokens (null: full causal)")
    qk_norm: bool = Field(False, description="per-head RMSNorm on q and k before the position encoding")
    gate: bool = Field(False, description="sigmoid output gate: o * sigmoid(x W_g) before W_o")
    norm_eps: float = Field(1e-6, gt=0)

    @model_validator(mode="after")
    def _gqa(self):
        if self.heads % (self.kv_heads or self.heads):
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        return self


class SwiGLUConfig(BaseModel):
    hidden: PositiveInt


class RMSNormConfig(BaseModel):
    eps: float = Field(1e-6, gt=0)
