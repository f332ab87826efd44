"""The model: embedding → L × (norm → mixer → residual, norm → FFN → residual) → norm → head.

Every part comes from the registries; this file only wires them. Parameter names follow the layout
`embed_tokens`, `layers.N.{mixer_norm,mixer,ffn_norm,ffn}`, `norm`, `lm_head`.
"""

from __future__ import annotations

import math
import os
import traceback
from dataclasses import dataclass, replace

import torch
from torch import nn

from hyloom.blueprint.errors import BlueprintError, Problem
from hyloom.mixer import CapabilityError, MixerContext
from hyloom.registry import registry


TORCH_DIR = os.path.dirname(torch.__file__)


def mixer_path(spec, layer: int) -> str:
    """The blueprint key a layer's mixer config comes from: its override if it has one, else its symbol."""
    return f"model.overrides.{layer}" if layer in spec.overrides else f"model.mixers.{spec.layout[layer]}"


def component_error(path: str, what: str, exc: Exception) -> BlueprintError:
    """A plugin's exception as a blueprint problem at `path`. A ValueError is a config check speaking to the
    user; anything else is shown with the place it was raised, for the plugin's author."""
    if isinstance(exc, ValueError) and str(exc):
        return BlueprintError([Problem(path, f"{what}: {exc}")])
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    # the innermost frame outside torch: where the plugin went wrong
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(TORCH_DIR)]
    text += "".join(f" (raised at {f.filename}:{f.lineno})" for f in frames[-1:])
    return BlueprintError([Problem(path, f"{what}: {text}")])


def _build(path: str, what: str, build, *args):
    """Call a registered build function; its failure becomes a blueprint problem at `path`."""
    try:
        return build(*args)
    except (BlueprintError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 (any plugin code: reported at the blueprint key it builds)
        raise component_error(path, what, exc) from exc


class Block(nn.Module):
    def __init__(self, spec, layer: int, mixer_cfg, policy):
        super().__init__()
        reg = registry()
        mixer_reg = reg.get("mixer", mixer_cfg.type)
        norm, ffn = reg.get("norm", spec.norm.type), reg.get("ffn", spec.ffn.type)
        def cannot(reg_):
            return f"cannot build {reg_.kind} {reg_.name!r} for layer {layer}"

        self.mixer_norm = _build("model.norm", cannot(norm), norm.build, spec.norm, spec.d_model)
        self.mixer = _build(mixer_path(spec, layer), cannot(mixer_reg), mixer_reg.build, mixer_cfg, layer, spec)
        self.ffn_norm = _build("model.norm", cannot(norm), norm.build, spec.norm, spec.d_model)
        self.ffn = _build("model.ffn", cannot(ffn), ffn.build, spec.ffn, spec.d_model)
        self.capabilities = mixer_reg.capabilities  # the registered ones: what HybridLM enforces
        self.position = _build("model.position", f"position {spec.position.type!r} has no encoding for layer {layer} "
                               f"({mixer_reg.capabilities.family} family)", policy.for_layer,
                               mixer_reg.capabilities.family, layer)

    def forward(self, x_BTD, ctx: MixerContext, residual_scale: float):
        x_BTD = x_BTD + residual_scale * self.mixer(self.mixer_norm(x_BTD), replace(ctx, position=self.position))
        return x_BTD + residual_scale * self.ffn(self.ffn_norm(x_BTD))


def round_capacity(tokens: int) -> int:
    """Cache capacity for `tokens`: a multiple of 16, of 1024 past 4096 (decode attention over a long cache
    runs in pieces of up to 1024 slots)."""
    step = 16 if tokens <= 4096 else 1024
    return max(step, -(-tokens // step) * step)


@dataclass
class ModelCache:
    """Decode state of a whole model: one entry per layer, and preallocated buffers for the padding mask and
    positions, so that a decode step changes no shape (and can be captured in a CUDA graph)."""

    layers: list
    valid_buf_BS: torch.Tensor  # bool [B, capacity]: which slots hold real tokens (False past `length`)
    next_pos_B: torch.Tensor  # each row's next position (real tokens only)
    slot_1: torch.Tensor  # int64 [1] on the device: `length`, for static decode steps
    length: int = 0  # tokens held per row, padding included
    padded: bool = False  # some row has padding (else the mixers get valid_BS = None)
    runner: object = None  # the decode step (hyloom.decode.DecodeRunner) bound to these buffers

    @property
    def batch(self) -> int:
        return self.valid_buf_BS.shape[0]

    @property
    def capacity(self) -> int:
        return self.valid_buf_BS.shape[1]

    @property
    def valid_BS(self) -> torch.Tensor:
        """The padding mask over every token held so far."""
        return self.valid_buf_BS[:, :self.length]

    def reserve(self, tokens: int) -> None:
        """Room for `tokens` per row in every buffer (allocated once when `tokens` is the final length; past
        the capacity, buffers are reallocated and the decode step's graphs recaptured)."""
        if tokens <= self.capacity:
            return
        capacity = round_capacity(tokens)
        grown = self.valid_buf_BS.new_zeros(self.batch, capacity)
        grown[:, :self.length] = self.valid_buf_BS[:, :self.length]
        self.valid_buf_BS = grown
        for layer in self.layers:
            if hasattr(layer, "reserve"):
                layer.reserve(capacity)
        self.runner = None


class HybridLM(nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        reg = registry()
        position, norm = reg.get("position", spec.position.type), reg.get("norm", spec.norm.type)
        policy = _build("model.position", f"cannot build position {position.name!r}", position.build, spec.position)
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.d_model)
        self.layers = nn.ModuleList(Block(spec, i, cfg, policy) for i, cfg in enumerate(spec.layers))
        self.norm = _build("model.norm", f"cannot build norm {norm.name!r} (final)", norm.build, spec.norm, spec.d_model)
        self.lm_head = None if spec.tie_embeddings else nn.Linear(spec.d_model, spec.vocab_size, bias=False)
        # µP-style scalars (MiniCPM): embeddings × scale_emb, residual branches × scale_depth/√L,
        # logits ÷ (d_model / dim_model_base).
        self.residual_scale = spec.scale_depth / math.sqrt(spec.n_layers) if spec.scale_depth else 1.0
        self.logit_scale = spec.dim_model_base / spec.d_model if spec.dim_model_base else 1.0
        self.reset_parameters()

    def reset_parameters(self):
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.spec.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def forward(self, ids_BT, *, pos_BT=None, valid_BT=None, cu_seqlens=None, cache: ModelCache | None = None):
        """Logits [B, T, V]. Without a cache: a training/eval pass (positions restart inside each packed
        sequence when `cu_seqlens` is given). With a cache: the new tokens continue the cached ones."""
        return self.logits(self.hidden(ids_BT, pos_BT=pos_BT, valid_BT=valid_BT, cu_seqlens=cu_seqlens, cache=cache))

    def hidden(self, ids_BT, *, pos_BT=None, valid_BT=None, cu_seqlens=None, cache: ModelCache | None = None):
        """The final hidden states [B, T, d] (before the last norm): `forward` without the head."""
        B, T = ids_BT.shape
        if cu_seqlens is not None:
            self._check_packed(cu_seqlens, B, T, cache)
        if cache is not None:
            pos_BT, valid_BS = self._advance(cache, ids_BT, valid_BT)
        else:
            valid_BS = valid_BT
            if pos_BT is None:
                pos_BT = _positions(B, T, ids_BT.device, valid_BT, cu_seqlens)
        ctx = MixerContext(pos_BT=pos_BT, position=None, causal=self.spec.causal, valid_BS=valid_BS,
                           cu_seqlens=cu_seqlens)
        x = self.embed(ids_BT)
        for i, block in enumerate(self.layers):
            layer_ctx = replace(ctx, cache=cache.layers[i]) if cache is not None else ctx
            x = block(x, layer_ctx, self.residual_scale)
        return x

    def embed(self, ids_BT):
        x = self.embed_tokens(ids_BT)
        return x * self.spec.scale_emb if self.spec.scale_emb != 1.0 else x

    def logits(self, x_BTD):
        """The head over hidden states [B, T, d]: final norm, logit scale, projection to the vocabulary."""
        x = self.norm(x_BTD)
        if self.logit_scale != 1.0:
            x = x * self.logit_scale
        return x @ self.embed_tokens.weight.T if self.lm_head is None else self.lm_head(x)

    @staticmethod
    def _advance(cache: ModelCache, ids_BT, valid_BT):
        """Append T tokens to the cache's mask and positions; returns (positions [B, T], valid_BS or None)."""
        B, T = ids_BT.shape
        start = cache.length
        if start + T > cache.capacity:
            cache.reserve(max(start + T, 2 * cache.capacity))
        if valid_BT is None:
            pos_BT = cache.next_pos_B[:, None] + torch.arange(T, device=ids_BT.device)
            cache.valid_buf_BS[:, start:start + T] = True
            cache.next_pos_B += T
        else:
            cache.padded = cache.padded or not bool(valid_BT.all())  # once per prefill, not per decode step
            pos_BT = (cache.next_pos_B[:, None] + valid_BT.long().cumsum(1) - 1).clamp_min(0)
            cache.valid_buf_BS[:, start:start + T] = valid_BT
            cache.next_pos_B += valid_BT.long().sum(1)
        cache.length = start + T
        cache.slot_1.fill_(cache.length)
        return pos_BT, cache.valid_BS if cache.padded else None

    def _require(self, capability: str, what: str) -> None:
        """Refuse, naming the layers, when a mixer does not declare `capability`: the one place each
        capability a mixer can lack is enforced, so no mixer has to check for itself."""
        lacking = [f"layers.{i} ({self.spec.layers[i].type})" for i, block in enumerate(self.layers)
                   if not getattr(block.capabilities, capability)]
        if lacking:
            raise CapabilityError(f"{what} needs mixers with the {capability!r} capability; "
                                  f"{', '.join(lacking)} {'does' if len(lacking) == 1 else 'do'} not declare it")

    def _check_packed(self, cu_seqlens, B: int, T: int, cache) -> None:
        self._require("varlen", "packed sequences (cu_seqlens)")
        if cache is not None:
            raise ValueError("cu_seqlens cannot be combined with a decode cache: prefill one row per sequence")
        if B != 1 or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point() or len(cu_seqlens) < 2:
            raise ValueError(f"cu_seqlens must be integer offsets [N + 1] for a batch of one row; got shape "
                             f"{tuple(cu_seqlens.shape)}, dtype {cu_seqlens.dtype}, for ids of shape {(B, T)}")
        if cu_seqlens[0] != 0 or cu_seqlens[-1] != T or bool((cu_seqlens.diff() < 0).any()):
            shown = cu_seqlens.tolist()
            shown = shown if len(shown) <= 8 else [*shown[:4], "...", *shown[-2:]]
            raise ValueError(f"cu_seqlens must rise from 0 to the row length {T}; got {shown}")

    # ---- inference ---------------------------------------------------------------------------------------

    def new_cache(self, batch: int, device=None, dtype=None, *, capacity: int = 0) -> ModelCache:
        """An empty cache for `batch` rows; `capacity`: tokens per row to allocate up front (prompt + new
        tokens, when known), else the buffers grow by doubling."""
        self._require("decode", "decoding (prefill, decode_step, generate)")
        device = device or self.embed_tokens.weight.device
        dtype = dtype or self.embed_tokens.weight.dtype
        cache = ModelCache(
            layers=[block.mixer.new_cache(batch, device, dtype) for block in self.layers],
            valid_buf_BS=torch.zeros(batch, 0, dtype=torch.bool, device=device),
            next_pos_B=torch.zeros(batch, dtype=torch.long, device=device),
            slot_1=torch.zeros(1, dtype=torch.long, device=device),
        )
        cache.reserve(capacity)
        return cache

    @torch.no_grad()
    def prefill(self, ids_BT, valid_BT=None, cache: ModelCache | None = None, *, logits_at: str = "last",
                chunk_size: int | None = None, capacity: int = 0):
        """Run a left-padded prompt (or continue a cache with more tokens); returns (logits, cache).

        logits_at="last": [B, 1, V] at the last position (each row's last token, prompts being left-padded);
        "all": [B, T, V]. chunk_size: run at most that many tokens at a time (bounds activation memory; the
        result equals one pass: the first chunk is made long enough for that, see Mixer.first_chunk_min).
        capacity: tokens per row to allocate when a new cache is made."""
        if logits_at not in ("last", "all"):
            raise ValueError(f"logits_at must be 'last' or 'all', not {logits_at!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer (or None: one pass), not {chunk_size!r}")
        B, T = ids_BT.shape
        if T == 0:
            raise ValueError("prefill needs at least one token per row")
        if cache is None:
            cache = self.new_cache(B, capacity=capacity)
        cache.reserve(cache.length + T)
        step = chunk_size or T
        first = max(getattr(block.mixer, "first_chunk_min", 0) for block in self.layers)
        if first and step < T and valid_BT is not None:  # counted in each row's real tokens, after its padding
            first += int((~valid_BT).sum(1).max())
        first = max(step, first)
        bounds = [0, *range(min(first, T), T, step), T]
        logits = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            x = self.hidden(ids_BT[:, start:end], valid_BT=None if valid_BT is None else valid_BT[:, start:end],
                            cache=cache)
            if logits_at == "all":
                logits.append(self.logits(x))
        if logits_at == "last":
            return self.logits(x[:, -1:]), cache
        return torch.cat(logits, 1) if len(logits) > 1 else logits[0], cache

    @torch.no_grad()
    def decode_step(self, ids_B, cache: ModelCache, *, cuda_graph: bool | None = None, compile: bool = False):
        """One new token per row; returns logits [B, V]. On CUDA the step runs as captured CUDA graphs
        (cuda_graph=None: on CUDA, True: require CUDA, False: eager). compile=True: its pieces run through
        torch.compile first (the first step compiles; off by default until measured); see hyloom.decode."""
        from hyloom.decode import DecodeRunner

        if cuda_graph and not ids_B.is_cuda:
            raise ValueError("cuda_graph=True needs the model and ids on a CUDA device")
        graphs = ids_B.is_cuda if cuda_graph is None else cuda_graph
        if cache.length + 1 > cache.capacity:
            cache.reserve(max(cache.length + 1, 2 * cache.capacity))
        if cache.runner is None or cache.runner.requested != graphs or cache.runner.compile != compile:
            cache.runner = DecodeRunner(self, cache, graphs, compile)
        return cache.runner.step(ids_B)

    def generate(self, prompts, **kwargs):
        from hyloom.generate import generate

        return generate(self, prompts, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def cache_bytes(self, dtype_bytes: int = 2) -> tuple[int, int]:
        """Decode state of one sequence: (bytes per token, fixed bytes), summed over layers."""
        per_token = fixed = 0
        for block in self.layers:
            t, f = block.mixer.cache_bytes(dtype_bytes)
            per_token, fixed = per_token + t, fixed + f
        return per_token, fixed


def _positions(B, T, device, valid_BT, cu_seqlens):
    if cu_seqlens is not None:  # positions restart at every packed sequence
        idx = torch.arange(T, device=device)
        starts = cu_seqlens[:-1].long()
        seq = torch.bucketize(idx, cu_seqlens[1:].long(), right=True)
        return (idx - starts[seq])[None].expand(B, T)
    if valid_BT is not None:  # left padding: count only real tokens
        return (valid_BT.long().cumsum(1) - 1).clamp_min(0)
    return torch.arange(T, device=device)[None].expand(B, T)


def build_model(blueprint, *, device=None, dtype=None) -> HybridLM:
    """Build the model a validated blueprint describes, on any device (`meta` allocates nothing)."""
    spec = getattr(blueprint, "model", blueprint)
    with torch.device(device or "cpu"):
        model = HybridLM(spec)
    return model.to(dtype) if dtype is not None else model
