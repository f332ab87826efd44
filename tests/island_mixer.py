"""A plugin mixer whose decode step is not static, for the tests of the decode runner's island path (no built-in
mixer takes it any more: they all set static_decode). It is softmax attention whose core appends to the KV cache
at the host-side length (`KVCache.append`: the keys it reads grow by one every step, a shape a CUDA graph cannot
replay), split with decode_pre / decode_core / decode_post so that only the core runs eagerly between graphs.
Used by tests/core/test_decode_island.py and tests/gpu/test_cuda_decode.py (tests/ is on sys.path: conftest)."""

from contextlib import contextmanager

import torch.nn.functional as F

import hyloom
from hyloom.plugins.transformer.attention import Attention
from hyloom.plugins.transformer.config import ATTENTION, AttentionConfig


class IslandAttention(Attention):
    static_decode = False

    def forward(self, x_BTD, ctx):
        return self.decode_post(self.decode_core(*self.decode_pre(x_BTD, ctx), ctx), x_BTD)

    def decode_pre(self, x_BTD, ctx):
        return self.project(x_BTD, ctx)

    def decode_core(self, q_BTHD, k_BTKD, v_BTKD, ctx):
        # the runner's placeholder for this island's output is shaped like decode_pre's first tensor (q)
        q, k, v = (t.transpose(1, 2) for t in (q_BTHD, k_BTKD, v_BTKD))  # [B, heads, T, D]
        if ctx.cache is not None:
            k, v = ctx.cache.append(k, v)  # every key so far: S grows with the host-side length
        T, S = q.shape[2], k.shape[2]
        mask = self._mask(ctx, T, S, q.device)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and ctx.causal and T > 1,
                                           enable_gqa=self.kv_heads != self.heads)
        return o.transpose(1, 2)

    def decode_post(self, o_BTHD, x_BTD):
        return self.output(o_BTHD, x_BTD)


class IslandPlugin:
    def hyloom_register_mixers(register):
        register("island_attention", lambda cfg, layer, model: IslandAttention(cfg, model.d_model),
                 config=AttentionConfig, summary="attention decoded as an eager island (tests only)",
                 capabilities=ATTENTION, example={"type": "island_attention", "heads": 2})


@contextmanager
def island_plugin():
    """The mixer registered in this process (as `island_attention`) for the duration of a `with`."""
    name = hyloom.register_plugin(IslandPlugin)
    try:
        yield
    finally:
        hyloom.unregister_plugin(name)
