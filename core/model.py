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


@dataclass
class ModelCache:
    """Decode state of a whole model: one entry per layer, the padding mask and each row's next position."""

    layers: list
    valid_BS: torch.Tensor  # bool, over every token seen so far
    next_pos_B: torch.Tensor


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
        B, T = ids_BT.shape
        if cu_seqlens is not None:
            self._check_packed(cu_seqlens, B, T, cache)
        if cache is not None:
            valid_new = valid_BT if valid_BT is not None else torch.ones_like(ids_BT, dtype=torch.bool)
            pos_BT = cache.next_pos_B[:, None] + valid_new.long().cumsum(1) - 1
            pos_BT = pos_BT.clamp_min(0)
            cache.valid_BS = torch.cat([cache.valid_BS, valid_new], dim=1)
            cache.next_pos_B = cache.next_pos_B + valid_new.long().sum(1)
            valid_BS = None if bool(cache.valid_BS.all()) else cache.valid_BS
        else:
            valid_BS = valid_BT
            if pos_BT is None:
                pos_BT = _positions(B, T, ids_BT.device, valid_BT, cu_seqlens)
        ctx = MixerContext(pos_BT=pos_BT, position=None, causal=self.spec.causal, valid_BS=valid_BS,
                           cu_seqlens=cu_seqlens)
        x = self.embed_tokens(ids_BT)
        if self.spec.scale_emb != 1.0:
            x = x * self.spec.scale_emb
        for i, block in enumerate(self.layers):
            layer_ctx = replace(ctx, cache=cache.layers[i]) if cache is not None else ctx
            x = block(x, layer_ctx, self.residual_scale)
        x = self.norm(x)
        if self.logit_scale != 1.0:
            x = x * self.logit_scale
        return x @ self.embed_tokens.weight.T if self.lm_head is None else self.lm_head(x)

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

    def new_cache(self, batch: int, device=None, dtype=None) -> ModelCache:
        self._require("decode", "decoding (prefill, decode_step, generate)")
        device = device or self.embed_tokens.weight.device
        dtype = dtype or self.embed_tokens.weight.dtype
        return ModelCache(
            layers=[block.mixer.new_cache(batch, device, dtype) for block in self.layers],
            valid_BS=torch.zeros(batch, 0, dtype=torch.bool, device=device),
            next_pos_B=torch.zeros(batch, dtype=torch.long, device=device),
        )

    @torch.no_grad()
    def prefill(self, ids_BT, valid_BT=None, cache: ModelCache | None = None):
        """Run a (left-padded) prompt; returns (logits [B, T, V], cache)."""
        cache = cache if cache is not None else self.new_cache(ids_BT.shape[0])
        return self(ids_BT, valid_BT=valid_BT, cache=cache), cache

    @torch.no_grad()
    def decode_step(self, ids_B, cache: ModelCache):
        """One new token per row; returns logits [B, V]."""
        return self(ids_BT=ids_B[:, None], cache=cache)[:, -1]

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
