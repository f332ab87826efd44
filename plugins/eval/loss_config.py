"""Config of the `loss_by_position` eval task (torch-free: `hyloom ls` imports this module).

The task itself is in `hyloom.plugins.eval.loss`."""

from __future__ import annotations

from pydantic import BaseModel, Field, PositiveInt, field_validator


class LossByPositionConfig(BaseModel):
    """Held-out next-token loss per log-spaced position bucket, for sequences of each given length: does the
    loss keep falling past the training length?"""

    lengths: list[PositiveInt] = Field([512, 2048, 8192], min_length=1,
                                       description="sequence lengths in tokens (held-out documents packed end to "
                                                   "end and cut into sequences of this length, as in training)")
    sequences: PositiveInt = Field(8, description="at most this many sequences per length (fewer when the held-out "
                                                  "split is short; refused when it holds less than one)")

    @field_validator("lengths")
    @classmethod
    def _distinct(cls, values):
        if len(set(values)) != len(values):
            raise ValueError(f"lengths lists a value twice: {values}")
        return sorted(values)
