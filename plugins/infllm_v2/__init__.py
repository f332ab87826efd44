"""The `infllm_v2` mixer: GQA attention, dense below dense_len, trainable block-sparse above (SPEC §2).

Zero extra parameters: the same q/k/v/o projections as a dense layer (plus the optional QK-norm and gate).
This module holds what registering it needs (config, capabilities); the layer is in `mixer.py`, imported when a
model is built, so that `hyloom ls` and `--help` import no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, Field, PositiveInt, model_validator

from hyloom.hookspecs import hookimpl
from hyloom.registry import MixerCapabilities

if TYPE_CHECKING:
    from hyloom.kernels.infllm_v2 import SparseConfig

CAPABILITIES = MixerCapabilities(family="sparse", causal=True, bidirectional=False, decode=True, varlen=True)


class InfLLMv2Config(BaseModel):
    heads: PositiveInt
    kv_heads: PositiveInt = Field(2, description="key/value heads; the G = heads/kv_heads heads of a group share a selection")
    head_dim: PositiveInt | None = Field(None, description="default: d_model // heads")
    qk_norm: bool = Field(False, description="per-head RMSNorm on q and k")
    gate: bool = Field(False, description="sigmoid output gate: o * sigmoid(x W_g) before W_o")
    norm_eps: float = Field(1e-6, gt=0)
    block_size: PositiveInt = Field(64, description="tokens per selectable K/V block")
    kernel_size: PositiveInt = Field(32, description="keys averaged into one compressed key")
    kernel_stride: PositiveInt = Field(16, description="distance between compressed keys")
    topk: PositiveInt = Field(64, description="blocks chosen by score, besides the local window")
    init_blocks: int = Field(1, ge=0, description="leading blocks always attended")
    window: PositiveInt = Field(2048, description="local window in tokens, always attended")
    dense_len: PositiveInt = Field(8192, description="below this key length the layer is dense causal attention")
    lse_kernel_size: int = Field(0, ge=0, description="the paper's LSE approximation: softmax normaliser over coarse "
                                 "kernels of this size (128 in the paper) instead of a first pass; 0: exact")
    lse_kernel_stride: int = Field(0, ge=0, description="stride of those coarse kernels (64 in the paper)")

    @model_validator(mode="after")
    def _sizes(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.block_size % self.kernel_stride or self.kernel_size % self.kernel_stride:
            raise ValueError("block_size and kernel_size must be multiples of kernel_stride")
        self.sparse()  # SparseConfig checks the rest of the block arithmetic
        return self

    def sparse(self) -> SparseConfig:
        from hyloom.kernels.infllm_v2 import SparseConfig  # the kernels import torch: only when a config is checked

        return SparseConfig(block_size=self.block_size, kernel_size=self.kernel_size,
                            kernel_stride=self.kernel_stride, topk=self.topk, init_blocks=self.init_blocks,
                            window=self.window, dense_len=self.dense_len, lse_kernel_size=self.lse_kernel_size,
                            lse_kernel_stride=self.lse_kernel_stride,
                            # a block's score is the max over the kernels overlapping it (5, 4, 1 by default)
                            pool_window=(self.block_size + self.kernel_size) // self.kernel_stride - 1,
                            pool_stride=self.block_size // self.kernel_stride,
                            pool_padding=self.kernel_size // self.kernel_stride - 1)


def build(cfg, layer, model):
    from hyloom.plugins.infllm_v2.mixer import InfLLMv2

    return InfLLMv2(cfg, model.d_model)


@hookimpl
def hyloom_register_mixers(register):
    register("infllm_v2", build, config=InfLLMv2Config, capabilities=CAPABILITIES,
             summary="InfLLM-V2: dense below dense_len, trainable block-sparse GQA attention above",
             example={"type": "infllm_v2", "heads": 4, "kv_heads": 2, "head_dim": 16, "block_size": 4,
                      "kernel_size": 4, "kernel_stride": 2, "topk": 2, "window": 4, "dense_len": 4})
