"""The built-in verifiers: `(record, completion) -> Reward`. Torch-free.

Each verifier sees the whole prompt record (every field of its JSONL row)."""

from __future__ import annotations

import json
import re
from fractions import Fraction

from hyloom.plugins.rl.config import ExactConfig, MathConfig, PythonTestsConfig, RegexConfig, Reward
from hyloom.plugins.rl.sandbox import Limits, containment, run_python


def build_verifier(spec):
    """A verifier from a config mapping (or a config model) with a `type`, looked up in the registry, so an
    unknown name fails like every other kind."""
    from hyloom.registry import registry

    name = spec.type if hasattr(spec, "type") else spec.get("type") if isinstance(spec, dict) else None
    if not isinstance(name, str):
        raise ValueError(f"a verifier config needs a `type`, got {spec!r}")
    reg = registry().get("verifier", name)
    cfg = spec if not isinstance(spec, dict) else reg.config.model_validate(spec)
    return reg.build(cfg)


def _field(record: dict, key: str):
    if key not in record:
        raise KeyError(f"the prompt record has no field {key!r} (fields: {', '.join(record) or 'none'})")
    return record[key]


# ---- math -----------------------------------------------------------------------------------------------

def _boxed(text: str) -> tuple[int, str] | None:
    """Position and content of the last \\boxed{...} (braces nested), or None."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return start, text[i:j]
    return None  # unclosed: no answer


def final_answer(text: str) -> str | None:
    """The completion's final answer: the last `\\boxed{...}` or `#### ...` line, whichever comes later."""
    found = []
    boxed = _boxed(text)
    if boxed:
        found.append(boxed)
    hashes = list(re.finditer(r"####\s*([^\n]*)", text))
    if hashes:
        found.append((hashes[-1].start(), hashes[-1].group(1)))
    return max(found)[1].strip() if found else None


_FRAC = re.compile(r"\\[dt]?frac\s*(?:\{([^{}]*)\}|(\d))\s*(?:\{([^{}]*)\}|(\d))")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d*)?$")


def _clean(text: str) -> str:
    text = text.strip().replace("−", "-").replace("{,}", ",")
    text = re.sub(r"\\text\{([^{}]*)\}|\\mathrm\{([^{}]*)\}", lambda m: m.group(1) or m.group(2) or "", text)
    for junk in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\ ", "$", "\\%", "%"):
        text = text.replace(junk, "")
    text = text.strip().rstrip(".").strip()
    return re.sub(r"^[A-Za-z]\s*=\s*", "", text)  # `x = 5` answers 5


def parse_number(text: str) -> Fraction | None:
    """An exact number from an answer (`-1,234.5`, `3/4`, `\\frac{3}{4}`, `-\\dfrac34`, `.5`, `1e3`), or None."""
    text = _clean(text).replace(" ", "")
    text = _FRAC.sub(lambda m: f"({m.group(1) or m.group(2)})/({m.group(3) or m.group(4)})", text)
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    m = re.fullmatch(r"([+-]?)\(?([^()/]+)\)?(?:/\(?([^()/]+)\)?)?", text)
    if not m:
        return None
    try:
        value = Fraction(m.group(2)) / (Fraction(m.group(3)) if m.group(3) else 1)
    except (ValueError, ZeroDivisionError):
        return None
    return -value if m.group(1) == "-" else value


def answers_match(given: str, reference: str, tolerance: float = 1e-6) -> bool:
    a, b = parse_number(given), parse_number(reference)
    if a is not None and b is not None:
        return a == b or abs(a - b) <= tolerance * max(1, abs(b))
    return _clean(given).replace(" ", "") == _clean(reference).replace(" ", "")


class MathVerifier:
    def __init__(self, cfg: MathConfig):
        self.cfg = cfg

    def __call__(self, record: dict, completion: str) -> Reward:
        reference = str(_field(record, self.cfg.answer_field))
        given = final_answer(completion)
        ok = given is not None and answers_match(given, reference, self.cfg.tolerance)
        return Reward(self.cfg.correct if ok else self.cfg.wrong, {"extracted": given, "reference": reference})


# ---- exact and regex --------------------------------------------------------------------------------------

class ExactVerifier:
    def __init__(self, cfg: ExactConfig):
        self.cfg = cfg

    def _norm(self, text: str) -> str:
        if self.cfg.collapse_whitespace:
            text = " ".join(text.split())
        return text.casefold() if self.cfg.ignore_case else text

    def __call__(self, record: dict, completion: str) -> Reward:
        ok = self._norm(completion) == self._norm(str(_field(record, self.cfg.answer_field)))
        return Reward(self.cfg.correct if ok else self.cfg.wrong, {})


class RegexVerifier:
    def __init__(self, cfg: RegexConfig):
        self.cfg = cfg
        self.flags = (re.IGNORECASE if cfg.ignore_case else 0) | (re.DOTALL if cfg.dotall else 0)
        self.fixed = re.compile(cfg.pattern, self.flags) if cfg.pattern is not None else None

    def __call__(self, record: dict, completion: str) -> Reward:
        pattern = self.fixed
        if pattern is None:
            source = str(_field(record, self.cfg.pattern_field))
            try:
                pattern = re.compile(source, self.flags)
            except re.error as exc:
                raise ValueError(f"the record's {self.cfg.pattern_field!r} is not a valid pattern: {exc}") from None
        text = completion if self.cfg.target_field is None else str(_field(record, self.cfg.target_field))
        ok = (pattern.fullmatch if self.cfg.mode == "fullmatch" else pattern.search)(text) is not None
        return Reward(self.cfg.correct if ok else self.cfg.wrong, {})


# ---- python_tests -----------------------------------------------------------------------------------------

_FENCE = re.compile(r"```(?:python|py)?[^\n]*\n(.*?)```", re.DOTALL)

# Runs in the sandbox. The code and tests arrive as literals and the marker as a random token, all on stdin, so a
# completion that exits early (os._exit(0)) or prints "passed" does not count as passing; one written to inspect
# its caller's frames could still find the marker (docs/rl.md says so).
HARNESS = """
import json, sys, traceback
def _run(code, tests, marker):
    ns = {"__name__": "__main__"}
    try:
        exec(compile(code, "<completion>", "exec"), ns)
    except BaseException:
        traceback.print_exc()
        return
    passed = 0
    for i, test in enumerate(tests):
        try:
            exec(compile(test, f"<test {i}>", "exec"), ns)
            passed += 1
        except BaseException:
            traceback.print_exc()
    sys.stdout.flush()
    print("\\n" + json.dumps({"marker": marker, "passed": passed}), flush=True)
_run(%r, %r, %r)
"""


def extract_code(completion: str) -> str:
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


class PythonTestsVerifier:
    blocking = True  # waits on a sandbox process: the trainer scores completions on reward_workers threads
    def __init__(self, cfg: PythonTestsConfig):
        self.cfg = cfg
        self.limits = Limits(wall_s=cfg.timeout_s, cpu_s=cfg.cpu_s, memory_mb=cfg.memory_mb,
                             max_processes=cfg.max_processes, file_mb=cfg.file_mb)

    def __call__(self, record: dict, completion: str) -> Reward:
        import secrets

        tests = _field(record, self.cfg.tests_field)
        tests = [tests] if isinstance(tests, str) else tests
        if not (isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests)):
            raise ValueError(f"the record's {self.cfg.tests_field!r} must be a string or a non-empty list of "
                             f"strings of Python, got {tests!r:.200}")
        code = extract_code(completion) if self.cfg.extract_code else completion
        marker = secrets.token_hex(16)
        result = run_python(HARNESS % (code, tests, marker), self.limits)
        passed = 0
        last = result.stdout.rstrip().rsplit("\n", 1)[-1]
        try:
            report = json.loads(last)
            if isinstance(report, dict) and report.get("marker") == marker:
                passed = int(report["passed"])
        except (ValueError, KeyError, TypeError):
            pass
        info = {"passed": passed, "tests": len(tests), "returncode": result.returncode,
                "timed_out": result.timed_out, "seconds": round(result.seconds, 3),
                "stderr": result.stderr[-2000:], "network_contained": containment()["network"]}
        ok = passed == len(tests) and result.returncode == 0
        return Reward(self.cfg.correct if ok else self.cfg.wrong, info)
