"""Where training memory goes: the bytes each kind of block saves for its backward pass, per token, measured on
the CPU as the bytes a block's forward allocates and still holds when it returns (hyloom.recompute.kept_bytes: the
profiler's allocation records, so what a selective checkpoint stores itself is counted too).

    python bench/activation_memory.py [--size 1b] [--tokens 256,512] [--autocast] [--triton]

A block (norm → mixer → residual, norm → FFN → residual) of each kind of bench/train.py's dense and hybrid
models, at that size's widths, runs at two lengths: bytes per token = the difference of the saved bytes / the
difference of the lengths (what does not grow with T, such as weight casts, drops out). The loss head (final
norm, projection to the vocabulary, cross-entropy) is measured the same way, with the full logits and chunked
(lm.chunked_next_token_loss, what the lm objective uses past lm.CHUNKED_LOSS_LOGITS).

--autocast: bf16 autocast on the CPU, as the GPU trainer runs (the CPU's autocast op lists are close to, not
the same as, CUDA's). --triton: the mixers' Triton custom ops (under TRITON_INTERPRET=1; slow) instead of the
PyTorch references, so the saved tensors are those of the GPU path. Eager only: under torch.compile the
partitioner chooses again what to save (it may recompute cheap elementwise work; never inside a custom op).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import train as bench_train  # noqa: E402  (bench/train.py: the benchmark's model configs)

from hyloom.mixer import MixerContext  # noqa: E402
from hyloom.model import build_model  # noqa: E402
from hyloom.recompute import kept_bytes  # noqa: E402


def per_token(run_at, lengths) -> float:
    """Saved bytes per token: the slope between two lengths."""
    a, b = lengths
    return (kept_bytes(lambda: run_at(b)) - kept_bytes(lambda: run_at(a))) / (b - a)


def block_runner(block, d_model: int, autocast: bool):
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    def run_at(T):
        torch.manual_seed(0)
        x = torch.randn(1, T, d_model, requires_grad=True)
        ctx = MixerContext(pos_BT=torch.arange(T)[None], position=None, causal=True, valid_BS=None)
        with cast:
            return block(x, ctx, 1.0)

    return run_at


def head_runner(model, objective_loss, autocast: bool):
    """The loss head alone: hidden states → final norm → logits → cross-entropy (as the lm objective does)."""
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    def run_at(T):
        torch.manual_seed(0)
        x = torch.randn(1, T, model.spec.d_model, requires_grad=True)
        targets = torch.randint(0, model.spec.vocab_size, (1, T))
        with cast:
            return objective_loss(model, x, targets)

    return run_at


def full_logits_loss(model, x_BTD, targets_BT):
    """The loss as lm.lm_loss takes it below lm.CHUNKED_LOSS_LOGITS: the [B, T, V] logits at once."""
    logits = model.logits(x_BTD)
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets_BT.flatten())


def materialise(module):
    """A module built on `meta` given real (random) CPU weights."""
    module.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.ones_like(p) if name.endswith("norm.weight") else torch.randn_like(p) * 0.02)
    return module


def measure(size_name: str, lengths, autocast: bool, sparse_dense_len: int | None = None) -> dict[str, float]:
    """{block kind: saved bytes per token} for bench/train.py's dense and hybrid models of `size_name`."""
    from hyloom.plugins.train import lm

    size = bench_train.SIZES[size_name]
    sparse = dict(bench_train.SPARSE["gpu"])
    if sparse_dense_len is not None:  # run the sparse path at short lengths (the block sizes stay)
        sparse.update(dense_len=sparse_dense_len, window=sparse["block_size"] * 2, topk=2)
    models = {"dense": bench_train.dense_model(size, max(lengths)),
              "hybrid": bench_train.equal_size_hybrid(size, max(lengths), sparse)}
    table = {}
    for name, model_dict in models.items():
        model = build_model(bench_train.blueprint(model_dict), device="meta")
        kinds = {}
        for block in model.layers:
            kinds.setdefault(type(block.mixer).__name__, block)
        for kind, block in kinds.items():
            materialise(block)
            table[f"{name} {kind} block"] = per_token(block_runner(block, size["d_model"], autocast), lengths)
            del block
        if name == "dense":
            head = build_model(bench_train.blueprint({**model_dict, "n_layers": 1, "layout": "A"}), device="meta")
            materialise(head)
            table["loss head, full logits"] = per_token(head_runner(head, full_logits_loss, autocast), lengths)
            lm.LOSS_CHUNK_LOGITS = min(lengths) // 2 * head.spec.vocab_size  # as at 64K: several chunks
            table["loss head, chunked"] = per_token(head_runner(head, lm.chunked_next_token_loss, autocast), lengths)
    return table


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1b", choices=list(bench_train.SIZES))
    ap.add_argument("--tokens", default="256,512", help="two lengths: the slope between them is per token")
    ap.add_argument("--autocast", action="store_true", help="bf16 autocast on the CPU")
    ap.add_argument("--triton", action="store_true", help="the mixers' Triton custom ops (interpreter)")
    args = ap.parse_args()
    lengths = [int(x) for x in args.tokens.split(",")]
    if args.triton:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--triton needs TRITON_INTERPRET=1 in the environment (set before triton is imported)")
        from hyloom.kernels import infllm_v2, lightning
        infllm_v2.ops.TRITON_ON_CPU = lightning.TRITON_ON_CPU = True
    torch.set_num_threads(min(2, torch.get_num_threads()))
    table = measure(args.size, lengths, args.autocast, sparse_dense_len=min(lengths))
    print(f"saved for backward, bytes per token ({args.size}, {'bf16 autocast' if args.autocast else 'fp32'}, "
          f"{'Triton ops' if args.triton else 'PyTorch references'}, T={lengths}):")
    for kind, value in table.items():
        print(f"  {kind:34s} {value:10,.0f}")


if __name__ == "__main__":
    main()
