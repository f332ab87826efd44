"""The position policies the `rope`, `nope` and `hype` configs build (configs and registration:
hyloom.plugins.position)."""

from __future__ import annotations

from hyloom.mixer import NoPosition
from hyloom.plugins.position import HypeConfig, LongRopeScaling
from hyloom.plugins.position.rotary import QueryScaling, Rotary


def rotary(theta: float, scaling: LongRopeScaling | None) -> Rotary:
    if scaling is None:
        return Rotary(theta)
    which = "long_factor" if scaling.extended() else "short_factor"
    return Rotary(theta, tuple(getattr(scaling, which)), scaling.magnitude(),
                  factors_key=f"model.position.scaling.{which}")


class Uniform:
    """Every layer gets the same encoding."""

    def __init__(self, encoding):
        self.encoding = encoding

    def for_layer(self, family, layer):
        return self.encoding


class Hype:
    def __init__(self, cfg: HypeConfig):
        self.rotary = rotary(cfg.rope_theta, cfg.scaling)
        self.attention = QueryScaling(cfg.a) if cfg.a else NoPosition()

    def for_layer(self, family, layer):
        return self.rotary if family == "linear" else self.attention
