"""Configs of the built-in layer selectors (torch-free: `hyloom ls` imports this module).

The selectors themselves are in `hyloom.plugins.convert.selectors`; the contract they share
(SelectionContext, Selection) in `hyloom.plugins.convert.selection`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, PositiveInt, field_validator


class SelectorConfig(BaseModel):
    """What every selector accepts."""

    pin: list[int] = Field([], description="layers always kept, counted in the budget; negative indices count "
                                           "from the end (MiniCPM-SALA: [0, -1])")

    @field_validator("pin")
    @classmethod
    def _distinct_pins(cls, values):
        if len(set(values)) != len(values):
            raise ValueError(f"pin lists a layer twice: {values}")
        return values


class EvenConfig(SelectorConfig):
    """Attention layers evenly spaced over the depth: the budget's k layers sit at the centres of k equal slices
    of the stack, shifted to the slice's last layer (floor((j + 1) * L / k) - 1), so the last layer is always kept
    and the rest are spread like HypeNet's every-n-th layout. Pinned layers take their slots first; the remaining
    ones are spread over the unpinned layers the same way."""


class FixedConfig(SelectorConfig):
    """Explicit indices of the attention layers to keep (negative ones count from the end); with the pins they
    must make exactly the budget."""

    layers: list[int] = Field(description="layers kept as attention; negative indices count from the end")


class HaloConfig(SelectorConfig):
    """HALO (SPEC §5): swap one layer at a time for its linear twin; measure recall R_i with the `recall` task and
    quality C_i with the `quality` task; score s_i = (max_j R_j - R_i) / (max_j C_j - C_i + eps), capped at `cap`;
    keep the top-scored layers (ties: the lower index). Where a task gives per-case values, each R_i and C_i is
    recorded with its standard error and that of its drop (R_se, dR_se, C_se, dC_se)."""

    recall: dict[str, Any] = Field(
        {"type": "passkey", "lengths": [256], "depths": [0.0, 0.25, 0.5, 0.75, 1.0], "cases": 8,
         "score": "answer_logprob"},
        description="the eval_task that measures recall R_i: passkey or niah at lengths the teacher was trained "
                    "at, or mqar for tiny synthetic models; score: answer_logprob (teacher-forced log-probability "
                    "of the answer) moves with every swap, where exact-match accuracy of a near-perfect teacher "
                    "moves by whole cases")
    recall_metric: str | None = Field(None, description="which of the recall task's metrics is R_i (default: its "
                                                        "first, the task's headline)")
    quality: dict[str, Any] = Field(
        {"type": "loss_by_position", "lengths": [256], "sequences": 8},
        description="the eval_task that measures quality C_i (default: held-out next-token loss)")
    quality_metric: str | None = Field(None, description="which of the quality task's metrics is C_i (default: its "
                                                         "first); a metric named loss/... is a loss, so C_i is its "
                                                         "negative")
    eps: float = Field(1e-3, gt=0, description="added to the quality drop so a swap that costs no quality does "
                                               "not divide by zero")
    cap: float = Field(50.0, gt=0, description="scores are capped here (a recall drop with almost no quality drop "
                                               "would otherwise dwarf every other layer)")
    noise_sigmas: float = Field(0.0, ge=0, description="0: SPEC §5's score as it stands. k > 0 (an option, not "
                                "the paper's): a recall drop within k standard errors (paired over the recall "
                                "task's cases) counts as none, and a quality drop counts as at least k standard "
                                "errors; needs tasks that give per-case values (passkey, niah, mqar, "
                                "loss_by_position)")


class KlConfig(SelectorConfig):
    """KL-guided: swap one layer at a time for its linear twin and measure KL(teacher ‖ swapped), per token, on
    held-out sequences; keep the layers whose swap moves the output distribution most (ties: the lower index)."""

    seq_len: PositiveInt = Field(256, description="length of the held-out sequences (the held-out split, cut "
                                                  "end to end)")
    sequences: PositiveInt = Field(8, description="how many held-out sequences (refused when the split holds "
                                                  "fewer)")
