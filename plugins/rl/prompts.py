"""Prompt sets for RL: records (dicts) with `prompt` and `answer` or `tests`, from a JSONL file or generated.

`load_prompt_set(config)` takes a `jsonl` or `arithmetic` config (hyloom.plugins.rl.config) or a mapping of one."""

from __future__ import annotations

import json
import random
from pathlib import Path

from pydantic import TypeAdapter

from hyloom.errors import SetupError
from hyloom.plugins.rl.config import ArithmeticPrompts, JsonlPrompts, PromptSetConfig


class PromptSetError(SetupError):
    """A prompt set that cannot be used (missing file, bad line, missing fields): the CLI exits with 2."""


def load_prompt_set(spec) -> list[dict]:
    cfg = TypeAdapter(PromptSetConfig).validate_python(spec) if isinstance(spec, dict) else spec
    return load_jsonl(cfg.path, cfg.limit) if isinstance(cfg, JsonlPrompts) else arithmetic(cfg)


def load_jsonl(path, limit: int | None = None) -> list[dict]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise PromptSetError(f"{path}: cannot read the prompt set: {exc.strerror or exc}") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptSetError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise PromptSetError(f"{path}:{number}: each line must be a JSON object, got {type(record).__name__}")
        if not isinstance(record.get("prompt"), str):
            raise PromptSetError(f"{path}:{number}: the record has no string field 'prompt' "
                                 f"(fields: {', '.join(record) or 'none'})")
        if "answer" not in record and "tests" not in record:
            raise PromptSetError(f"{path}:{number}: the record needs 'answer' or 'tests' "
                                 f"(fields: {', '.join(record)})")
        records.append(record)
        if limit is not None and len(records) == limit:
            break
    if not records:
        raise PromptSetError(f"{path}: the prompt set is empty")
    return records


_WORDS = {"+": "Add {k}.", "-": "Subtract {k}.", "*": "Multiply by {k}.", "/": "Divide by {k}."}


def _apply(op: str, value: int, k: int) -> int | None:
    if op == "/":  # exact division only, by at least 2
        return value // k if k > 1 and value % k == 0 else None
    return {"+": value + k, "-": value - k, "*": value * k}[op]


def _step(rng: random.Random, value: int, cfg: ArithmeticPrompts) -> tuple[str, int, int]:
    """One operation drawn among those that keep the value an integer within ±max_value."""
    moves = [(op, k, new) for op in cfg.ops for k in range(1, cfg.max_operand + 1)
             if (new := _apply(op, value, k)) is not None and abs(new) <= cfg.max_value]
    if not moves:
        raise PromptSetError(f"arithmetic: no operation among {cfg.ops} keeps {value} within max_value "
                             f"{cfg.max_value}; allow more operations or raise max_value")
    return rng.choice(moves)


def arithmetic(cfg: ArithmeticPrompts) -> list[dict]:
    """`count` problems of `steps` operations each (or a number drawn in [min_steps, steps]), deterministic by seed;
    the answer is the exact result, `solution` the worked steps (`7 + 5 = 12`, one a line) and `\\boxed{answer}`."""
    rng = random.Random(cfg.seed)
    records = []
    for _ in range(cfg.count):
        steps = cfg.steps if cfg.min_steps is None else rng.randint(cfg.min_steps, cfg.steps)
        value = rng.randint(1, cfg.max_operand)
        words, lines = [f"Start with {value}."], []
        for _ in range(steps):
            op, k, new = _step(rng, value, cfg)
            words.append(_WORDS[op].format(k=k))
            lines.append(f"{value} {op} {k} = {new}")
            value = new
        problem = " ".join(words) + " What is the result?"
        records.append({"prompt": f"{problem} {cfg.instruction}".strip(), "answer": str(value),
                        "problem": problem, "steps": steps, "solution": "\n".join(lines + [f"\\boxed{{{value}}}"])})
    return records


class ArithmeticSource:
    """Data source `arithmetic`: each problem as a training document, `template` (the prompt as the grpo trainer
    shows it) followed by the solution, for the supervised stage before RL."""

    def __init__(self, cfg):
        self.cfg = cfg

    def fingerprint(self):
        return {"config": self.cfg.model_dump(mode="json")}  # generated: the settings are the whole content

    def __iter__(self):
        from hyloom.data import document

        for i, record in enumerate(arithmetic(self.cfg)):
            answer = record["solution"] if self.cfg.solution == "worked" else f"\\boxed{{{record['answer']}}}"
            yield document(self.cfg.template.format(prompt=record["prompt"]) + answer, f"arithmetic-{i}",
                           "arithmetic", steps=record["steps"])
