"""Position policies: `rope`, `nope` and `hype` (RoPE for linear mixers, NoPE for attention; SPEC §3)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from hyloom.hookspecs import hookimpl
from hyloom.mixer import NoPosition
from hyloom.plugins.position.rotary import QueryScaling, Rotary


class RopeConfig(BaseModel):
    theta: float = Field(10000.0, gt=0, description="RoPE base θ (1e4 MiniCPM/Llama-2, 5e5 Llama-3, 1e6 Qwen3)")


class NopeConfig(BaseModel):
    pass


class HypeConfig(BaseModel):
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base θ of the linear-family layers")
    a: float | None = Field(None, gt=1, description="log-length query scaling ln(t+a)/ln(a) on attention "
                                                   "layers (HypeNet: 500/600/900); null turns it off")


class Uniform:
    """Every layer gets the same encoding."""

    def __init__(self, encoding):
        self.encoding = encoding

    def for_layer(self, family, layer):
        return self.encoding


class Hype:
    def __init__(self, cfg: HypeConfig):
        self.rotary = Rotary(cfg.rope_theta)
        self.attention = QueryScaling(cfg.a) if cfg.a else NoPosition()

    def for_layer(self, family, layer):
        return self.rotary if family == "linear" else self.attention


@hookimpl
def hyloom_register_positions(register):
    register("rope", lambda cfg: Uniform(Rotary(cfg.theta)), config=RopeConfig,
             summary="rotary position embedding on every layer", example={"type": "rope", "theta": 10000.0})
    register("nope", lambda cfg: Uniform(NoPosition()), config=NopeConfig,
             summary="no position encoding on any layer", example={"type": "nope"})
    register("hype", Hype, config=HypeConfig,
             summary="HyPE: RoPE on linear layers, NoPE (+ optional log-length query scaling) on attention",
             example={"type": "hype", "rope_theta": 10000.0, "a": 500.0})
