"""The verifiers on tricky answers, the registry path, and the prompt sets (loader errors, the generator)."""

import json

import pytest

from hyloom.plugins.rl.prompts import PromptSetError, load_jsonl, load_prompt_set
from hyloom.plugins.rl.verifiers import build_verifier, final_answer, parse_number
from hyloom.registry import UnknownComponentError


@pytest.mark.parametrize("text, answer", [
    ("so \\boxed{\\frac{3}{4}}", "3/4"), ("\\boxed{\\dfrac34}", "0.75"), ("#### 1,234", "1234"),
    ("\\boxed{-\\frac{1}{2}}", "-0.5"), ("\\boxed{$1{,}000$}", "1000"), ("\\boxed{+7.}", "7"),
    ("first \\boxed{1} then \\boxed{\\frac{2}{3}}", "2/3"), ("\\boxed{\\text{x}+1}", "x + 1"),
    ("\\boxed{−3}", "-3"), ("\\boxed{x = \\frac{1}{4}}", "0.25"), ("\\boxed{.5}", "1/2"), ("#### 12 \n", "12.0"),
])
def test_math_accepts_equivalent_answers(text, answer):
    assert build_verifier({"type": "math"})({"answer": answer}, text).reward == 1.0


@pytest.mark.parametrize("text, answer", [
    ("\\boxed{3/5}", "3/4"), ("no final answer: 12", "12"), ("\\boxed{12", "12"), ("\\boxed{1,23}", "123"),
    ("\\boxed{\\frac{1}{0}}", "1"), ("\\boxed{x+2}", "x+1"), ("#### 7\nlater \\boxed{8}", "7"),
])
def test_math_rejects_wrong_or_missing_answers(text, answer):
    assert build_verifier({"type": "math", "wrong": -0.5})({"answer": answer}, text).reward == -0.5


def test_math_reads_the_last_answer_and_nested_braces():
    assert final_answer("\\boxed{1} ... \\boxed{\\frac{1}{\\sqrt{2}}}") == "\\frac{1}{\\sqrt{2}}"
    assert final_answer("\\boxed{5}\n#### 6") == "6"
    assert parse_number("-1,234.5") == parse_number("-2469/2")


def test_exact_options():
    record = {"answer": "Paris  France"}
    assert build_verifier({"type": "exact"})(record, " paris france\n").reward == 1.0
    assert build_verifier({"type": "exact", "ignore_case": False})(record, "paris France").reward == -1.0
    assert build_verifier({"type": "exact", "collapse_whitespace": False})(record, "Paris France").reward == -1.0


def test_regex_on_completion_or_field_with_a_per_record_pattern():
    fmt = build_verifier({"type": "regex", "pattern": r"<think>.*</think>", "correct": 0.2, "wrong": 0.0})
    assert fmt({}, "<think>a\nb</think> 4").reward == 0.2
    assert fmt({}, "4").reward == 0.0
    full = build_verifier({"type": "regex", "pattern": r"\d+", "mode": "fullmatch"})
    assert full({}, "42").reward == 1.0 and full({}, "42 apples").reward == -1.0
    per_record = build_verifier({"type": "regex", "pattern_field": "want", "target_field": "echo"})
    assert per_record({"want": "^ab", "echo": "abc"}, "").reward == 1.0
    assert per_record({"want": "^ab", "echo": "cab"}, "abc").reward == -1.0


def test_bad_verifier_configs_are_refused():
    with pytest.raises(UnknownComponentError, match="'maths' is not a registered verifier; did you mean 'math'"):
        build_verifier({"type": "maths"})
    with pytest.raises(ValueError, match="not a valid regular expression"):
        build_verifier({"type": "regex", "pattern": "("})
    with pytest.raises(ValueError, match="exactly one of pattern and pattern_field"):
        build_verifier({"type": "regex"})
    with pytest.raises(KeyError, match="no field 'solution'"):
        build_verifier({"type": "math", "answer_field": "solution"})({"answer": "1"}, "\\boxed{1}")


def test_jsonl_loader_names_file_and_line(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"prompt": "1+1?", "answer": 2, "level": 1}) + "\n\n"
                    + json.dumps({"prompt": "f", "tests": ["assert f()"]}) + "\n")
    assert load_prompt_set({"type": "jsonl", "path": str(good)})[0] == {"prompt": "1+1?", "answer": 2, "level": 1}
    assert len(load_jsonl(good, limit=1)) == 1
    for text, message in [('{"prompt": "x"}\n', "2: the record needs 'answer' or 'tests'"),
                          ('{"answer": 1}\n', "2: the record has no string field 'prompt'"),
                          ("{oops\n", "2: not valid JSON"), ("[1]\n", "2: each line must be a JSON object")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "a", "answer": 1}\n' + text)
        with pytest.raises(PromptSetError, match=f"bad.jsonl:{message}"):
            load_jsonl(bad)
    with pytest.raises(PromptSetError, match="missing.jsonl: cannot read"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_arithmetic_is_deterministic_checked_by_math_and_harder_with_steps():
    spec = {"type": "arithmetic", "count": 50, "steps": 4, "seed": 3}
    records = load_prompt_set(spec)
    assert records == load_prompt_set(spec) and records != load_prompt_set({**spec, "seed": 4})
    math = build_verifier({"type": "math"})
    for r in records:
        value = None  # replay the words to check the answer
        for sentence in r["problem"].removesuffix(" What is the result?").split(". "):
            word, k = sentence.rstrip("."), int(sentence.rstrip(".").split()[-1])
            assert not word.startswith("Divide") or (k > 1 and value % k == 0)  # exact division only
            value = k if word.startswith("Start") else {"Add": value + k, "Subtract": value - k,
                                                      "Multiply": value * k, "Divide": value // k}[word.split()[0]]
        assert str(value) == r["answer"] and abs(value) <= 10_000
        assert math(r, f"... \\boxed{{{value}}}").reward == 1.0 and r["prompt"].endswith("\\boxed{}.")
    assert load_prompt_set({**spec, "steps": 7})[0]["problem"].count(".") == 8
    with pytest.raises(PromptSetError, match="no operation among"):
        load_prompt_set({"type": "arithmetic", "ops": ["-"], "steps": 60, "max_operand": 20, "max_value": 10})
