"""How much memory a long-context generation needs, and refusing one that cannot fit before it starts.

The estimate adds the weights, the decode cache (`HybridLM.cache_bytes`: per token × tokens + fixed, per row)
and the activations of one prefill chunk: the residual stream, the projections, the FFN's hidden
activations, the last position's logits, and whatever scratch a mixer declares for a chunk
(`prefill_scratch_bytes(batch, chunk, total, dtype_bytes)`, optional: InfLLM-V2's block scores grow with the
context). It is an estimate: a margin covers the allocator's slack and what it leaves out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MARGIN = 1.15  # allocator fragmentation, library workspaces, small temporaries
GIB = 1024 ** 3


@dataclass
class MemoryEstimate:
    weights: int
    cache: int
    activations: int

    @property
    def total(self) -> int:
        return int((self.weights + self.cache + self.activations) * MARGIN)

    def describe(self) -> str:
        return (f"~{self.total / GIB:.1f} GiB (weights {self.weights / GIB:.1f} + cache {self.cache / GIB:.1f} "
                f"+ activations {self.activations / GIB:.1f}, ×{MARGIN} margin)")


def estimate(model, *, batch: int, tokens: int, chunk_size: int | None = None,
             dtype: torch.dtype | None = None) -> MemoryEstimate:
    """Memory to prefill `tokens` per row (prompt + new tokens) in chunks of `chunk_size` and decode."""
    dtype = dtype or next(model.parameters()).dtype
    nbytes = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_token, fixed = model.cache_bytes(nbytes)
    cache = int(batch * (per_token * tokens + fixed)) + batch * tokens  # + the padding mask
    spec, chunk = model.spec, min(chunk_size or tokens, tokens)
    n = batch * chunk
    widest = max(getattr(block.mixer, "heads", 1) * getattr(block.mixer, "head_dim", spec.d_model)
                 for block in model.layers)
    hidden = getattr(spec.ffn, "hidden", 4 * spec.d_model)
    # per token: a few copies of the residual stream, q/k/v/o/gate and fp32 rotary temporaries, the FFN's three
    # hidden activations; fp32 logits of the last position of each row
    activations = n * (4 * spec.d_model * nbytes + 6 * widest * 4 + 3 * hidden * nbytes) + batch * spec.vocab_size * 4
    scratch = [block.mixer.prefill_scratch_bytes(batch, chunk, tokens, nbytes) for block in model.layers
               if hasattr(block.mixer, "prefill_scratch_bytes")]
    return MemoryEstimate(weights, cache, activations + max(scratch, default=0))


def free_bytes(device: torch.device) -> int:
    """Memory that can still be allocated on `device` (CUDA: free device memory plus what torch's allocator
    holds in reserve; CPU: the kernel's MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 1 << 62  # unknown: do not refuse


class DoesNotFit(ValueError):
    pass


def check_fits(model, *, batch: int, tokens: int, chunk_size: int | None = None) -> MemoryEstimate:
    """Refuse (DoesNotFit, naming the estimate and what is free) a run that would run out of memory midway.
    The model's weights are already in memory, so they count as used, not as needed."""
    device = next(model.parameters()).device
    need = estimate(model, batch=batch, tokens=tokens, chunk_size=chunk_size)
    extra = need.total - int(need.weights * MARGIN)
    free = free_bytes(device)
    if extra > free:
        raise DoesNotFit(f"a context of {tokens:,} tokens × {batch} row(s) needs {need.describe()}, but only "
                         f"{free / GIB:.1f} GiB is free on {device} besides the weights; use a shorter context, "
                         f"a smaller --chunk-size, or a larger device")
    return need
