"""Batched generation over one model cache: greedy, temperature, top-k, top-p, stop tokens and stop strings;
and `run_sampler`, which runs any registered sampler (`ar`, `mdm`, ...) by name."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

BIDIRECTIONAL = ("model.causal is false: a bidirectional model sees the tokens after each position, so it "
                 "cannot continue text left to right")


def check_sampling(*, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                   max_new_tokens: int = 0) -> None:
    """Refuse sampling settings that would silently mean something else (a negative temperature, top_p > 1)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a number >= 0 (0: greedy), not {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (None: no limit), not {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (None: no limit), not {top_p}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, not {max_new_tokens}")


def sample(logits_BV: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row. temperature 0 is greedy."""
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    if temperature == 0:
        return logits_BV.argmax(-1)
    logits = logits_BV.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p (the first token always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def cut_at_stop(text: str, stop_strings) -> str | None:
    """`text` up to (not including) the first stop string in it, or None when there is none."""
    found = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    return text[:min(found)] if found else None


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, stop_tokens=(), stop_strings=(), decode=None,
             pad_id: int = 0, generator: torch.Generator | None = None, chunk_size: int | None = None,
             cuda_graph: bool | None = None, compile_decode: bool = False, on_token=None,
             timings: dict | None = None) -> list[list[int]]:
    """Continue each prompt (token ids). Prompts of different lengths are left-padded into one batch.
    Returns the new tokens of each row, ending before the first stop token. A row also stops once
    `decode(its new tokens)` contains one of `stop_strings` (its tokens then include the stop string: cut the
    text with `cut_at_stop`).

    The cache is allocated once for prompt + max_new_tokens. chunk_size: prefill that many tokens at a time.
    cuda_graph, compile_decode (its `compile`): see HybridLM.decode_step. on_token(row, token): called for each token kept, as it comes
    (streaming). timings: if given, filled with prefill_s, decode_s and decode_steps (device-synchronised)."""
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens)
    spec = getattr(model, "spec", None)
    if spec is not None and not spec.causal:
        raise ValueError(f"cannot generate: {BIDIRECTIONAL}")
    if stop_strings and decode is None:
        raise ValueError("stop_strings needs decode (token ids -> text)")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    device = next(model.parameters()).device
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(B, T, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, T - len(prompt):] = torch.tensor(prompt, device=device)
        valid[row, T - len(prompt):] = True
    clock = _Clock(device)
    logits, cache = model.prefill(ids, valid, chunk_size=chunk_size, capacity=T + max_new_tokens)
    logits = logits[:, -1]
    prefill_s = clock.lap()
    steps = 0
    stops = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)
    out = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        token = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        done |= torch.isin(token, stops)
        for row in (~done).nonzero()[:, 0].tolist():
            out[row].append(int(token[row]))
            if on_token is not None:
                on_token(row, out[row][-1])
            if stop_strings and cut_at_stop(decode(out[row]), stop_strings) is not None:
                done[row] = True
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = model.decode_step(token, cache, cuda_graph=cuda_graph, compile=compile_decode)
        steps += 1
    if timings is not None:
        timings.update(prefill_s=prefill_s, decode_s=clock.lap(), decode_steps=steps)
    return out


class _Clock:
    """Wall-clock laps that wait for the device's queued work first."""

    def __init__(self, device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.sync()
        self.last = time.perf_counter()

    def lap(self) -> float:
        self.sync()
        now = time.perf_counter()
        lap, self.last = now - self.last, now
        return lap


@dataclass
class SampleResult:
    """What a sampler returns: each prompt's new tokens, the forward passes it took (NFE), its seconds, and the
    tokens it produced (mdm: every position it denoised, before the cut at end-of-text)."""
    tokens: list[list[int]]
    nfe: int
    seconds: float
    produced: int

    @property
    def tokens_per_s(self) -> float:
        return self.produced / max(self.seconds, 1e-9)


def default_sampler(model) -> str:
    """`ar` for a causal model, `mdm` for a bidirectional one."""
    spec = getattr(model, "spec", None)
    return "mdm" if spec is not None and not spec.causal else "ar"


def run_sampler(model, prompts: list[list[int]], *, sampler: str | None = None, tokenizer=None, seed: int = 0,
                stop_strings=(), **options) -> SampleResult:
    """Continue `prompts` (token ids) with the registered sampler `sampler` (default: `default_sampler`),
    configured by `options` (its config's keys, e.g. max_new_tokens, steps). Bad options raise ValueError."""
    from pydantic import ValidationError

    from hyloom.registry import registry

    reg = registry().get("sampler", sampler or default_sampler(model))
    try:
        cfg = reg.config(**options)
    except ValidationError as exc:
        raise ValueError("; ".join(f"{reg.name} sampler: " + "".join(f"{k}: " for k in e["loc"][:1])
                                   + e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    return reg.build(cfg).sample(model, prompts, tokenizer=tokenizer, generator=generator, stop_strings=stop_strings)
