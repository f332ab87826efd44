"""Configs of the conversion trainers `align`, `select` and `distill` (SPEC §6): all that registering them needs,
without torch."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, Field, NonNegativeInt, PositiveFloat, PositiveInt, field_validator

from hyloom.plugins.train.config import TrainingSettings

TEACHER = Field(description="the Transformer being converted: a hyloom checkpoint (or a run directory: its latest "
                            "checkpoint) or a Hugging Face Llama/Qwen3 directory (config.json + safetensors)")


GATE_INIT = Field("random", description="how a kept attention layer's output gate starts when the teacher has "
                                         "none: random (SPEC §6: sigmoid ≈ 0.5 with noise scales the copied "
                                         "output) or neutral (zero gate weights and o_proj doubled: the layer "
                                         "starts as exactly the teacher's)")


class _ConversionTrainerConfig(TrainingSettings):
    """What both stages share with the `lm` trainer (the optimizer, schedule, run directory, cadences, and
    torchrun: batch_size is global, shared among the processes), less weight decay."""

    teacher: str = TEACHER
    weight_decay: float = Field(0.0, ge=0, description="decoupled (AdamW), on matrices only")


class AlignConfig(_ConversionTrainerConfig):
    lr: PositiveFloat = Field(1e-3, description="peak learning rate (SPEC §6 stage 1: 1e-3 → 1e-5)")
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="final LR as a share of the peak")
    twin: str | None = Field(None, description="the model.mixers symbol every layer's linear twin is built from "
                                               "(null: the one linear-family symbol there)")
    out_dir: str = Field("runs/align", description="run directory: checkpoints, metrics.jsonl, loss.png")


class DistillConfig(_ConversionTrainerConfig):
    lr: PositiveFloat = Field(1e-4, description="peak learning rate (SPEC §6 stage 2: 1e-4 → 3e-5)")
    min_lr_ratio: float = Field(0.3, ge=0, le=1, description="final LR as a share of the peak")
    temperature: PositiveFloat = Field(1.0, description="both distributions are softened by it; the loss is "
                                                        "scaled by its square so gradients keep their size")
    lm_weight: float = Field(0.0, ge=0, le=1, description="weight w of the next-token loss on the data: the "
                                                          "student trains on (1 − w)·KL + w·CE (0: the KL "
                                                          "alone, SPEC §6)")
    compile: bool | Literal["auto"] = Field("auto", description="torch.compile each student block for the "
                                                                "training steps (as the lm trainer); auto: on "
                                                                "CUDA only")
    gate_init: Literal["random", "neutral"] = GATE_INIT
    transfer: bool | None = Field(None, description="start the student from the teacher's weights (SPEC §6 step 0); "
                                                    "null: only when the stage does not start from an earlier "
                                                    "stage's or an init checkpoint")
    out_dir: str = Field("runs/distill", description="run directory: checkpoints, metrics.jsonl, loss.png")


class SelectConfig(BaseModel):
    """The `select` step (SPEC §5/§6): runs a layer selector on the aligned all-twin student and saves the hybrid."""

    teacher: str = TEACHER
    selector: Any = Field(description="the layer selector (hyloom ls selector), e.g. {type: halo} or "
                                      "{type: even, pin: [0]}")
    budget: NonNegativeInt | float = Field(description="layers kept as attention: a count, or a fraction of "
                                                       "n_layers in [0, 1] (rounded to the nearest count, halves up: "
                                                       "0.25 of 28 is 7)")
    attention: str | None = Field(None, description="the model.mixers symbol of the kept attention layers (null: "
                                                    "the one attention symbol there)")
    gate_init: Literal["random", "neutral"] = GATE_INIT
    batch_size: PositiveInt = Field(8, description="sequences the measuring selectors run at once")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="auto (CUDA when there is one), cpu, cuda or cuda:N; under torchrun: auto, "
                                    "cpu or cuda (rank 0 alone selects, the other processes wait)")
    seed: int = Field(0, description="for the eval tasks' random cases")
    out_dir: str = Field("runs/select", description="run directory: selection.json, selection.png, the hybrid's "
                                                    "checkpoint")

    @field_validator("selector", mode="plain")
    @classmethod
    def _selector(cls, value):
        # Registered selector configs are known only once every plugin has registered, so the union is built
        # here, at validation; pydantic keeps the inner key paths (train.selector.recall).
        from pydantic import TypeAdapter

        from hyloom.blueprint import component_union

        return TypeAdapter(component_union("selector")).validate_python(value)

    @field_validator("budget")
    @classmethod
    def _fraction(cls, value):
        if isinstance(value, float) and not 0 <= value <= 1:
            raise ValueError("a fractional budget is a share of the layers, in [0, 1]; a count of layers is an "
                             "integer")
        return value

    def layers(self, n_layers: int) -> int:
        """The budget as a count of layers."""
        return self.budget if isinstance(self.budget, int) else math.floor(self.budget * n_layers + 0.5)
