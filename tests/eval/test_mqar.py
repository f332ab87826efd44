"""`mqar`: the generator's layout, a hand-built recall model scores 100%, a guesser scores chance, every mixer
family runs it, and the training source writes the examples the task measures."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hyloom.eval import EvalContext
from hyloom.plugins.eval.mqar import MqarSource, MqarTask, examples
from hyloom.plugins.eval.mqar_config import MqarShape, MqarSourceConfig, MqarTaskConfig
from hyloom.testing import tiny_model

OFFSET = 10  # the tokenizer's vocabulary size: mqar ids sit above it


class Recall(torch.nn.Module):
    """Looks up the first earlier occurrence of the current token and predicts what followed it: perfect
    associative recall, with no learning."""

    def __init__(self, vocab):
        super().__init__()
        self.spec = SimpleNamespace(vocab_size=vocab, causal=True)

    def forward(self, ids):
        B, T = ids.shape
        same = (ids[:, :, None] == ids[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril(-1)
        first = torch.where(same.any(-1), same.float().argmax(-1), torch.arange(T))  # itself when none earlier
        nxt = ids.gather(1, (first + 1).clamp_max(T - 1))
        return torch.nn.functional.one_hot(nxt, self.spec.vocab_size).float()


class Guess(Recall):
    """Puts a random value token first at every position: chance is one over the number of values."""

    def forward(self, ids):
        g = torch.Generator().manual_seed(0)
        logits = torch.rand(*ids.shape, self.spec.vocab_size, generator=g)
        logits[..., OFFSET + self.half:] += 1
        return logits


def ctx(model, tokenizer_vocab=OFFSET, train_len=128):
    return EvalContext(model=model, tokenizer=SimpleNamespace(vocab_size=tokenizer_vocab), device=torch.device("cpu"),
                       heldout_ids=lambda: None, train_len=train_len, batch_size=8)


def test_examples_have_the_zoology_layout():
    shape = MqarShape(vocab_size=64, power_a=0.01)
    ids, queries = examples(shape, np.random.default_rng(0), 50, 128, 8)
    assert ids.shape == (50, 128) and queries.shape == (50, 8)
    keys, values = ids[:, 0:16:2], ids[:, 1:16:2]
    assert ((keys >= 1) & (keys < 32)).all() and ((values >= 32) & (values < 64)).all()
    assert all(len(set(k)) == 8 for k in keys)  # distinct keys: each query has one answer
    rows = np.arange(50)[:, None]
    assert (queries >= 16).all() and (queries % 2 == 0).all()
    assert (np.sort(ids[rows, queries], 1) == np.sort(keys, 1)).all()  # every key asked once
    for r in range(50):  # ...each followed by its value
        pairs = dict(zip(keys[r], values[r]))
        assert all(ids[r, q + 1] == pairs[ids[r, q]] for q in queries[r])
    filler = np.ones_like(ids, dtype=bool)
    filler[:, :16] = False
    filler[rows, queries] = filler[rows, queries + 1] = False
    assert (ids[filler] == 0).all()
    # the power law: most queries sit in the first slots after the pairs
    assert np.median(queries) < 16 + 56


def test_a_recall_model_scores_100_and_a_guesser_scores_chance():
    cfg = MqarTaskConfig(seq_lens=[64, 128], num_kv_pairs=[4, 16, 32], cases=16, vocab_size=80)
    task = MqarTask(cfg)
    result = task.run(ctx(Recall(OFFSET + 80)))
    assert result.metrics["mqar/acc"] == 1.0
    # 64 < 4 x 32: that cell is skipped; the others are reported
    assert set(result.metrics) == {"mqar/acc", "mqar/acc@64/kv4", "mqar/acc@64/kv16", "mqar/acc@128/kv4",
                                   "mqar/acc@128/kv16", "mqar/acc@128/kv32"}
    assert all(r["score"] == 1.0 and r["correct"] == r["queries"] for r in result.rows)
    assert {r["extrapolated"] for r in result.rows} == {False}

    guess = Guess(OFFSET + 80)
    guess.half = 40
    result = task.run(ctx(guess))
    queries = sum(r["queries"] for r in result.rows)  # 1,152: chance 1/40 +- 4 standard deviations
    assert result.metrics["mqar/acc"] == pytest.approx(1 / 40, abs=4 * (1 / 40 / queries) ** 0.5)


def test_offset_and_refusals():
    task = MqarTask(MqarTaskConfig(seq_lens=[32], num_kv_pairs=[4], cases=4, vocab_size=32))
    # the ids sit above the tokenizer's vocabulary: a model with vocab 40 cannot hold 10 + 32
    with pytest.raises(ValueError, match=r"vocab_size >= 10 \+ 32 = 42, but has 40"):
        task.run(ctx(Recall(40)))
    model = Recall(OFFSET + 32)
    model.spec.causal = False
    with pytest.raises(ValueError, match="non-causal"):
        task.run(ctx(model))
    with pytest.raises(ValueError, match="no .* cell can be built"):
        MqarTaskConfig(seq_lens=[16], num_kv_pairs=[8])
    with pytest.raises(ValueError, match="distinct keys"):
        MqarSourceConfig(vocab_size=16, num_kv_pairs=[8], seq_len=64)


@pytest.mark.parametrize("mixer", [{"type": "attention", "heads": 2}, {"type": "lightning", "heads": 2},
                                   {"type": "infllm_v2", "heads": 2, "kv_heads": 1, "block_size": 16,
                                    "kernel_size": 8, "kernel_stride": 4, "topk": 2, "dense_len": 16}])
def test_runs_on_every_mixer_family(mixer):
    model = tiny_model(mixer, vocab_size=OFFSET + 32).eval()
    result = MqarTask(MqarTaskConfig(seq_lens=[64], num_kv_pairs=[4, 8], cases=3, vocab_size=32)).run(
        ctx(model, train_len=32))
    assert 0 <= result.metrics["mqar/acc"] <= 1
    assert all(r["extrapolated"] for r in result.rows)  # 64 > train_len 32


def test_source_documents_are_task_examples(tmp_path):
    cfg = MqarSourceConfig(documents=5, seq_len=64, num_kv_pairs=[4, 8], vocab_size=32)
    docs = list(MqarSource(cfg))
    assert len(docs) == 5 and docs == list(MqarSource(cfg))  # deterministic
    for doc in docs:
        ids = np.array(doc["ids"])
        n = doc["meta"]["num_kv_pairs"]
        assert len(ids) == 64 and doc["text"] == " ".join(map(str, ids))
        pairs = dict(zip(ids[0:2 * n:2], ids[1:2 * n:2]))
        asked = [i for i in range(2 * n, 64, 2) if ids[i] != 0]
        assert len(asked) == n and all(ids[i + 1] == pairs[ids[i]] for i in asked)
    # the pipeline writes them above the tokenizer: the recall model scores them perfectly there too
    logits = Recall(300).forward(torch.tensor(docs[0]["ids"])[None] + 258)
    n = docs[0]["meta"]["num_kv_pairs"]
    q = [i for i in range(2 * n, 63, 2) if docs[0]["ids"][i] != 0]
    assert (logits[0, q].argmax(-1) == torch.tensor(docs[0]["ids"])[[i + 1 for i in q]] + 258).all()


class Certain(Recall):
    """The recall model with all its mass on its one-hot prediction."""

    def forward(self, ids):
        return 100.0 * super().forward(ids)


class Uniform(Recall):
    def forward(self, ids):
        return torch.zeros(*ids.shape, self.spec.vocab_size)


def test_answer_logprob_is_zero_when_sure_and_log_1_over_v_when_uniform_and_its_cases_pair_up():
    cfg = MqarTaskConfig(seq_lens=[64, 128], num_kv_pairs=[4, 16], cases=6, vocab_size=80, score="answer_logprob")
    task = MqarTask(cfg)
    sure = task.run(ctx(Certain(OFFSET + 80)))
    assert list(sure.metrics)[:2] == ["mqar/answer_logprob", "mqar/answer_token_acc"]  # the headline first
    assert sure.metrics["mqar/answer_logprob"] == pytest.approx(0.0, abs=1e-6)
    assert sure.metrics["mqar/answer_token_acc"] == 1.0 and "mqar/acc" not in sure.metrics
    uniform = task.run(ctx(Uniform(OFFSET + 80)))
    assert uniform.metrics["mqar/answer_logprob@128/kv16"] == pytest.approx(np.log(1 / (OFFSET + 80)))
    cases = task.metric_cases(uniform.rows)
    assert cases.keys() == uniform.metrics.keys()
    assert len(cases["mqar/answer_logprob"]) == 6 * (4 + 16) * 2  # one value per query
    assert all(np.mean(v) == pytest.approx(uniform.metrics[k]) for k, v in cases.items())
    exact = MqarTask(cfg.model_copy(update={"score": "exact"}))
    assert exact.metric_cases(exact.run(ctx(Certain(OFFSET + 80))).rows)["mqar/acc"] == [1.0] * 240
