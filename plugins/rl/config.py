"""Configs of the verifiers and prompt sets (torch-free: `hyloom ls` imports this module)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field, NonNegativeInt, PositiveFloat, PositiveInt, field_validator, model_validator


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
    min_steps: PositiveInt | None = Field(None, description="when set, each problem's number of operations is drawn "
                                          "uniformly in [min_steps, steps] (a mix of difficulties)")
    seed: int = Field(0, description="same seed and settings, same problems")
    instruction: str = Field("Put the final answer in \\boxed{}.", description="appended to each problem")


    @model_validator(mode="after")
    def _step_range(self):
        if self.min_steps is not None and self.min_steps > self.steps:
            raise ValueError(f"min_steps ({self.min_steps}) must not exceed steps ({self.steps})")
        return self


PromptSetConfig = JsonlPrompts | ArithmeticPrompts

# How a prompt record becomes the model's text: the trainer encodes PROMPT_TEMPLATE.format(prompt=...) and samples
# the completion after it; the `arithmetic` data source writes PROMPT_TEMPLATE + solution for supervised training,
# so both stages of SFT -> RL see the same boundary between prompt and answer.
PROMPT_TEMPLATE = "{prompt}\n"


class ArithmeticSourceConfig(ArithmeticPrompts):
    """The `arithmetic` problems as training documents for supervised fine-tuning: the prompt (through
    `template`) followed by a worked solution, one step a line, ending in `\\boxed{answer}`."""

    type: Literal["arithmetic"] = "arithmetic"
    count: PositiveInt = Field(20_000, description="how many documents")
    min_steps: PositiveInt | None = Field(1, description="each document's operations are drawn uniformly in "
                                          "[min_steps, steps]; null: always `steps`")
    steps: PositiveInt = Field(4, le=64, description="the most operations of a problem")
    seed: int = Field(1, description="same seed and settings, same documents (use another seed than the RL prompts')")
    template: str = Field(PROMPT_TEMPLATE, description="the prompt's text; `{prompt}` is the record's prompt. "
                                                       "Keep it equal to the grpo trainer's prompt_template")
    solution: Literal["worked", "answer"] = Field("worked", description="worked: each operation's result, then "
                                                  "the boxed answer; answer: the boxed answer only")


# ---- the grpo trainer ---------------------------------------------------------------------------------------

class WeightedVerifier(BaseModel):
    """One reward term: a registered verifier and its weight. The reward of a completion is Σ weight · reward."""

    verifier: Any = Field(description="a verifier config, e.g. {type: math} (hyloom ls verifier)")
    weight: float = Field(1.0, description="its weight in the summed reward")
    name: str | None = Field(None, pattern=r"^[a-z][a-z0-9_]*$",
                             description="its name in the metrics (reward/<name>) and completions.jsonl; "
                                         "null: its type (math, math_2, ... when listed twice)")

    @field_validator("verifier", mode="plain")
    @classmethod
    def _registered(cls, value):
        from pydantic import TypeAdapter

        from hyloom.blueprint import component_union

        return TypeAdapter(component_union("verifier")).validate_python(value)


class GrpoConfig(BaseModel):
    """GRPO as JustRL runs it (SPEC §8): the defaults are its values. docs/rl.md, "The grpo trainer"."""

    prompts: PromptSetConfig = Field(default_factory=ArithmeticPrompts, discriminator="type",
                                     description="the training prompts: {type: jsonl, path: ...} or "
                                                 "{type: arithmetic, ...}")
    eval_prompts: PromptSetConfig | None = Field(None, discriminator="type",
                                                 description="held-out prompts scored every eval_every steps "
                                                             "(training records with the same prompt are left out "
                                                             "of training); null: no held-out evaluation")
    verifiers: list[WeightedVerifier] = Field(default_factory=lambda: [WeightedVerifier(verifier={"type": "math"})],
                                              min_length=1, description="the reward terms; the first one decides "
                                                                        "`accuracy`")
    prompt_template: str = Field(PROMPT_TEMPLATE, description="the text the model continues; `{prompt}` is the "
                                                              "record's prompt")
    steps: PositiveInt = Field(100, description="GRPO steps (each: one rollout batch, updates_per_step updates)")
    prompts_per_step: PositiveInt = Field(256, description="prompts per step, over all processes (JustRL: 256)")
    group_size: int = Field(8, description="G: completions sampled per prompt (JustRL: 8); at least 2")
    updates_per_step: PositiveInt = Field(4, description="mini-batches (optimizer steps) per rollout batch (JustRL: 4)")
    micro_batch: PositiveInt | None = Field(None, description="completions per forward/backward (gradient "
                                                              "accumulation); null: a whole mini-batch at once")
    rollout_batch: PositiveInt | None = Field(None, description="completions sampled at once; null: all of a step's")
    max_new_tokens: PositiveInt = Field(256, description="longest completion; longer ones are cut (clipped)")
    temperature: PositiveFloat = Field(1.0, description="sampling temperature of the rollouts (JustRL: 1.0)")
    clip_low: float = Field(0.2, ge=0, lt=1, description="ratio clip below: 1 - clip_low")
    clip_high: float = Field(0.28, ge=0, description="ratio clip above: 1 + clip_high (clip-higher)")
    dual_clip: float | None = Field(10.0, description="cap on the loss of A < 0 tokens: dual_clip·|A| (null: off)")
    normalise_std: bool = Field(True, description="divide advantages by the group's std (false: Dr. GRPO)")
    kl_coef: float = Field(0.0, ge=0, description="weight of a k3 KL penalty to the reference model (the weights "
                                                  "the run started from); 0: no reference model (JustRL)")
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus weight (0: none, JustRL)")
    lr: PositiveFloat = Field(1e-6, description="AdamW learning rate, constant after warmup (JustRL: 1e-6 at 1.5B)")
    warmup: NonNegativeInt = Field(10, description="steps of linear warmup")
    weight_decay: float = Field(0.1, ge=0, description="decoupled (AdamW), on matrices only")
    betas: tuple[float, float] = (0.9, 0.999)
    clip: PositiveFloat | None = Field(1.0, description="max global gradient norm (null: no clipping)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    compile: bool | Literal["auto"] = Field("auto", description="torch.compile each block, with symbolic shapes, "
                                                                "for the updates' forward and backward (a small "
                                                                "model's updates are bound by kernel launches: "
                                                                "2.4x faster on an H200, bench/grpo_step.py); "
                                                                "auto: on CUDA only")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="auto (CUDA when there is one), cpu, cuda or cuda:N; under torchrun: auto, "
                                    "cpu or cuda")
    eval_every: PositiveInt = Field(10, description="steps between held-out evaluations (also before the first "
                                                    "step and at the end)")
    eval_limit: PositiveInt | None = Field(None, description="score only the first N eval prompts")
    eval_temperature: float = Field(0.0, ge=0, description="sampling temperature of the evaluation (0: greedy)")
    completions_every: PositiveInt = Field(10, description="steps between completions.jsonl samples (and the first)")
    completions_logged: NonNegativeInt = Field(8, description="completions written each time (the first rows: "
                                                              "whole groups of the first prompts)")
    save_every: PositiveInt = Field(50, description="steps between checkpoints (and at the end)")
    keep: PositiveInt = Field(2, description="checkpoints kept")
    log_every: PositiveInt = Field(1, description="steps between metrics.jsonl lines")
    max_seconds: PositiveFloat | None = Field(None, description="stop (evaluate, save) at the first step that ends "
                                                                "past this many seconds of training; null: no limit")
    reward_workers: PositiveInt = Field(8, description="threads scoring completions when a verifier waits on "
                                                       "something (python_tests: one sandbox process per "
                                                       "completion); verifiers that only compute run on the "
                                                       "trainer's thread")
    seed: int = 0
    out_dir: str = Field("runs/grpo", description="run directory: checkpoints, metrics.jsonl, completions.jsonl, "
                                                  "rewards.png")

    @field_validator("group_size")
    @classmethod
    def _group(cls, value):
        if value < 2:
            raise ValueError(f"GRPO needs group_size >= 2 completions per prompt (the group's mean reward is each "
                             f"completion's baseline), got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.dual_clip is not None and self.dual_clip <= 1 + self.clip_high:
            raise ValueError(f"dual_clip must exceed 1 + clip_high = {1 + self.clip_high}, got {self.dual_clip}")
        if "{prompt}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain {{prompt}}, got {self.prompt_template!r}")
        rows = self.prompts_per_step * self.group_size
        if rows % self.updates_per_step:
            raise ValueError(f"prompts_per_step x group_size = {rows} completions must split evenly into "
                             f"updates_per_step = {self.updates_per_step} mini-batches")
        names = [v.name or v.verifier.type for v in self.verifiers]
        if any(v.name for v in self.verifiers) and len(set(names)) != len(names):
            raise ValueError(f"verifier names must differ, got {names}")
        return self

    def verifier_names(self) -> list[str]:
        """Each reward term's metric name: its `name`, else its type (math, math_2 for a second math)."""
        names = []
        for v in self.verifiers:
            base = v.name or v.verifier.type
            name, k = base, 2
            while name in names:
                name, k = f"{base}_{k}", k + 1
            names.append(name)
        return names
