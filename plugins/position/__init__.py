"""Position policies: `rope`, `nope` and `hype` (RoPE for linear mixers, NoPE for attention; SPEC §3).

Both rotary policies call the RoPE base `rope_theta` (the name transformers' config.json and torchtitan use), so
a blueprint can switch between them without renaming keys. `rope`'s former `theta` is still read, with a
FutureWarning.

This module holds the configs and the registration; the policies (`policies.py`, which needs torch) are imported
when a model is built, so that `hyloom ls` and `--help` stay fast.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

from pydantic import BaseModel, Field, PositiveFloat, PositiveInt, model_validator

from hyloom.hookspecs import hookimpl


class LongRopeScaling(BaseModel):
    """LongRoPE (MiniCPM4, Phi-3): per-frequency stretch factors, one per rotary pair (head_dim / 2 values).

    Which list applies is fixed by the configured context, as in MiniCPM's modeling code: `long_factor` when
    max_position_embeddings > original_max_position_embeddings, else `short_factor`, for every position (so a
    cached sequence never mixes two rotations). transformers instead picks per forward pass, by the largest
    position; the two agree whenever the lists are equal (MiniCPM4) or the context is not extended."""

    model_config = {"extra": "forbid"}

    type: Literal["longrope"]
    short_factor: list[PositiveFloat] = Field(min_length=1, description="stretch per rotary pair within the "
                                              "original context (head_dim/2 values)")
    long_factor: list[PositiveFloat] = Field(min_length=1, description="stretch per rotary pair for an extended "
                                             "context (head_dim/2 values)")
    original_max_position_embeddings: PositiveInt = Field(description="context length of pre-training")
    max_position_embeddings: PositiveInt = Field(description="context the model is set up for (config.json's "
                                                 "max_position_embeddings; usually model.max_seq_len)")
    attention_factor: PositiveFloat | None = Field(None, description="cos/sin multiplier; default "
                                                   "√(1 + ln s / ln original) with s = max/original when s > 1, else 1")

    @model_validator(mode="after")
    def _same_length(self):
        if len(self.short_factor) != len(self.long_factor):
            raise ValueError(f"short_factor has {len(self.short_factor)} values and long_factor "
                             f"{len(self.long_factor)}; both need one per rotary pair (head_dim / 2)")
        return self

    def extended(self) -> bool:
        return self.max_position_embeddings > self.original_max_position_embeddings

    def magnitude(self) -> float:
        if self.attention_factor is not None:
            return self.attention_factor
        s = self.max_position_embeddings / self.original_max_position_embeddings
        return math.sqrt(1 + math.log(s) / math.log(self.original_max_position_embeddings)) if s > 1 else 1.0


THETA = Field(10000.0, gt=0, description="RoPE base θ (1e4 MiniCPM/Llama-2, 5e5 Llama-3, 1e6 Qwen3)")
SCALING = Field(None, description="rotary scaling: {type: longrope, short_factor, long_factor (head_dim/2 values "
                                  "each), original_max_position_embeddings, max_position_embeddings, optional "
                                  "attention_factor}; null: plain RoPE")


_WARNED: dict = {}


class RopeConfig(BaseModel):
    rope_theta: float = THETA
    scaling: LongRopeScaling | None = SCALING

    @model_validator(mode="before")
    @classmethod
    def _old_theta(cls, data):
        """`theta` was this policy's name for rope_theta: still read, with a warning, until it is removed."""
        if not isinstance(data, dict) or "theta" not in data:
            return data
        if "rope_theta" in data and data["rope_theta"] != data["theta"]:
            # e.g. an old child blueprint's `theta` over a parent's `rope_theta`: which one is meant is unknowable
            raise ValueError(f"`theta` ({data['theta']}) and `rope_theta` ({data['rope_theta']}) are both set; "
                             "`theta` is the deprecated spelling: write `rope_theta` in every blueprint involved")
        # explicit location: the caller is pydantic, whose source line would only confuse; the registry makes the
        # note appear once per process however often blueprints are loaded
        warnings.warn_explicit("model.position: `theta` is deprecated, write `rope_theta` (same meaning, the name "
                               "`hype` and transformers use)", FutureWarning, "blueprint", 0,
                               module="hyloom.plugins.position", registry=_WARNED)
        data = dict(data)
        data["rope_theta"] = data.pop("theta")  # (equal to rope_theta when both were given)
        return data


class NopeConfig(BaseModel):
    pass


class HypeConfig(BaseModel):
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base θ of the linear-family layers")
    scaling: LongRopeScaling | None = SCALING
    a: float | None = Field(None, gt=1, description="log-length query scaling ln(t+a)/ln(a) on attention "
                                                   "layers (HypeNet: 500/600/900); null turns it off")


def build_rope(cfg: RopeConfig):
    from hyloom.plugins.position.policies import Uniform, rotary

    return Uniform(rotary(cfg.rope_theta, cfg.scaling))


def build_nope(cfg: NopeConfig):
    from hyloom.plugins.position.policies import NoPosition, Uniform

    return Uniform(NoPosition())


def build_hype(cfg: HypeConfig):
    from hyloom.plugins.position.policies import Hype

    return Hype(cfg)


@hookimpl
def hyloom_register_positions(register):
    register("rope", build_rope, config=RopeConfig,
             summary="rotary position embedding on every layer (optionally LongRoPE-scaled)",
             example={"type": "rope", "rope_theta": 10000.0})
    register("nope", build_nope, config=NopeConfig,
             summary="no position encoding on any layer", example={"type": "nope"})
    register("hype", build_hype, config=HypeConfig,
             summary="HyPE: RoPE on linear layers, NoPE (+ optional log-length query scaling) on attention",
             example={"type": "hype", "rope_theta": 10000.0, "a": 500.0})
