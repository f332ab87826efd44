"""The `lightning` mixer: linear attention with a fixed per-head decay (SPEC §1, MiniCPM-SALA / HypeNet).

This module holds what registering it needs (config, capabilities); the layer is in `mixer.py`, imported when a
model is built, so that `hyloom ls` and `--help` import no torch."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, PositiveInt

from hyloom.hookspecs import hookimpl
from hyloom.registry import MixerCapabilities

CAPABILITIES = MixerCapabilities(family="linear", causal=True, bidirectional=True, decode=True, varlen=True)


class LightningConfig(BaseModel):
    heads: PositiveInt
    head_dim: PositiveInt | None = Field(None, description="default: d_model // heads")
    decay: Literal["alibi", "alibi_layer", "tnl_linear"] = Field(
        "alibi", description="per-head decay: alibi (HypeNet, MiniCPM-SALA), alibi_layer (MiniMax-01's "
                             "depth-scaled schedule; only the decay: MiniMax's layer also has SiLU on q/k/v, no "
                             "1/√D scale and no QK-norm), tnl_linear (fla chunk_lightning_attn)")
    bidirectional_decay: Literal["none", "symmetric"] = Field(
        "none", description="with model.causal false: no decay (O = Q KᵀV), or λ^|i-j|")
    qk_norm: bool = Field(True, description="per-head RMSNorm on q and k")
    output_norm: bool = Field(True, description="RMSNorm over the concatenated H·D output")
    gate: bool = Field(True, description="output gate: o * sigmoid(x W_z)")
    norm_eps: float = Field(1e-6, gt=0)


def build(cfg, layer, model):
    from hyloom.plugins.lightning.mixer import Lightning

    return Lightning(cfg, layer, model.n_layers, model.d_model)


@hookimpl
def hyloom_register_mixers(register):
    register("lightning", build, config=LightningConfig, capabilities=CAPABILITIES,
             summary="Lightning linear attention with fixed per-head decay (QK-norm, output norm and gate)",
             example={"type": "lightning", "heads": 2, "head_dim": 16})
