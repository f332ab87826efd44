"""Configs of the `mqar` eval task and training source (torch-free: `hyloom ls` imports this module).

The generator, task and source are in `hyloom.plugins.eval.mqar`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, PositiveInt, model_validator


class MqarShape(BaseModel):
    """What one MQAR example looks like; shared by the task and the source so both draw the same distribution."""

    vocab_size: int = Field(512, ge=8, description="the synthetic vocabulary: id 0 fills the gaps between queries, "
                            "keys are 1..vocab_size/2-1, values vocab_size/2..vocab_size-1; it sits just above the "
                            "tokenizer's vocabulary, so model.vocab_size must hold tokenizer + vocab_size ids")
    power_a: float = Field(0.01, gt=0, le=1, description="query gaps follow p(x) ∝ x^(a-1) (Zoology's power law): "
                           "small a puts most queries right after the key-value pairs")

    def check_cell(self, seq_len: int, n: int) -> str | None:
        """Why (seq_len, n) cannot be built, or None."""
        if n > self.vocab_size // 2 - 1:
            return f"{n} key-value pairs need {n} distinct keys, but vocab_size {self.vocab_size} has " \
                   f"{self.vocab_size // 2 - 1}"
        if seq_len < 4 * n:
            return f"seq_len {seq_len} is shorter than 4 x {n} key-value pairs (the pairs, then a query slot each)"
        return None


class MqarTaskConfig(MqarShape):
    """Multi-query associative recall (Zoology): N key-value pairs, then each key asked again; accuracy (or, with
    `score: answer_logprob`, log-probability) of the teacher-forced prediction of the value at every query."""

    seq_lens: list[PositiveInt] = Field([64, 128, 256, 512], min_length=1, description="example lengths in tokens")
    num_kv_pairs: list[PositiveInt] = Field([4, 8, 16, 32, 64], min_length=1,
                                            description="key-value pairs per example; cells with seq_len < 4N are "
                                                        "skipped (blank in the heatmap)")
    cases: PositiveInt = Field(32, description="examples per (seq_len, num_kv_pairs) cell")
    seed: int = Field(1234, description="same seed, same examples (differs from the source's default seed 0, so "
                                        "the examples evaluated are not the ones trained on)")
    score: Literal["exact", "answer_logprob"] = Field(
        "exact", description="exact: accuracy of the argmax value at each query (mqar/acc...); answer_logprob: the "
                             "log-probability of the paired value at each query (mqar/answer_logprob..., continuous, "
                             "<= 0) and the same argmax accuracy (mqar/answer_token_acc...)")

    @model_validator(mode="after")
    def _some_cell(self):
        if all(self.check_cell(s, n) for s in self.seq_lens for n in self.num_kv_pairs):
            raise ValueError(f"no (seq_len, num_kv_pairs) cell can be built: "
                             f"{self.check_cell(self.seq_lens[0], self.num_kv_pairs[0])}")
        return self


class MqarSourceConfig(MqarShape):
    """Synthetic MQAR training documents, pre-tokenized (written as ids above the tokenizer's vocabulary)."""

    documents: PositiveInt = Field(10_000, description="how many examples the source yields")
    seq_len: PositiveInt = Field(128, description="tokens per example; keep it at or below data.seq_len")
    num_kv_pairs: list[PositiveInt] = Field([4, 8, 16], min_length=1,
                                            description="each example draws N from this list")
    seed: int = Field(0, description="same seed, same examples")

    @model_validator(mode="after")
    def _cells(self):
        for n in self.num_kv_pairs:
            if (why := self.check_cell(self.seq_len, n)) is not None:
                raise ValueError(why)
        return self
