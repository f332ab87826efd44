"""Keep only what is costly to redo: a mixer's elementwise work between its products (norms, rotary, gates) is
run again in the backward pass instead of saving its intermediates for it.

    y = keep_products(fn, *args)

runs fn(*args) under selective activation checkpointing: for the backward, autograd keeps fn's tensor
arguments and the outputs of its matrix products and attention kernels (never run twice), and recomputes the
rest. Same operations forward and (replayed) backward, so outputs and gradients are those of fn run plainly.
fn must be pure (no state written): its elementwise part runs a second time in the backward pass.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_aten = torch.ops.aten
_KEEP_NAMES = (  # attention kernels and the project's custom ops (hyloom::*): some need not be loaded
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_flash_attention_for_cpu")
_PRODUCTS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default}


def _keep(op) -> bool:
    if op in _PRODUCTS:
        return True
    name = op.name()
    return name.startswith("hyloom::") or name.split(".")[0] in _KEEP_NAMES


def _policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if _keep(op) else CheckpointPolicy.MUST_RECOMPUTE


_contexts = functools.partial(create_selective_checkpoint_contexts, _policy)


def keep_products(fn, *args):
    """fn(*args), saving for the backward only its arguments and the outputs of its products (see above).
    Without gradients (evaluation, decoding) it is a plain call."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_contexts)


def kept_bytes(run) -> int:
    """Bytes that `run()` allocates on the CPU and still holds when it returns, its output's storage left out:
    with gradients on, what its autograd graph keeps for the backward pass, including what a selective checkpoint
    stores itself (which torch.autograd.graph.saved_tensors_hooks never sees), plus anything else it caches (weight
    casts of autocast: they do not grow with the length, so compare two lengths). Measured by the profiler's
    allocation records; the output stays alive until counted."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = run()
        output_bytes = out.untyped_storage().nbytes()
    held = sum(e.cpu_memory_usage for e in prof.events() if e.cpu_parent is None)
    del out
    return held - output_bytes
