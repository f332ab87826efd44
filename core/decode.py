"""The decode step of a HybridLM without per-step host overhead: on CUDA, captured in CUDA graphs.

A step is a list of pieces over a carry of tensors: the embedding, each layer, the head. A layer whose mixer
sets `static_decode` (see hyloom.mixer.Mixer) is one piece run with static shapes (`ctx.slot_1`); every built-in
mixer does (InfLLM-V2 too: its lengths live on the device), so a model of them decodes as one CUDA graph. A
layer whose mixer does not (a plugin's) is cut in three: its norm, the mixer itself, which runs eagerly (an
"island": its shapes or host-side state change from step to step), and the rest of the block. A mixer with
`decode_pre(x, ctx) -> tensors`, `decode_core(*tensors, ctx) -> o` and `decode_post(o, x) -> y` (projections,
the part over the cache, output) keeps only its core as the island.
Neighbouring static pieces form one CUDA graph; islands run between the graphs. Without graphs (CPU, graphs
turned off, or a capture that failed) the same pieces run one after another, so both ways compute the same.

The graphs hold the addresses of the cache's buffers, so a runner lives on its ModelCache and is rebuilt when
the cache's buffers are reallocated (`ModelCache.reserve` past the capacity); each batch size has its own cache,
hence its own graphs.

compile=True runs the embedding, each static layer and the head through torch.compile (static shapes, graph
breaks allowed: what Dynamo cannot trace stays eager inside the same CUDA graph), so the ~100 small kernels of a
layer (casts, norms, rotary, gates) fuse into a few. The first (warm-up) step compiles, outside any capture; the
capture then records the compiled kernels. Every layer goes through one function, `_block_step`, taking the block
as an argument: Dynamo keys its cache on that function's code and lifts the parameters to inputs, so blocks of
one kind share one compiled graph (one compile per kind and cache shape, not one per layer).
"""

from __future__ import annotations

import functools
import warnings
import weakref
from dataclasses import replace

import torch

from hyloom.mixer import MixerContext

# torch.compile's backend for compile=True; tests on the CPU swap in "aot_eager" (tracing without code generation)
COMPILE_BACKEND = "inductor"
# Dynamo's cache entries per function: one per block kind and cache shape (a cache grown by doubling gets a new
# shape, hence new entries); past the limit Dynamo runs the function uncompiled (with only a logged warning)
RECOMPILE_LIMIT = 64


def _embed_step(model, ids_B, valid_buf_BS, slot_1, pos_B1, next_pos_B):
    valid_buf_BS.index_fill_(1, slot_1, True)  # the new token is real
    pos_B1.copy_(next_pos_B[:, None])
    return model.embed(ids_B[:, None])


def _block_step(block, x_B1D, ctx, residual_scale):
    return block(x_B1D, ctx, residual_scale)


def _head_step(model, x_B1D, next_pos_B, slot_1):
    next_pos_B.add_(1)
    slot_1.add_(1)
    return model.logits(x_B1D)[:, 0]


def _compiled(fn):
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    return torch.compile(fn, backend=COMPILE_BACKEND, dynamic=False, fullgraph=False)


class DecodeRunner:
    def __init__(self, model, cache, graphs: bool, compile: bool = False):
        self.model = model
        self.cache = weakref.proxy(cache)  # the cache holds the runner: no reference cycle to keep them alive
        self.requested = self.graphs = graphs  # graphs turns False if a capture fails
        self.compile = compile
        steps = (_embed_step, _block_step, _head_step)
        self.embed_step, self.block_step, self.head_step = map(_compiled, steps) if compile else steps
        B, device = cache.batch, cache.next_pos_B.device
        self.ids_B = torch.zeros(B, dtype=torch.long, device=device)
        self.pos_B1 = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.static_ctx = [MixerContext(pos_BT=self.pos_B1, position=block.position, causal=model.spec.causal,
                                        valid_BS=cache.valid_buf_BS, cache=cache.layers[i], slot_1=cache.slot_1)
                           for i, block in enumerate(model.layers)]
        self.pieces = self._pieces()
        self.plan = None  # after capture: [("graph", CUDAGraph) | ("island", fn, carry_in, placeholder)]
        self.warmed = False

    def _pieces(self) -> list[tuple]:
        """In order: (True, fn) for a static piece, (False, fn, keep) for an island; fn maps the carry (a tuple
        of tensors, starting with the residual stream x) to the next one. An island returns its input's first
        `keep` entries and one new tensor shaped like its input's entry `keep` (where a graph after it reads it)."""
        pieces = [(True, self._begin)]
        for i, block in enumerate(self.model.layers):
            mixer, part = block.mixer, functools.partial
            if _static(mixer):
                pieces.append((True, part(self._layer, i)))
            elif hasattr(mixer, "decode_core"):  # only the core is an island; projections go into the graphs
                pieces += [(True, part(self._pre, i)), (False, part(self._core, i), 2), (True, part(self._post, i))]
            else:
                pieces += [(True, part(self._norm, i)), (False, part(self._island, i), 1), (True, part(self._rest, i))]
        pieces.append((True, self._end))
        return pieces

    # ---- the pieces: device work only (a replayed graph runs no Python) ------------------------------------

    def _begin(self, carry):
        cache = self.cache  # the step functions get tensors, not this proxy (Dynamo would not trace through it)
        return self.embed_step(self.model, self.ids_B, cache.valid_buf_BS, cache.slot_1, self.pos_B1,
                               cache.next_pos_B), None

    def _layer(self, i, carry):
        return self.block_step(self.model.layers[i], carry[0], self.static_ctx[i], self.model.residual_scale), None

    def _norm(self, i, carry):
        return carry[0], self.model.layers[i].mixer_norm(carry[0])

    def _eager_ctx(self, i):
        cache, block = self.cache, self.model.layers[i]
        seen = cache.length + 1  # the host-side length moves after the step
        return MixerContext(pos_BT=self.pos_B1, position=block.position, causal=self.model.spec.causal,
                            valid_BS=cache.valid_buf_BS[:, :seen] if cache.padded else None, cache=cache.layers[i])

    def _island(self, i, carry):
        return carry[0], self.model.layers[i].mixer(carry[1], self._eager_ctx(i))

    def _rest(self, i, carry):
        block, scale = self.model.layers[i], self.model.residual_scale
        x = carry[0] + scale * carry[1]
        return x + scale * block.ffn(block.ffn_norm(x)), None

    def _pre(self, i, carry):
        block = self.model.layers[i]
        h = block.mixer_norm(carry[0])
        return carry[0], h, *block.mixer.decode_pre(h, replace(self.static_ctx[i], valid_BS=None, slot_1=None))

    def _core(self, i, carry):
        return carry[0], carry[1], self.model.layers[i].mixer.decode_core(*carry[2:], self._eager_ctx(i))

    def _post(self, i, carry):
        block = self.model.layers[i]
        return self._rest(i, (carry[0], block.mixer.decode_post(carry[2], carry[1])))

    def _end(self, carry):
        return self.head_step(self.model, carry[0], self.cache.next_pos_B, self.cache.slot_1), None

    # ---- running them ----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, ids_B: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] of one new token per row; the cache moves on by one."""
        self.ids_B.copy_(ids_B)
        if not self.graphs:
            logits = self._run_pieces()
        elif not self.warmed:  # the first step compiles (Triton, torch.compile) and sets up libraries: not captured
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = self._run_pieces()
            torch.cuda.current_stream().wait_stream(side)
            self.warmed = True
        else:
            if self.plan is None:
                self._capture()
            logits = self._replay() if self.plan is not None else self._run_pieces()
        self.cache.length += 1
        for layer_cache, block in zip(self.cache.layers, self.model.layers):
            if _static(block.mixer):
                layer_cache.advance(1)
        return logits

    def _run_pieces(self):
        carry = (None, None)
        for piece in self.pieces:
            carry = piece[1](carry)
        return carry[0]

    def _segments(self):
        """Neighbouring static pieces merged: [(True, [fn, ...]) | (False, fn, keep)]."""
        segments = []
        for piece in self.pieces:
            if piece[0] and segments and segments[-1][0]:
                segments[-1][1].append(piece[1])
            else:
                segments.append((True, [piece[1]]) if piece[0] else piece)
        return segments

    def _capture(self):
        try:
            plan, carry, pool = [], (None, None), None
            for segment in self._segments():
                if segment[0]:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        for fn in segment[1]:
                            carry = fn(carry)
                    pool = graph.pool()
                    plan.append(("graph", graph))
                else:  # the island reads the previous graph's outputs and leaves its result where the next reads
                    _, fn, keep = segment
                    placeholder = (*carry[:keep], torch.empty_like(carry[keep]))
                    plan.append(("island", fn, carry, placeholder))
                    carry = placeholder
            self.plan, self.logits_BV = plan, carry[0]
        except Exception as exc:  # noqa: BLE001 (any op that cannot be captured: decode eagerly instead)
            warnings.warn(f"decode: CUDA graph capture failed ({type(exc).__name__}: {exc}); decoding eagerly")
            self.graphs, self.plan = False, None

    def _replay(self):
        for entry in self.plan:
            if entry[0] == "graph":
                entry[1].replay()
            else:
                _, fn, carry, placeholder = entry
                placeholder[-1].copy_(fn(carry)[-1])
        return self.logits_BV.clone()  # the next replay overwrites the static output


def _static(mixer) -> bool:
    return getattr(mixer, "static_decode", False)  # a plugin's mixer may not derive from hyloom.mixer.Mixer
