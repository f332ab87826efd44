"""passkey / niah: example formats, scoring against hand-built retrieval models, training sources, refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import ValidationError

from hyloom.data import DataError
from hyloom.eval import EvalContext
from hyloom.plugins.eval import retrieval as R
from hyloom.registry import registry

EOS = 0


class CharTokenizer:
    """One token per ASCII character: token boundaries are character boundaries, so formats can be checked exactly."""

    eos_id, vocab_size = EOS, 128

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


TOK = CharTokenizer()
# Held-out filler: random lowercase words, documents joined by EOS (which the tasks must drop).
_words = np.random.default_rng(1).integers(ord("a"), ord("z") + 1, 30_000)
_words[::6] = ord(" ")
HELDOUT = np.concatenate([np.append(chunk, EOS) for chunk in np.array_split(_words, 30)])


class FakeModel:
    """A causal 'model' whose greedy answer is `respond(prompt text)`; it records what it was asked."""

    def __init__(self, respond, causal=True):
        self.spec = SimpleNamespace(causal=causal)
        self.respond, self.prompts, self.calls = respond, [], []

    def generate(self, prompts, *, max_new_tokens, temperature, stop_tokens=(), stop_strings=(), decode=None):
        assert temperature == 0
        self.calls.append(len(prompts))
        self.prompts += prompts
        return [TOK.encode(self.respond(TOK.decode(p)))[:max_new_tokens] for p in prompts]


def retrieve_or_zero(text: str) -> str:
    try:
        return retrieve(text)
    except (IndexError, AttributeError):  # no needle, or no question, in what the model reads
        return " 0.\n"


def retrieve(text: str) -> str:
    """A hand-built retrieval model: reads the question on the last line and copies the asked values out of the
    needles in its own prompt."""
    question = text.rsplit("\n", 1)[-1]
    if question.startswith("What is the pass key?"):
        return " " + re.findall(r"The pass key is (\d+)\. Remember it\.", text)[0] + ".\n"
    keys = re.split(r", | and ", re.search(r"numbers? for (.+?) mentioned in the provided text\?", question).group(1))
    values = [v for k in keys for v in re.findall(rf"magic numbers for {re.escape(k)} is: (\d+)\.", text)]
    return " " + ", ".join(values) + ".\n"


def ctx(model, heldout=HELDOUT, train_len=300, batch_size=4, seed=0):
    return EvalContext(model=model, tokenizer=TOK, device="cpu", heldout_ids=lambda: heldout, train_len=train_len,
                       batch_size=batch_size, seed=seed)


def task(kind, **cfg):
    reg = registry().get("eval_task", kind)
    return reg.build(reg.config.model_validate({"type": kind, **cfg}))


PASSKEY = dict(lengths=[200, 600], depths=[0.0, 0.5, 1.0], cases=3)
NIAH = dict(lengths=[700, 1200], depths=[0.0, 0.5, 1.0], cases=3)


# ---- formats -----------------------------------------------------------------------------------------------

def test_splice_puts_needles_at_their_depths_and_keeps_the_length():
    filler, needles, question = list(range(100, 200)), [[1, 1], [2, 2, 2]], [9, 9]
    out = R.splice(filler, needles, [0.25, 1.0], question)
    assert len(out) == 100 + 2 + 3 + 2
    assert out[25:27] == [1, 1] and out[:25] == filler[:25]
    assert out[102:105] == [2, 2, 2] and out[-2:] == question  # depth 1: right before the question
    assert R.splice(filler, [[1]], [0.0], [])[0] == 1  # depth 0: the first token


def test_passkey_prompts_have_the_exact_length_and_the_needle_at_the_depth():
    model = FakeModel(retrieve)
    result = task("passkey", **PASSKEY).run(ctx(model))
    assert len(model.prompts) == len(result.rows) == 2 * 3 * 3
    by_length = {n: [p for p in model.prompts if len(p) == n] for n in PASSKEY["lengths"]}
    assert all(len(v) == 9 for v in by_length.values())  # every prompt is exactly one of the lengths
    assert model.calls == [4, 4, 1] * 2  # batched by ctx.batch_size, one length at a time
    for prompt, row in zip(model.prompts, result.rows):
        text = TOK.decode(prompt)
        assert EOS not in prompt
        needle = R.needle_text(R.PASSKEY_NEEDLE.format(key=row["key"]))
        question = R.question_text(R.PASSKEY_QUESTION)
        assert text.endswith(question) and text.count(needle) == 1
        n_filler = len(prompt) - len(needle) - len(question)
        assert text.index(needle) == round(row["depth"] * n_filler)
        assert text.replace(needle, "")[:-len(question)] in TOK.decode(HELDOUT[HELDOUT != EOS])  # one filler slice


@pytest.mark.parametrize("variant", ["single", "multikey", "multivalue", "multiquery"])
def test_niah_variants_follow_ruler(variant):
    case = R.niah_case(np.random.default_rng(3), variant, 0.4, needles=4, digits=7)
    needles = [re.fullmatch(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.", s).groups()
               for s in case.needles]
    keys = [k for k, _ in needles]
    assert case.depths == sorted(case.depths) and 0.4 in case.depths
    assert len(needles) == (1 if variant == "single" else 4)
    assert len({v for _, v in needles}) == len(needles)
    if variant in ("single", "multikey"):
        assert len(set(keys)) == len(keys) and len(case.values) == 1  # multikey: 3 distractors with other keys
        assert case.question == R.NIAH_QUESTION.format(key=case.key)
        assert (case.key, case.values[0]) == needles[case.depths.index(0.4)]
    elif variant == "multivalue":
        assert set(keys) == {case.key} and case.values == [v for _, v in needles]  # all 4 values asked
    else:
        assert set(keys) == set(re.split(r", | and ", case.key)) and len(case.values) == 4
    if variant != "single" and variant != "multikey":
        assert case.question == R.NIAH_QUESTION_ALL.format(key=case.key)
    assert case.answer == " " + ", ".join(case.values) + "."


def test_same_seed_same_cases_and_depth_is_the_only_change_within_a_case():
    a = task("niah", **NIAH).run(ctx(FakeModel(retrieve)))
    b = task("niah", **NIAH).run(ctx(FakeModel(retrieve)))
    c = task("niah", **NIAH).run(ctx(FakeModel(retrieve), seed=1))
    assert a.rows == b.rows and [r["expected"] for r in a.rows] != [r["expected"] for r in c.rows]
    one_case = {r["expected"] for r in a.rows if r["variant"] == "multikey" and r["case"] == 0}
    assert len(one_case) == 1


# ---- scoring -----------------------------------------------------------------------------------------------

def test_a_retrieval_model_scores_everything_and_a_guesser_nothing(tmp_path):
    for kind, cfg in [("passkey", PASSKEY), ("niah", NIAH)]:
        good = task(kind, **cfg).run(ctx(FakeModel(retrieve)))
        assert set(good.metrics.values()) == {1.0}, good.metrics
        guess = task(kind, **cfg).run(ctx(FakeModel(lambda text: " 1234567, 7654321.\n")))
        assert set(guess.metrics.values()) == {0.0}
        good.plot(tmp_path / f"{kind}.png")
        assert (tmp_path / f"{kind}.png").stat().st_size > 0
    names = set(good.metrics)
    assert {"niah/acc", "niah/acc@700", "niah_multivalue/acc@1200", "niah_single/acc"} <= names


def test_niah_gives_partial_credit_and_punishes_ignoring_the_key():
    def first_number(text):  # copies the first magic number in the context, whatever its key
        return " " + re.search(r"is: (\d+)\.", text).group(1) + ".\n"

    result = task("niah", **NIAH, needles=4).run(ctx(FakeModel(first_number)))
    assert result.metrics["niah_single/acc"] == 1.0
    assert result.metrics["niah_multivalue/acc"] == 0.25  # one of the four values
    assert result.metrics["niah_multiquery/acc"] == 0.25
    multikey = [r["score"] for r in result.rows if r["variant"] == "multikey"]
    assert 0 < np.mean(multikey) < 1 and all(r["score"] == 1 for r in result.rows
                                             if r["variant"] == "multikey" and r["depth"] == 0.0)


def test_passkey_needs_the_first_digit_run_to_be_the_key():
    case = R.passkey_case(np.random.default_rng(0), 0.5, digits=5)
    assert R.passkey_score(f" {case.key}. What", case) == 1.0
    assert R.passkey_score(f" 1{case.key}.", case) == 0.0
    assert R.passkey_score(f" 11111 then {case.key}", case) == 0.0
    assert R.passkey_score(" no digits", case) == 0.0


def test_a_model_that_sees_only_the_end_finds_only_late_needles():
    """The answer comes from the model: a retriever that reads only its last 150 tokens finds the key at depth 1
    in every length and at depth 0 only where the whole prompt fits in its window."""
    windowed = FakeModel(lambda text: retrieve_or_zero(text[-150:]))
    result = task("passkey", **PASSKEY).run(ctx(windowed))
    cell = {(r["length"], r["depth"]): [] for r in result.rows}
    for r in result.rows:
        cell[r["length"], r["depth"]].append(r["score"])
    assert np.mean(cell[200, 1.0]) == np.mean(cell[600, 1.0]) == 1.0
    assert np.mean(cell[600, 0.0]) == np.mean(cell[600, 0.5]) == 0.0
    assert result.metrics["passkey/acc@600"] == pytest.approx(1 / 3)
    assert [r["extrapolated"] for r in result.rows] == [r["length"] > 300 for r in result.rows]


def test_a_real_tiny_model_runs_through_generate():
    from hyloom.testing import tiny_model

    model = tiny_model({"type": "attention", "heads": 2}, vocab_size=128)
    result = task("passkey", lengths=[100, 140], depths=[0.0, 1.0], cases=2, max_new_tokens=8).run(
        ctx(model, train_len=100))
    assert len(result.rows) == 8 and 0.0 <= result.metrics["passkey/acc"] <= 1.0
    assert all(len(r["answer"]) <= 80 for r in result.rows)


# ---- refusals ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,cfg,heldout,match", [
    ("passkey", dict(lengths=[60]), HELDOUT, r"length 60 is too short: .* take up to \d+ tokens; use lengths of at least"),
    ("niah", dict(lengths=[200], variants=["multiquery"]), HELDOUT, "length 200 is too short"),
    ("passkey", dict(lengths=[200, 5000]), HELDOUT[:3000],
     rf"held-out split has {np.sum(HELDOUT[:3000] != EOS)} filler tokens, fewer than the longest length 5000; use shorter lengths"),
    ("passkey", dict(lengths=[200], digits=12, max_new_tokens=8), HELDOUT,
     r"max_new_tokens 8 cannot hold the answers \(up to 14 tokens\)"),
])
def test_refuses_what_it_cannot_measure(kind, cfg, heldout, match):
    model = FakeModel(retrieve)
    with pytest.raises(ValueError, match=match):
        task(kind, **cfg).run(ctx(model, heldout=heldout))
    assert model.prompts == []  # refused before any compute


def test_held_out_retrieval_documents_are_left_out_of_the_filler():
    """A mix may hold synthetic examples out too: their needles would be wrong answers planted in the filler."""
    planted = TOK.encode(" " + R.needle_text(R.PASSKEY_NEEDLE.format(key="99999")) + " ")
    heldout = np.concatenate([np.array(planted + [EOS]), HELDOUT, np.array(planted + [EOS])])
    model = FakeModel(retrieve)
    assert task("passkey", **PASSKEY).run(ctx(model, heldout=heldout)).metrics["passkey/acc"] == 1.0
    assert not any("99999" in TOK.decode(p) for p in model.prompts)
    with pytest.raises(ValueError, match=r"has 0 filler tokens \(1 held-out documents with needles of their own"):
        task("passkey", **PASSKEY).run(ctx(model, heldout=np.array(planted)))


def test_refuses_a_bidirectional_model():
    with pytest.raises(ValueError, match="passkey: the model is bidirectional"):
        task("passkey", **PASSKEY).run(ctx(FakeModel(retrieve, causal=False)))


@pytest.mark.parametrize("kind,cfg,match", [
    ("passkey", {"depths": [0.5, 1.5]}, r"in \[0, 1\]; got 1.5"),
    ("passkey", {"lengths": []}, "at least 1 item"),
    ("passkey", {"lengths": [512, 512]}, "lengths lists a value twice"),
    ("niah", {"variants": ["single", "double"]}, "single', 'multikey'"),
    ("niah", {"needles": 1}, "greater than or equal to 2"),
])
def test_task_configs_refuse_bad_values(kind, cfg, match):
    with pytest.raises(ValidationError, match=match):
        registry().get("eval_task", kind).config.model_validate({"type": kind, **cfg})


# ---- training sources --------------------------------------------------------------------------------------

def source(kind, **cfg):
    reg = registry().get("data_source", kind)
    return reg.build(reg.config.model_validate({"type": kind, **cfg}))


@pytest.fixture
def filler_dir(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta gamma delta " * 200)
    (tmp_path / "b.txt").write_text("one two three four five " * 200)
    return str(tmp_path)


def test_training_documents_hold_a_full_example_in_the_eval_format(filler_dir):
    docs = list(source("passkey", documents=20, min_chars=300, max_chars=600,
                       filler={"type": "text", "path": filler_dir}))
    assert len(docs) == 20 and len({d["text"] for d in docs}) == 20
    for doc in docs:
        text, key = doc["text"], doc["meta"]["key"]
        assert 300 <= len(text) <= 600 and doc["meta"]["source"] == "passkey"
        assert text.endswith(R.question_text(R.PASSKEY_QUESTION) + f" {key}.")
        assert text.count(R.needle_text(R.PASSKEY_NEEDLE.format(key=key))) == 1
        prompt = text[:-len(f" {key}.")]
        assert retrieve(prompt) == f" {key}.\n"  # the eval's reading of the prompt gives the document's answer
        assert re.fullmatch(r"[a-z \n]+", text.replace(R.needle_text(R.PASSKEY_NEEDLE.format(key=key)), "")
                            .replace(R.question_text(R.PASSKEY_QUESTION) + f" {key}.", ""))
    niah = list(source("niah", documents=40, filler=None, min_chars=800, max_chars=900))
    assert {d["meta"]["variant"] for d in niah} == {"single", "multikey", "multivalue", "multiquery"}
    for doc in niah:
        prompt, answer = re.fullmatch(r"(.*provided text (?:is|are))( [\d, ]+\.)", doc["text"], re.S).groups()
        assert retrieve(prompt) == answer + "\n"
        assert R.BUILTIN_FILLER[:40] in prompt


def test_sources_are_deterministic_by_seed_and_fingerprinted(filler_dir):
    cfg = dict(documents=10, filler={"type": "text", "path": filler_dir})
    a, b = source("niah", **cfg), source("niah", **cfg)
    assert list(a) == list(b) and a.fingerprint() == b.fingerprint()
    json.dumps(a.fingerprint())  # goes into the cache key
    other = source("niah", **cfg, seed=1)
    assert list(other) != list(a) and other.fingerprint() != a.fingerprint()
    before = a.fingerprint()
    (Path(filler_dir) / "a.txt").write_text("changed text " * 300)
    assert source("niah", **cfg).fingerprint() != before  # the filler's files are part of it


def test_the_default_filler_is_the_stdlib_source():
    reg = registry().get("data_source", "passkey")
    cfg = reg.config.model_validate({"type": "passkey"})
    assert cfg.filler["type"] == "stdlib" and "max_bytes" in cfg.filler  # normalised: defaults filled in
    doc = next(iter(source("passkey", documents=1, filler={"type": "stdlib", "max_bytes": 20_000})))
    assert "The pass key is" in doc["text"]


@pytest.mark.parametrize("cfg,match", [
    ({"filler": {"type": "stdlb"}}, "filler: 'stdlb' is not a registered data_source; did you mean 'stdlib'"),
    ({"filler": {"type": "stdlib", "max_byte": 5}}, "filler.max_byte: Extra inputs are not permitted"),
    ({"min_chars": 900, "max_chars": 800}, r"min_chars \(900\) is above max_chars \(800\)"),
])
def test_source_configs_refuse_bad_values(cfg, match):
    with pytest.raises(ValidationError, match=match):
        registry().get("data_source", "passkey").config.model_validate({"type": "passkey", **cfg})


def test_source_refuses_documents_too_short_for_the_example_and_an_empty_filler(tmp_path):
    with pytest.raises(ValueError, match=r"min_chars 300 leaves too little room .* use min_chars >= \d+"):
        source("niah", min_chars=300, filler=None)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="data source passkey: the filler source yields no documents"):
        list(source("passkey", documents=1, filler={"type": "jsonl", "path": str(tmp_path / "empty.jsonl")}))


# ---- score: answer_logprob (teacher forcing, no generation) ------------------------------------------------

class ForcedModel:
    """A causal 'model' called as model(ids_BT) -> logits [B, T, V]. `oracle`: at the positions after the answer
    prefix ("... is" ending the last line) it puts all its mass on the next character of the retrieved answer;
    elsewhere, and for `oracle=False` everywhere, its logits are all equal (uniform)."""

    def __init__(self, oracle):
        import torch

        self.torch, self.oracle, self.calls = torch, oracle, []
        self.spec = SimpleNamespace(causal=True, vocab_size=TOK.vocab_size)

    def generate(self, *args, **kwargs):
        raise AssertionError("answer_logprob must not generate")

    def __call__(self, ids_BT):
        self.calls.append(tuple(ids_BT.shape))
        logits_BTV = self.torch.zeros(*ids_BT.shape, TOK.vocab_size)
        for b, row in enumerate(ids_BT.tolist()):
            text = TOK.decode(row)
            start = text.rfind(" is", text.rfind("\n") + 1) + 3  # where the answer begins
            if not self.oracle or start < 3:
                continue
            answer = retrieve(text[:start])
            for t in range(start - 1, len(row)):
                if t + 1 - start < len(answer):
                    logits_BTV[b, t, ord(answer[t + 1 - start])] = 100.0
        return logits_BTV


@pytest.mark.parametrize("kind,grid", [("passkey", PASSKEY), ("niah", dict(NIAH, variants=["single", "multikey"]))])
def test_answer_logprob_is_zero_for_a_model_sure_of_the_answer_and_log_1_over_v_for_a_uniform_one(kind, grid):
    sure = task(kind, **grid, score="answer_logprob").run(ctx(ForcedModel(oracle=True)))
    assert next(iter(sure.metrics)) == f"{kind}/answer_logprob"  # the headline: what HALO takes by default
    assert sure.metrics[f"{kind}/answer_logprob"] == pytest.approx(0.0, abs=1e-6)
    assert sure.metrics[f"{kind}/answer_token_acc"] == 1.0
    assert all(r["answer_tokens"] == len(r["expected"].replace(" ", ", ")) + 1 for r in sure.rows)  # " " + values
    uniform = task(kind, **grid, score="answer_logprob").run(ctx(ForcedModel(oracle=False)))
    assert uniform.metrics[f"{kind}/answer_logprob"] == pytest.approx(np.log(1 / TOK.vocab_size))
    assert uniform.metrics[f"{kind}/answer_token_acc"] == 0.0  # all tied: the argmax is id 0, never an answer
    assert f"{kind}/acc" not in uniform.metrics


def test_answer_logprob_runs_one_forward_per_batch_and_its_cases_pair_up():
    model = ForcedModel(oracle=True)
    passkey = task("passkey", **PASSKEY, score="answer_logprob")
    result = passkey.run(ctx(model))
    assert [shape[0] for shape in model.calls] == [4, 4, 1] * 2  # ctx.batch_size rows a forward, per length
    # prompt + the answer (" " and 5 digits) but its last token: the rows of one forward share their width
    assert {shape[1] for shape in model.calls} == {200 + 5, 600 + 5}
    cases = passkey.metric_cases(result.rows)
    assert cases.keys() == result.metrics.keys()
    assert all(np.mean(v) == pytest.approx(result.metrics[k]) for k, v in cases.items())
    assert len(cases["passkey/answer_logprob"]) == 18 and len(cases["passkey/answer_logprob@200"]) == 9
    exact = task("passkey", **PASSKEY).run(ctx(FakeModel(retrieve)))
    assert [(r["length"], r["depth"], r["case"], r["key"]) for r in exact.rows] == \
        [(r["length"], r["depth"], r["case"], r["key"]) for r in result.rows]  # the same cases in the same order


def test_a_model_that_half_knows_the_answer_scores_in_between():
    class Half(ForcedModel):
        def __call__(self, ids_BT):  # the oracle's logits halved: mass spread, the argmax still right
            return super().__call__(ids_BT) * 0.05

    result = task("passkey", **PASSKEY, score="answer_logprob").run(ctx(Half(oracle=True)))
    expected = 5.0 - np.log(np.exp(5.0) + TOK.vocab_size - 1)  # log-softmax of 5 against 127 zeros
    assert result.metrics["passkey/answer_logprob"] == pytest.approx(expected)
    assert result.metrics["passkey/answer_token_acc"] == 1.0
