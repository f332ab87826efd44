"""The `lm` trainer's config: all that registering it needs, without torch."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, NonNegativeInt, PositiveFloat, PositiveInt, field_validator, model_validator


class TrainingSettings(BaseModel):
    """What every optimizing trainer shares (`lm`, and the conversion trainers `align` and `distill`): the
    optimizer, the LR schedule, the device and the cadences of evaluation, checkpoints and logs."""

    steps: PositiveInt = Field(300, description="optimizer steps")
    batch_size: PositiveInt = Field(16, description="sequences per optimizer step, over all ranks and micro-steps")
    grad_accum: PositiveInt = Field(1, description="micro-steps per optimizer step")
    lr: PositiveFloat = Field(3e-3, description="peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final LR as a share of the peak")
    warmup: NonNegativeInt = Field(20, description="steps of linear warmup")
    schedule: Literal["cosine", "wsd", "constant"] = Field("cosine", description="after warmup")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of the steps spent decaying")
    weight_decay: float = Field(0.1, ge=0, description="decoupled (AdamW), on matrices only")
    betas: tuple[float, float] = (0.9, 0.95)
    clip: PositiveFloat | None = Field(1.0, description="max global gradient norm (null: no clipping)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="auto (CUDA when there is one), cpu, cuda or cuda:N; "
                                    "under torchrun: auto, cpu or cuda")
    eval_every: PositiveInt = Field(100, description="steps between held-out evaluations")
    eval_batches: PositiveInt = Field(8, description="batches per evaluation")
    save_every: PositiveInt = Field(100, description="steps between checkpoints")
    keep: PositiveInt = Field(2, description="checkpoints kept")
    log_every: PositiveInt = Field(10, description="steps between metrics.jsonl lines "
                                                   "(and printed lines without a progress bar)")
    seed: int = 0

    @model_validator(mode="after")
    def _micro(self):
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        return self


class LMTrainerConfig(TrainingSettings):
    out_dir: str = Field("runs/train", description="run directory: checkpoints, metrics.jsonl, loss.png")
    tensorboard: bool | None = Field(None, description="write TensorBoard logs (null: when it is installed)")
    sample_prompt: str = Field("def ", description="prompt of the sample printed at the end")
    sample_tokens: NonNegativeInt = Field(48, description="tokens of that sample (0: none)")
    objective: Any = Field({"type": "next_token"}, validate_default=True,
                           description="what the model learns: {type: next_token} (causal models) or {type: mdm, "
                                       "eps: 1e-3} (masked diffusion, bidirectional models); hyloom ls objective")
    eval_tasks: list[Any] = Field([], description="evaluation tasks run during training, e.g. "
                                                  "[{type: passkey, lengths: [512]}] (hyloom ls eval_task); "
                                                  "logged to metrics.jsonl as eval/<metric>")
    eval_tasks_every: PositiveInt | None = Field(None, description="steps between runs of eval_tasks "
                                                                  "(null: at each evaluation); always at the end")
    compile: bool | Literal["auto"] = Field("auto", description="torch.compile each block for training steps "
                                                                "(the Triton kernels are custom ops: no graph "
                                                                "break); auto: on CUDA only")
    activation_checkpointing: bool = Field(False, description="recompute each block's activations in the backward "
                                                              "pass instead of keeping them: less memory, about a "
                                                              "third more compute")

    # The registered objective and eval_task configs are known only once every plugin has registered (after
    # this class exists), so their unions are built when a blueprint is validated; pydantic keeps the inner
    # errors' key paths (train.eval_tasks.0.lengths).
    @field_validator("objective", mode="plain")
    @classmethod
    def _objective(cls, value):
        from pydantic import TypeAdapter

        from hyloom.blueprint import component_union

        return TypeAdapter(component_union("objective")).validate_python(value)

    @field_validator("eval_tasks", mode="plain")
    @classmethod
    def _eval_tasks(cls, value):
        from pydantic import TypeAdapter

        from hyloom.blueprint import component_union

        tasks = TypeAdapter(list[component_union("eval_task")]).validate_python(value)
        seen = [t.type for t in tasks]
        twice = sorted({t for i, t in enumerate(seen) if t in seen[:i]})
        if twice:
            raise ValueError(f"task {', '.join(map(repr, twice))} listed twice; give each task once "
                             "(its metrics are named after it)")
        return tasks


class NextTokenConfig(BaseModel):
    """The `next_token` objective has no settings."""
