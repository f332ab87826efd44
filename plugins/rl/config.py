"""Configs of the verifiers and prompt sets (torch-free: `hyloom ls` imports this module)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, Field, PositiveFloat, PositiveInt, field_validator, model_validator


@dataclass(frozen=True)
class Reward:
    """What a verifier returns: the scalar reward and why (logged next to the completion)."""

    reward: float
    info: dict = field(default_factory=dict)


class Rewards(BaseModel):
    correct: float = Field(1.0, description="reward of a correct completion (JustRL: +1)")
    wrong: float = Field(-1.0, description="reward of a wrong one, or one with no answer (JustRL: -1)")


class MathConfig(Rewards):
    """The final answer (last `\\boxed{...}` or `#### n`) against the record's answer, numerically when both parse
    as numbers (fractions, decimals, thousands separators, `\\frac`), else as normalised text."""

    answer_field: str = Field("answer", description="the record's field holding the reference answer")
    tolerance: float = Field(1e-6, ge=0, description="relative tolerance between two numbers (0: exact)")


class ExactConfig(Rewards):
    """The whole completion, normalised, equals the record's answer."""

    answer_field: str = Field("answer", description="the record's field holding the reference answer")
    ignore_case: bool = Field(True, description="compare case-folded")
    collapse_whitespace: bool = Field(True, description="strip the ends and turn each run of whitespace into one space")


class RegexConfig(Rewards):
    """A pattern (fixed, or read from a field of each record) matches the completion (or a field of the record)."""

    pattern: str | None = Field(None, description="the regular expression (Python `re`); or give pattern_field")
    pattern_field: str | None = Field(None, description="the record's field holding each record's pattern")
    target_field: str | None = Field(None, description="match this field of the record instead of the completion")
    mode: Literal["search", "fullmatch"] = Field("search", description="match anywhere, or the whole text")
    ignore_case: bool = False
    dotall: bool = Field(True, description="`.` also matches a newline")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value):
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"pattern {value!r} is not a valid regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _one_pattern(self):
        if (self.pattern is None) == (self.pattern_field is None):
            raise ValueError("give exactly one of pattern and pattern_field")
        return self


class PythonTestsConfig(Rewards):
    """The completion's code, then each test of the record's `tests` field, in the sandbox: correct when every
    test passes. Limits are per completion (docs/rl.md, "The sandbox")."""

    tests_field: str = Field("tests", description="the record's field: a string of Python or a list of them "
                             "(e.g. `assert f(2) == 4`), each run after the completion's code")
    extract_code: bool = Field(True, description="run the last ```python fenced block when there is one, else "
                               "the whole completion")
    timeout_s: PositiveFloat = Field(5.0, description="wall-clock limit; the whole process group is then killed")
    cpu_s: PositiveInt = Field(5, description="CPU-time limit (RLIMIT_CPU)")
    memory_mb: PositiveInt = Field(512, ge=64, description="address-space limit (RLIMIT_AS)")
    max_processes: PositiveInt = Field(32, description="process limit (RLIMIT_NPROC) of the sandbox's user")
    file_mb: PositiveInt = Field(16, description="largest file it may write (RLIMIT_FSIZE)")


class JsonlPrompts(BaseModel):
    """Prompt records from a JSONL file: each line an object with `prompt` and `answer` or `tests`; every field is
    passed to the verifiers."""

    type: Literal["jsonl"] = "jsonl"
    path: str = Field(description="the JSONL file")
    limit: PositiveInt | None = Field(None, description="use only the first N records")


class ArithmeticPrompts(BaseModel):
    """Generated multi-step integer problems (no download): start from a number, apply `steps` operations."""

    type: Literal["arithmetic"] = "arithmetic"
    count: PositiveInt = Field(1000, description="how many problems")
    steps: PositiveInt = Field(3, le=64, description="the difficulty knob: operations per problem")
    max_operand: int = Field(20, ge=2, description="operands are drawn from 1..max_operand")
    max_value: int = Field(10_000, ge=10, description="every intermediate value stays within ±max_value")
    ops: list[Literal["+", "-", "*", "/"]] = Field(["+", "-", "*", "/"], min_length=1,
                                                   description="operations to draw from; `/` always divides exactly")
    seed: int = Field(0, description="same seed and settings, same problems")
    instruction: str = Field("Put the final answer in \\boxed{}.", description="appended to each problem")


PromptSetConfig = JsonlPrompts | ArithmeticPrompts
