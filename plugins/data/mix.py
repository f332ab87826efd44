"""`mix`: a data source made of other sources, each with a weight (its share of the training tokens).

The mix itself only validates and builds its parts; prepare (hyloom.data.pipeline) realises the weights,
because a token share can only be measured once documents are filtered, split and tokenized. See docs/data.md.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hyloom.data import DataError, stable_hash, texts_hash
from hyloom.data.pipeline import MixPart


def _component(kind: str, value: Any, what: str) -> BaseModel:
    """Validate one `{type: NAME, ...}` mapping against the config of the registered component."""
    from hyloom.registry import registry

    if isinstance(value, BaseModel):
        return value
    if not isinstance(value, dict) or "type" not in value:
        raise ValueError(f"{what} must be a mapping with a `type` (one of: {', '.join(registry().names(kind))})")
    if value["type"] not in registry().names(kind):
        raise ValueError(f"unknown {what} type {value['type']!r} (registered: {', '.join(registry().names(kind))})")
    if kind == "data_source" and value["type"] == "mix":
        raise ValueError("a mix cannot hold another mix: list its sources in this one")
    config = registry().get(kind, value["type"]).config
    return config.model_validate(value)


class MixItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Any = Field(description="a data source, e.g. {type: stdlib} or {type: mqar, documents: 20000}")
    weight: float = Field(gt=0, allow_inf_nan=False, description="share of the training tokens (weights are "
                          "normalised: 0.8/0.2 and 4/1 mean the same)")
    tiers: list[Any] | None = Field(None, description="tier steps for this source alone (null: the data section's "
                                    "tiers; []: none, e.g. for synthetic documents a text filter would drop)")
    held_out: bool | None = Field(None, description="whether this source also gives documents to the eval split "
                                  "(null: yes, unless the source is synthetic)")

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, value):
        return _component("data_source", value, "source")

    @field_validator("tiers", mode="before")
    @classmethod
    def _tiers(cls, value):
        if value is None:
            return None
        if not isinstance(value, list):
            raise ValueError("tiers must be a list of tier steps, or null for the data section's tiers")
        return [_component("data_tier", t, f"tier step #{i}") for i, t in enumerate(value)]


class MixConfig(BaseModel):
    """Several sources, each a share of the training tokens, drawn deterministically at preparation time."""

    sources: list[MixItem] = Field(min_length=1, description="each item: `source` (a data source config), `weight` "
                                   "(> 0: its share of the training tokens, normalised), `tiers` (null: the data "
                                   "section's; a list: this source's own, [] for none), `held_out` (null: yes unless "
                                   "the source is synthetic); see docs/data.md")


class MixSource:
    """What `mix` builds: its parts for prepare, and (as any source) every part's documents in order."""

    def __init__(self, cfg: MixConfig):
        from hyloom.data.pipeline import _build

        total = math.fsum(item.weight for item in cfg.sources)
        self.parts = []
        for item in cfg.sources:
            source = _build("data_source", item.source)
            held_out = item.held_out if item.held_out is not None else not getattr(source, "synthetic", False)
            self.parts.append(MixPart(source, item.source.type, item.weight / total, item.tiers, held_out))
        if not any(p.held_out for p in self.parts):
            raise DataError("data.source (mix): no source gives documents to the eval split; set held_out: true "
                            "on at least one")

    def fingerprint(self):
        parts = []
        for part in self.parts:
            fingerprint = getattr(part.source, "fingerprint", None)
            parts.append(fingerprint() if callable(fingerprint) else texts_hash(d["text"] for d in part.source))
        return stable_hash(parts)

    def __iter__(self):
        for part in self.parts:
            yield from part.source
