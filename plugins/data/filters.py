"""Heuristic tier steps: each drops a document whose text looks like junk by one measure, and says why.

The defaults are set so that the standard-library corpus keeps almost everything: Python source is full of
symbols and repeated lines (`return`, `else:`), so only clear outliers go — empty files, generated tables
(codec maps, `stringprep.py`), huge data files (`pydoc_data/topics.py`), binaries. Ratios are over the
non-whitespace characters, so indentation does not count. Counting goes through `re.subn`, which runs in C.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, Field, NonNegativeInt

_SPACE = re.compile(r"\s")
_SYMBOL = re.compile(r"[^\w\s]|_")  # neither letter/digit nor whitespace (\w counts "_", a symbol here)
_DIGIT = re.compile(r"\d")
# C0/C1 control characters other than tab, newline, carriage return and form feed, and U+FFFD, which the
# sources put where bytes were not valid UTF-8.
_NON_TEXT = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\ufffd]")


def _count(pattern: re.Pattern, text: str) -> int:
    return pattern.subn("", text)[1]


def _visible(text: str) -> int:
    return len(text) - _count(_SPACE, text)


class LengthConfig(BaseModel):
    min_chars: NonNegativeInt = Field(64, description="drop documents shorter than this (empty __init__.py files)")
    max_chars: NonNegativeInt | None = Field(500_000, description="drop documents longer than this (null: no limit); "
                                             "the stdlib's only one is the generated pydoc_data/topics.py")
    min_words: NonNegativeInt = Field(5, description="drop documents with fewer whitespace-separated words")


def length(cfg: LengthConfig):
    def judge(doc: dict) -> str | None:
        text = doc["text"]
        if len(text) < cfg.min_chars:
            return f"too short: {len(text)} chars < {cfg.min_chars}"
        if cfg.max_chars is not None and len(text) > cfg.max_chars:
            return f"too long: {len(text)} chars > {cfg.max_chars}"
        words = len(text.split())
        if words < cfg.min_words:
            return f"too few words: {words} < {cfg.min_words}"
        return None

    return judge


class SymbolsConfig(BaseModel):
    max_ratio: float = Field(0.45, ge=0, le=1, description="drop documents whose share of symbol characters "
                             "(not letters, digits or whitespace) is above this; Python source reaches ~0.37")


def _share_judge(pattern, label: str, max_ratio: float):
    """Drop a document when characters matching `pattern` are more than `max_ratio` of its visible ones."""

    def judge(doc: dict) -> str | None:
        visible = _visible(doc["text"])
        ratio = _count(pattern, doc["text"]) / visible if visible else 0.0
        return f"{label} ratio {ratio:.2f} > {max_ratio}" if ratio > max_ratio else None

    return judge


def symbols(cfg: SymbolsConfig):
    return _share_judge(_SYMBOL, "symbol", cfg.max_ratio)


class DigitsConfig(BaseModel):
    max_ratio: float = Field(0.2, ge=0, le=1, description="drop documents whose share of digits is above this "
                             "(in the stdlib: generated codec tables and stringprep.py)")


def digits(cfg: DigitsConfig):
    return _share_judge(_DIGIT, "digit", cfg.max_ratio)


class RepeatedLinesConfig(BaseModel):
    max_fraction: float = Field(0.5, ge=0, le=1, description="drop documents where more than this share of the "
                                "non-blank lines repeat an earlier line (stripped); Python source reaches ~0.46")


def repeated_lines(cfg: RepeatedLinesConfig):
    def judge(doc: dict) -> str | None:
        lines = [line.strip() for line in doc["text"].splitlines() if line.strip()]
        if not lines:
            return None
        fraction = (len(lines) - len(set(lines))) / len(lines)
        return f"repeated lines {fraction:.2f} > {cfg.max_fraction}" if fraction > cfg.max_fraction else None

    return judge


class NonTextConfig(BaseModel):
    max_ratio: float = Field(0.001, ge=0, le=1, description="drop documents where more than this share of the "
                             "characters are control characters or U+FFFD (bytes that were not UTF-8): binaries")


def non_text(cfg: NonTextConfig):
    def judge(doc: dict) -> str | None:
        text = doc["text"]
        ratio = _count(_NON_TEXT, text) / len(text) if text else 0.0
        return f"non-text characters {ratio:.3f} > {cfg.max_ratio}" if ratio > cfg.max_ratio else None

    return judge
