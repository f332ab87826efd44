"""Configs of the `passkey`/`niah` eval tasks and training sources (torch-free: `hyloom ls` imports this module).

The generators, tasks and sources themselves are in `hyloom.plugins.eval.retrieval`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, PositiveInt, field_validator, model_validator

Variant = Literal["single", "multikey", "multivalue", "multiquery"]
Scoring = Literal["exact", "answer_logprob"]
VARIANTS: tuple[str, ...] = ("single", "multikey", "multivalue", "multiquery")


def _no_repeats(values: list, what: str) -> list:
    if len(set(values)) != len(values):
        raise ValueError(f"{what} lists a value twice: {values}")
    return values


class PasskeyTaskConfig(BaseModel):
    """Passkey retrieval (Mohtashami & Jaggi): a random number hidden at a depth of held-out filler text, asked
    for at the end; greedy answer, exact match of the digits (or, with `score: answer_logprob`, the teacher-forced
    log-probability of the answer)."""

    lengths: list[PositiveInt] = Field([512, 1024, 2048, 4096], min_length=1,
                                       description="prompt lengths in tokens (filler + needle + question)")
    depths: list[float] = Field([0.0, 0.25, 0.5, 0.75, 1.0], min_length=1,
                                description="where the needle starts, as a fraction of the filler (0: first, "
                                            "1: just before the question)")
    cases: PositiveInt = Field(4, description="random keys per (length, depth) cell")
    digits: int = Field(5, ge=1, le=30, description="digits of the pass key")
    max_new_tokens: PositiveInt = Field(16, description="greedy tokens generated per answer (refused when fewer "
                                                        "than the answer needs)")
    score: Scoring = Field("exact", description="exact: greedy answer, scored 0/1 (passkey) or by the share of the "
                                                "asked values found (niah); answer_logprob: no generation, one "
                                                "forward of prompt + answer: the mean log-probability of the answer's "
                                                "tokens (continuous, <= 0) and the share of them that are the argmax")

    @field_validator("lengths", "depths")
    @classmethod
    def _distinct(cls, values, info):
        if info.field_name == "depths" and any(not 0 <= d <= 1 for d in values):
            bad = ", ".join(str(d) for d in values if not 0 <= d <= 1)
            raise ValueError(f"depths are fractions of the filler in [0, 1]; got {bad}")
        return _no_repeats(values, info.field_name)


class NiahTaskConfig(PasskeyTaskConfig):
    """RULER-style needles in a haystack: "One of the special magic numbers for {key} is: {value}." needles in
    held-out filler; score is the share of the asked values found in the greedy answer."""

    variants: list[Variant] = Field(list(VARIANTS), min_length=1,
                                    description="single: one needle; multikey: one asked needle among distractors "
                                                "with other keys; multivalue: one key with several values, all asked; "
                                                "multiquery: several keys, each with one value, all asked")
    needles: int = Field(4, ge=2, le=16, description="needles of the multi* variants (multikey: the asked one plus "
                                                     "needles-1 distractors)")
    digits: int = Field(7, ge=1, le=30, description="digits of each value (RULER: 7)")
    max_new_tokens: PositiveInt = Field(64, description="greedy tokens generated per answer (refused when fewer "
                                                        "than the longest answer needs)")

    @field_validator("variants")
    @classmethod
    def _distinct_variants(cls, values):
        return _no_repeats(values, "variants")


class RetrievalSourceConfig(BaseModel):
    """Synthetic training documents: filler text with the needle(s), the question and the answer, so that
    next-token training teaches the format the `passkey`/`niah` tasks ask in."""

    documents: PositiveInt = Field(10_000, description="how many documents the source yields")
    min_chars: PositiveInt = Field(300, description="shortest document, in characters (lengths are drawn "
                                                    "uniformly in [min_chars, max_chars])")
    max_chars: PositiveInt = Field(1500, description="longest document, in characters; keep it below the "
                                                     "training seq_len in tokens times the tokenizer's "
                                                     "characters per token, so that most examples sit in one window")
    seed: int = Field(0, description="same seed, same keys, depths, lengths and filler")
    filler: dict[str, Any] | None = Field(
        {"type": "stdlib"}, validate_default=True,
        description="a data source config whose documents (joined by blank lines, in order, repeated if needed) "
                    "are the filler; null: a built-in repeated sentence filler")

    @model_validator(mode="after")
    def _range(self):
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) is above max_chars ({self.max_chars})")
        return self

    @field_validator("filler")
    @classmethod
    def _filler_source(cls, value):
        """Validate the nested source now, so a typo is reported at `filler.…` when the blueprint is checked."""
        if value is None:
            return None
        from pydantic import ValidationError

        from hyloom.registry import UnknownComponentError, registry

        value = {"type": "stdlib", **value}
        try:
            config = registry().get("data_source", value["type"]).config
        except UnknownComponentError as exc:
            raise ValueError(f"filler: {exc}") from None
        if config is None:
            return value
        try:
            return config.model_validate(value).model_dump(mode="json")
        except ValidationError as exc:
            problems = "; ".join(f"filler.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ValueError(problems) from None


class PasskeySourceConfig(RetrievalSourceConfig):
    __doc__ = RetrievalSourceConfig.__doc__
    digits: int = Field(5, ge=1, le=30, description="digits of the pass key")


class NiahSourceConfig(RetrievalSourceConfig):
    __doc__ = RetrievalSourceConfig.__doc__
    variants: list[Variant] = Field(list(VARIANTS), min_length=1,
                                    description="each document is one of these variants, drawn uniformly")
    needles: int = Field(4, ge=2, le=16, description="needles of the multi* variants")
    digits: int = Field(7, ge=1, le=30, description="digits of each value")
    min_chars: PositiveInt = Field(700, description="shortest document, in characters (a multiquery example's "
                                                    "needles and question alone take about 500)")
    max_chars: PositiveInt = Field(1500, description=RetrievalSourceConfig.model_fields["max_chars"].description)
