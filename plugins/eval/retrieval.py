"""Passkey and RULER-style needle-in-a-haystack: one set of example generators behind both the `passkey`/`niah`
eval tasks (token ids: held-out filler, needles spliced in at a depth) and the `passkey`/`niah` training sources
(characters: filler text from another source, the same needles, question and answer), so that what a model is
trained on is exactly the format it is asked in.

Keys of the NIAH needles are "adjective-noun" words from the fixed lists below; values (and pass keys) are random
numbers of a fixed digit count with a non-zero first digit. No instruction preamble precedes the filler: these
probe base models, which answer by continuing the answer prefix.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np

from hyloom.data import DataError, document, texts_hash

PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_QUESTION = ("What is the special magic number for {key} mentioned in the provided text? "
                 "The special magic number for {key} mentioned in the provided text is")
NIAH_QUESTION_ALL = ("What are all the special magic numbers for {key} mentioned in the provided text? "
                     "The special magic numbers for {key} mentioned in the provided text are")

ADJECTIVES = ("amber", "brave", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
              "lucky", "merry", "noble", "odd", "proud", "quiet", "rapid", "silent", "tidy", "upper", "vivid",
              "wild", "young", "zesty", "bold", "crisp", "dark", "early", "fresh", "grand", "humble")
NOUNS = ("anchor", "badger", "candle", "dragon", "engine", "falcon", "garden", "harbor", "island", "jacket",
         "kettle", "ladder", "meadow", "needle", "orchid", "pepper", "quartz", "rabbit", "saddle", "temple",
         "umbrella", "violin", "walnut", "yarrow", "zipper", "basket", "castle", "desert", "feather", "glacier",
         "hammer", "lantern")
# The classic passkey haystack, for a source with `filler: null`.
BUILTIN_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "

# Bump when a template or the way documents are laid out changes, so prepared training data is rebuilt.
FORMAT = 1
ANSWER_STOP = "\n"  # an answer is one line: generation stops at the first newline
NEEDLE_MARKS = ("The pass key is", "special magic number")  # text that only a retrieval example holds


@dataclass
class Case:
    """One example, without its filler."""

    needles: list[str]  # needle sentences, in the order they appear in the context
    depths: list[float]  # where each needle starts, as a fraction of the filler (non-decreasing)
    question: str  # the question and the answer prefix: a prompt ends with it
    answer: str  # what a correct model continues with (a training document ends with it)
    values: list[str]  # what the answer must contain (passkey: the key)
    key: str  # the asked key(s), for the rows
    depth: float  # the grid depth: where the needle holding the first asked value starts
    variant: str = "passkey"


# ---- cases -------------------------------------------------------------------------------------------------

def _number(rng: np.random.Generator, digits: int) -> str:
    return str(int(rng.integers(1, 10))) + "".join(str(int(d)) for d in rng.integers(0, 10, digits - 1))


def _numbers(rng, n: int, digits: int) -> list[str]:
    """n distinct numbers (a repeated value would make a multi-value answer ambiguous)."""
    out: list[str] = []
    while len(out) < n:
        value = _number(rng, digits)
        if value not in out:
            out.append(value)
    return out


def _words(rng, n: int) -> list[str]:
    """n distinct adjective-noun keys."""
    picks = rng.choice(len(ADJECTIVES) * len(NOUNS), size=n, replace=False)
    return [f"{ADJECTIVES[p // len(NOUNS)]}-{NOUNS[p % len(NOUNS)]}" for p in picks]


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def passkey_case(rng: np.random.Generator, depth: float, digits: int = 5) -> Case:
    key = _number(rng, digits)
    return Case([PASSKEY_NEEDLE.format(key=key)], [depth], PASSKEY_QUESTION, f" {key}.", [key], key, depth)


def niah_case(rng: np.random.Generator, variant: str, depth: float, needles: int = 4, digits: int = 7) -> Case:
    """RULER's variants. The needle holding the first asked value starts at `depth`; the other needles (distractors,
    further values, further asked keys) at random depths. Random draws do not depend on `depth`, so the cells of one
    case index share keys, values and the other needles' places, and differ only in the depth."""
    n = 1 if variant == "single" else needles
    values = _numbers(rng, n, digits)
    others = rng.random(n - 1).tolist()
    if variant in ("single", "multikey"):
        keys = _words(rng, n)  # keys[0] is asked; the rest are distractors with their own values
        asked, answer_values, question = keys[:1], values[:1], NIAH_QUESTION
    elif variant == "multivalue":
        keys = _words(rng, 1) * n
        asked, answer_values, question = keys[:1], values, NIAH_QUESTION_ALL
    elif variant == "multiquery":
        keys = _words(rng, n)
        asked, answer_values, question = keys, values, NIAH_QUESTION_ALL
    else:
        raise ValueError(f"unknown niah variant {variant!r} (known: single, multikey, multivalue, multiquery)")
    placed = sorted(zip([depth] + others, keys, values), key=lambda p: p[0])
    if variant == "multivalue":  # asked in the order the values appear in the context
        answer_values = [v for _, _, v in placed]
    return Case([NIAH_NEEDLE.format(key=k, value=v) for _, k, v in placed], [d for d, _, _ in placed],
                question.format(key=_and(asked)), " " + ", ".join(answer_values) + ".", answer_values, _and(asked),
                depth, variant)


# ---- laying a case out: token ids (eval) and text (training) ------------------------------------------------

def needle_text(sentence: str) -> str:
    return f"\n{sentence}\n"  # a needle stands on its own line, wherever in the filler it lands


def question_text(question: str) -> str:
    return f"\n{question}"


def encode_case(case: Case, tokenizer) -> tuple[list[list[int]], list[int]]:
    """The needles' and the question's token ids."""
    return [tokenizer.encode(needle_text(s)) for s in case.needles], tokenizer.encode(question_text(case.question))


def fixed_tokens(needles: list[list[int]], question: list[int]) -> int:
    return sum(len(n) for n in needles) + len(question)


def splice(filler, needles: list[list[int]], depths: list[float], question: list[int]) -> list[int]:
    """filler[:cut_1] + needle_1 + filler[cut_1:cut_2] + needle_2 + ... + question, where cut_i is
    round(depth_i * len(filler)): the prompt is len(filler) + the needles + the question tokens long, and needle i
    starts at token cut_i plus the lengths of the needles before it."""
    filler = [int(t) for t in filler]
    out, start = [], 0
    for depth, ids in zip(depths, needles):
        cut = round(depth * len(filler))
        out += filler[start:cut] + list(ids)
        start = cut
    return out + filler[start:] + list(question)


def fixed_chars(case: Case) -> int:
    return sum(len(needle_text(s)) for s in case.needles) + len(question_text(case.question)) + len(case.answer)


def document_text(case: Case, filler: str) -> str:
    """The filler with the needles inserted at their depths (moved forward to the next whitespace, so no word is
    cut), then the question and the answer: len(filler) + fixed_chars(case) characters."""
    out, start = [], 0
    for depth, sentence in zip(case.depths, case.needles):
        space = re.compile(r"\s").search(filler, max(start, round(depth * len(filler))))
        cut = space.start() if space else len(filler)
        out += [filler[start:cut], needle_text(sentence)]
        start = cut
    return "".join(out) + filler[start:] + question_text(case.question) + case.answer


# ---- scoring -----------------------------------------------------------------------------------------------

def passkey_score(answer: str, case: Case) -> float:
    """1 when the first run of digits in the answer is the key, else 0."""
    found = re.search(r"\d+", answer)
    return float(found is not None and found.group() == case.values[0])


def niah_score(answer: str, case: Case) -> float:
    """The share of the asked values that appear in the answer as whole digit runs (order free)."""
    found = set(re.findall(r"\d+", answer))
    return sum(v in found for v in case.values) / len(case.values)


# Floats of logits per teacher-forced forward (1 GiB in fp32): a batch of 16 prompts of 512 tokens and a 16K vocabulary
# (HALO's recall probe in blueprints/experiments/convert-100m.yaml) runs in one forward; long prompts run fewer rows.
FORCED_LOGITS_BUDGET = 1 << 28


def answer_logprobs(model, prompts: list[list[int]], answers: list[list[int]], device, vocab: int):
    """Teacher forcing, no generation: for each prompt, the log-probability of each answer token given the prompt
    and the answer tokens before it, and whether that token is the model's argmax; as ([A], [A]) float arrays.
    One forward per group of rows (prompt + answer[:-1], right-padded: a causal model's earlier positions never
    see the padding); groups are cut so their logits stay within FORCED_LOGITS_BUDGET floats."""
    import torch

    out = []
    width = max(len(p) + len(a) - 1 for p, a in zip(prompts, answers))
    per_forward = max(1, FORCED_LOGITS_BUDGET // (width * vocab))
    for start in range(0, len(prompts), per_forward):
        group = list(zip(prompts[start:start + per_forward], answers[start:start + per_forward]))
        ids_BT = torch.zeros(len(group), max(len(p) + len(a) - 1 for p, a in group), dtype=torch.long)
        for b, (prompt, answer) in enumerate(group):
            ids_BT[b, :len(prompt) + len(answer) - 1] = torch.tensor(prompt + answer[:-1])
        with torch.no_grad():
            logits_BTV = model(ids_BT.to(device))
        for b, (prompt, answer) in enumerate(group):
            at_A = torch.arange(len(prompt) - 1, len(prompt) + len(answer) - 1)  # the positions that predict it
            logits_AV = logits_BTV[b, at_A.to(logits_BTV.device)].float()
            answer_A = torch.tensor(answer, device=logits_AV.device)
            logprob_A = torch.log_softmax(logits_AV, -1).gather(1, answer_A[:, None])[:, 0]
            hit_A = logits_AV.argmax(-1) == answer_A
            out.append((logprob_A.cpu().numpy(), hit_A.cpu().numpy().astype(np.float64)))
    return out


# ---- eval tasks --------------------------------------------------------------------------------------------

def _rng(*parts) -> np.random.Generator:
    return np.random.default_rng([p % 2**63 if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts])


class RetrievalTask:
    """Runs a grid of lengths x depths (x variants) x cases: every prompt of one length is exactly that many tokens
    (held-out filler, needles, question), answered greedily in batches of `ctx.batch_size` (score: exact), or its
    answer teacher-forced after it (score: answer_logprob)."""

    name = ""

    def __init__(self, cfg):
        self.cfg = cfg

    def groups(self) -> list[str]:
        raise NotImplementedError

    def make_case(self, rng, group: str, depth: float) -> Case:
        raise NotImplementedError

    def score(self, answer: str, case: Case) -> float:
        raise NotImplementedError

    def metric_prefix(self, group: str) -> str:
        return self.name

    def run(self, ctx):
        from hyloom.eval import EvalResult

        cfg, tok, name = self.cfg, ctx.tokenizer, self.name
        spec = getattr(ctx.model, "spec", None)
        if spec is not None and not spec.causal:
            raise ValueError(f"{name}: the model is bidirectional (model.causal is false); this task needs greedy "
                             "left-to-right generation, which only a causal model can do")
        filler = self._filler(ctx)
        # Every case is made and checked before any model call, so bad settings are refused before compute.
        made = []  # (group, depth, case index, Case, needle ids, question ids, filler offset as a fraction)
        for group in self.groups():
            for c in range(cfg.cases):
                for depth in cfg.depths:
                    rng = _rng(ctx.seed, name, group, c)  # one case index: same keys at every depth and length
                    case = self.make_case(rng, group, depth)
                    made.append((group, depth, c, case, *encode_case(case, tok), rng.random()))
        answer_tokens = max(len(tok.encode(m[3].answer)) for m in made)
        if cfg.score == "exact" and answer_tokens > cfg.max_new_tokens:
            raise ValueError(f"{name}: max_new_tokens {cfg.max_new_tokens} cannot hold the answers (up to "
                             f"{answer_tokens} tokens); raise max_new_tokens")
        fixed = max(fixed_tokens(needles, question) for *_, needles, question, _ in made)
        if min(cfg.lengths) <= fixed:
            raise ValueError(f"{name}: length {min(cfg.lengths)} is too short: the needles and question take up to "
                             f"{fixed} tokens; use lengths of at least {fixed + 1}")
        cells = []  # (length, group, depth, case index, Case, needle ids, question ids, filler offset, filler size)
        for length in cfg.lengths:
            for group, depth, c, case, needles, question, u in made:
                n_filler = length - fixed_tokens(needles, question)
                cells.append((length, group, depth, c, case, needles, question, int(u * (len(filler) - n_filler + 1)),
                              n_filler))
        rows = []
        for length in cfg.lengths:
            todo = [cell for cell in cells if cell[0] == length]
            batches = range(0, len(todo), ctx.batch_size)
            if ctx.progress:
                from tqdm import tqdm

                batches = tqdm(batches, desc=f"{name} @ {length}", unit="batch", leave=False)
            for start in batches:
                batch = todo[start:start + ctx.batch_size]
                prompts = [splice(filler[off:off + n], needles, case.depths, question)
                           for _, _, _, _, case, needles, question, off, n in batch]
                cases = [cell[4] for cell in batch]
                scored = (self._generated(ctx, prompts, cases) if cfg.score == "exact" else
                          self._forced(ctx, prompts, cases))
                for (_, group, depth, c, case, *_), fields in zip(batch, scored):
                    rows.append({"task": name, "variant": group, "length": length, "depth": depth, "case": c,
                                 "key": case.key, "expected": " ".join(case.values), **fields,
                                 "extrapolated": length > ctx.train_len})
        return EvalResult(self._metrics(rows), rows, lambda path: self._plot(path, rows, ctx.train_len))

    def _generated(self, ctx, prompts, cases) -> list[dict]:
        """score: exact — the greedy answers, scored."""
        tok = ctx.tokenizer
        outs = ctx.model.generate(prompts, max_new_tokens=self.cfg.max_new_tokens, temperature=0,
                                  stop_tokens=[tok.eos_id], stop_strings=[ANSWER_STOP], decode=tok.decode)
        fields = []
        for case, out in zip(cases, outs):
            answer = tok.decode(out).split(ANSWER_STOP)[0]
            score = self.score(answer, case)
            fields.append({"answer": answer[:80], "score": score, "correct": score == 1.0})
        return fields

    def _forced(self, ctx, prompts, cases) -> list[dict]:
        """score: answer_logprob — the answer's tokens (its text without the closing period) teacher-forced after
        each prompt: their mean log-probability and the share that are the model's argmax."""
        answers = [ctx.tokenizer.encode(case.answer.rstrip(".")) for case in cases]
        vocab = getattr(getattr(ctx.model, "spec", None), "vocab_size", ctx.tokenizer.vocab_size)
        fields = []
        for logprob_A, hit_A in answer_logprobs(ctx.model, prompts, answers, ctx.device, vocab):
            fields.append({"answer_tokens": len(logprob_A), "answer_logprob": float(logprob_A.mean()),
                           "answer_token_acc": float(hit_A.mean()), "score": float(logprob_A.mean())})
        return fields

    def _filler(self, ctx) -> np.ndarray:
        """The held-out documents joined without end-of-text tokens (a document boundary mid-prompt would tell the
        model to forget what came before), leaving out any that hold needles of their own (synthetic retrieval
        documents held out by a mix): their keys would be wrong answers planted in the filler."""
        ids = np.asarray(ctx.heldout_ids())
        eos = ctx.tokenizer.eos_id
        docs = [d[d != eos] for d in np.split(ids, np.flatnonzero(ids == eos))]
        kept = [d for d in docs if len(d) and not any(m in ctx.tokenizer.decode(d.tolist()) for m in NEEDLE_MARKS)]
        filler = np.concatenate(kept) if kept else ids[:0]
        longest = max(self.cfg.lengths)
        if len(filler) < longest:
            dropped = len(docs) - len(kept) - sum(not len(d) for d in docs)
            note = f" ({dropped} held-out documents with needles of their own left out)" if dropped else ""
            raise ValueError(
                f"{self.name}: the held-out split has {len(filler)} filler tokens{note}, fewer than the longest "
                f"length {longest}; use shorter lengths, or hold out more text (a larger data.eval_fraction or a "
                f"bigger data.source)")
        return filler

    def _stats(self) -> list[tuple[str, str]]:
        """(metric name, row field) of each statistic: the headline first."""
        if self.cfg.score == "exact":
            return [("acc", "score")]
        return [("answer_logprob", "answer_logprob"), ("answer_token_acc", "answer_token_acc")]

    def metric_cases(self, rows) -> dict[str, list[float]]:
        """Each metric's per-case values, in the task's fixed case order (the same cases for every model, so two
        models' values pair up); a metric is the mean of its list."""
        groups = self.groups()
        selections = [(self.name, None)] + ([] if groups == [self.name] else
                                            [(self.metric_prefix(g), g) for g in groups])
        cases = {}
        for prefix, group in selections:
            mine = [r for r in rows if group is None or r["variant"] == group]
            for stat, field in self._stats():
                cases[f"{prefix}/{stat}"] = [r[field] for r in mine]
                cases.update({f"{prefix}/{stat}@{n}": [r[field] for r in mine if r["length"] == n]
                              for n in self.cfg.lengths})
        return cases

    def _metrics(self, rows) -> dict[str, float]:
        # the headline statistic over every row first: what a caller takes when it names no metric
        names = [f"{self.name}/{stat}" for stat, _ in self._stats()]
        cases = self.metric_cases(rows)
        return {k: float(np.mean(cases[k])) for k in names + [k for k in cases if k not in names]}

    def _plot(self, path, rows, train_len: int) -> None:
        from hyloom.plot import heatmap

        lengths, depths = self.cfg.lengths, self.cfg.depths
        field, what = ("score", "accuracy") if self.cfg.score == "exact" else ("answer_token_acc",
                                                                               "answer token accuracy")
        grid = [[float(np.mean([r[field] for r in rows if r["length"] == n and r["depth"] == d])) for n in lengths]
                for d in depths]
        over = "" if self.groups() == [self.name] else f", mean over {', '.join(self.groups())}"
        heatmap(path, grid, xlabel="context length (tokens; * = beyond the training length)", ylabel="needle depth",
                title=f"{self.name} {what} (trained at {train_len}{over})", colorbar=what,
                xticklabels=[f"{n}*" if n > train_len else str(n) for n in lengths],
                yticklabels=[f"{d:.0%}" for d in depths], vmin=0.0, vmax=1.0)


class PasskeyTask(RetrievalTask):
    name = "passkey"

    def groups(self):
        return ["passkey"]

    def make_case(self, rng, group, depth):
        return passkey_case(rng, depth, self.cfg.digits)

    def score(self, answer, case):
        return passkey_score(answer, case)


class NiahTask(RetrievalTask):
    name = "niah"

    def groups(self):
        return list(self.cfg.variants)

    def make_case(self, rng, group, depth):
        return niah_case(rng, group, depth, self.cfg.needles, self.cfg.digits)

    def score(self, answer, case):
        return niah_score(answer, case)

    def metric_prefix(self, group):
        return f"niah_{group}"


# ---- training sources --------------------------------------------------------------------------------------

class _FillerStream:
    """Consecutive character chunks of a source's documents joined by blank lines, starting over at the end."""

    def __init__(self, source, what: str):
        self.source, self.what = source, what
        self.docs, self.buffer = None, ""

    def take(self, n: int) -> str:
        while len(self.buffer) < n:
            text = next(self.docs, None) if self.docs is not None else None
            if text is None:
                self.docs = (d["text"] for d in self.source)
                text = next(self.docs, None)
                if text is None:
                    raise DataError(f"{self.what}: the filler source yields no documents")
            self.buffer += text + "\n\n"
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out


class _Builtin:
    def __iter__(self):
        yield {"text": BUILTIN_FILLER * 100}


class RetrievalSource:
    """`documents` synthetic documents: filler, needle(s) at a random depth, question, answer; len(text) is drawn
    uniformly in [min_chars, max_chars]."""

    name = ""
    synthetic = True  # a mix keeps it out of the eval split unless told otherwise

    def __init__(self, cfg):
        from hyloom.registry import registry

        self.cfg = cfg
        if cfg.filler is None:
            self.filler = _Builtin()
        else:
            reg = registry().get("data_source", cfg.filler["type"])
            self.filler = reg.build(reg.config.model_validate(cfg.filler) if reg.config else cfg.filler)
        longest = max(fixed_chars(self.make_case(_rng(s), 1.0)) for s in range(50))
        if cfg.min_chars < longest + 50:
            raise ValueError(f"data source {self.name}: min_chars {cfg.min_chars} leaves too little room for "
                             f"filler: a needle, question and answer take up to about {longest} characters; "
                             f"use min_chars >= {longest + 50}")

    def make_case(self, rng, depth: float) -> Case:
        raise NotImplementedError

    def fingerprint(self):
        filler = getattr(self.filler, "fingerprint", None)
        return {"format": FORMAT, "config": self.cfg.model_dump(mode="json"),
                "filler": filler() if callable(filler) else texts_hash(d["text"] for d in self.filler)}

    def __iter__(self):
        cfg = self.cfg
        rng = _rng(cfg.seed, self.name)
        stream = _FillerStream(self.filler, f"data source {self.name}")
        for i in range(cfg.documents):
            case = self.make_case(rng, float(rng.random()))
            chars = int(rng.integers(cfg.min_chars, cfg.max_chars + 1))
            text = document_text(case, stream.take(max(0, chars - fixed_chars(case))))
            yield document(text, f"{self.name}-{i}", self.name, variant=case.variant, key=case.key,
                           depth=round(case.depth, 4))


class PasskeySource(RetrievalSource):
    name = "passkey"

    def make_case(self, rng, depth):
        return passkey_case(rng, depth, self.cfg.digits)


class NiahSource(RetrievalSource):
    name = "niah"

    def make_case(self, rng, depth):
        variant = self.cfg.variants[int(rng.integers(len(self.cfg.variants)))]
        return niah_case(rng, variant, depth, self.cfg.needles, self.cfg.digits)
