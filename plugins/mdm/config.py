"""Configs of the mdm objective and the samplers: all that registering them needs, without torch."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, NonNegativeInt, PositiveInt, model_validator


class MdmObjectiveConfig(BaseModel):
    eps: float = Field(1e-3, gt=0, le=1, description="least mask ratio: p = (1 - eps) t + eps, t ~ U(0, 1)")
    sft: bool = Field(False, description="never mask a row's prompt: its tokens up to and including the first "
                                         "prompt_end token (a row without one has no prompt)")
    prompt_end: str | None = Field(None, description="sft: the token (text of one vocabulary entry) that ends "
                                                     "each prompt, e.g. a special token added to the tokenizer")
    mask_id: NonNegativeInt | None = Field(None, description="id of the mask token (null: the tokenizer's "
                                                             "reserved <|mask|>)")

    @model_validator(mode="after")
    def _sft(self):
        if self.sft and not self.prompt_end:
            raise ValueError("sft: true needs prompt_end, the token that ends each prompt")
        return self


class ArSamplerConfig(BaseModel):
    max_new_tokens: NonNegativeInt = Field(64, description="tokens generated per prompt")
    temperature: float = Field(0.0, ge=0, description="0: greedy")
    top_k: PositiveInt | None = None
    top_p: float | None = Field(None, gt=0, le=1)


class MdmSamplerConfig(BaseModel):
    max_new_tokens: PositiveInt = Field(64, description="N: masks appended to the prompt")
    block_length: PositiveInt | None = Field(None, description="masks decoded per block, left to right; must divide "
                                                               "max_new_tokens (null: one block)")
    steps: PositiveInt | None = Field(None, description="denoising steps per block (null: block_length, one token "
                                                        "a step); at most block_length")
    remasking: Literal["low_confidence", "random"] = Field(
        "low_confidence", description="which predictions a step commits: the most confident, or random ones")
    threshold: float | None = Field(None, gt=0, lt=1, description="commit every masked position whose confidence "
                                                                  "exceeds this (at least one a step) instead of a "
                                                                  "fixed number; steps is then unused")
    temperature: float = Field(0.0, ge=0, description="Gumbel noise on the logits (in float64); 0: argmax")
    mask_id: NonNegativeInt | None = Field(None, description="null: the checkpoint's (train.objective.mask_id, "
                                                             "else the tokenizer's <|mask|>)")

    @model_validator(mode="after")
    def _blocks(self):
        block = self.block_length or self.max_new_tokens
        if self.max_new_tokens % block:
            raise ValueError(f"block_length ({block}) must divide max_new_tokens ({self.max_new_tokens})")
        if self.steps is not None and self.steps > block:
            raise ValueError(f"steps ({self.steps}) exceeds block_length ({block}): a step would commit nothing")
        if self.threshold is not None and self.remasking != "low_confidence":
            raise ValueError("threshold commits by confidence: it needs remasking: low_confidence")
        return self
