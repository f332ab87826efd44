"""Checks a plugin's own tests call: the contracts every mixer must keep inside a real model.

    from hyloom.testing import tiny_model, check_mixer

    def test_my_mixer(tmp_path):
        check_mixer(tiny_model({"type": "my_mixer", "heads": 2}), tmp_path)

Each check raises AssertionError saying what differed; none depends on pytest. Where the model lacks a
capability the check is for (`decode`, `varlen`), it checks that the model refuses instead. The model is put in eval mode while a check
runs. Tolerances default to fp32 ones; pass `rtol`/`atol` for a model in a lower precision.
"""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path

import torch

from hyloom.mixer import CapabilityError

__all__ = ["tiny_model", "check_mixer", "check_decode", "check_left_padding", "check_packed",
           "check_checkpoint_round_trip"]

TOL = {"rtol": 1e-5, "atol": 1e-5}


def tiny_model(mixer: dict, *, n_layers: int = 2, d_model: int = 32, vocab_size: int = 61, layout: str | None = None,
               mixers: dict | None = None, seed: int = 0, **model):
    """A small model whose every layer is `mixer` (a config dict with its `type`), built through blueprint
    validation like any blueprint. `mixers` adds other symbols for a mixed `layout` (`M` is `mixer`); the
    rest of the keyword arguments are further `model:` keys (`position`, `causal`, ...)."""
    from hyloom.blueprint import Loaded, validate
    from hyloom.model import build_model

    data = {"d_model": d_model, "n_layers": n_layers, "vocab_size": vocab_size,
            "mixers": {"M": mixer, **(mixers or {})}, "layout": layout or "M" * n_layers,
            "ffn": {"type": "swiglu", "hidden": 2 * d_model}, **model}
    blueprint = validate(Loaded({"model": data}, file="<hyloom.testing.tiny_model>"))
    torch.manual_seed(seed)
    return build_model(blueprint).eval()


def check_mixer(model, tmp_path, **tol) -> None:
    """Every check below, in turn (decoding only for a causal model)."""
    if model.spec.causal:
        check_decode(model, **tol)
    check_left_padding(model, **tol)
    check_packed(model, **tol)
    check_checkpoint_round_trip(model, Path(tmp_path) / "round-trip", **tol)


def check_decode(model, *, batch: int = 2, prompt: int = 6, steps: int = 5, **tol) -> None:
    """`prefill` of a prompt then one `decode_step` per token gives the logits of one full pass. A model with
    a mixer that does not declare `decode` must refuse to make a cache instead. Causal models only: a
    bidirectional full pass sees later tokens."""
    if not model.spec.causal:
        raise ValueError("check_decode needs a causal model (model.causal is false)")
    ids = _ids(model, (batch, prompt + steps))
    with _eval(model):
        if not _declares(model, "decode"):
            _assert_refuses(lambda: model.prefill(ids), "decode", "prefill")
            return
        full = model(ids)
        logits, cache = model.prefill(ids[:, :prompt], logits_at="all")
        stepped = [model.decode_step(ids[:, t], cache) for t in range(prompt, prompt + steps)]
    _close(torch.cat([logits, torch.stack(stepped, 1)], 1), full, "prefill + decode_step vs one full pass", tol)


def check_left_padding(model, *, lengths=(6, 2, 4), steps: int = 3, **tol) -> None:
    """A left-padded batch (random tokens under the padding, so a leak shows) gives each row the logits it
    gets alone: in a full pass with `valid_BT`, and (a causal model that decodes) in prefill + decode steps."""
    T = max(lengths)
    rows = [_ids(model, (1, n + steps), seed=i)[0] for i, n in enumerate(lengths)]
    ids = _ids(model, (len(lengths), T + steps), seed=99)  # the padding
    valid = torch.zeros(len(lengths), T, dtype=torch.bool, device=ids.device)
    for r, (row, n) in enumerate(zip(rows, lengths)):
        ids[r, T - n:] = row
        valid[r, T - n:] = True
    with _eval(model):
        padded = model(ids[:, :T], valid_BT=valid)
        for r, (row, n) in enumerate(zip(rows, lengths)):
            alone = model(row[None, :n])[0]
            _close(padded[r, T - n:], alone, f"row {r} of a left-padded full pass vs the row alone", tol)
        if not (model.spec.causal and _declares(model, "decode")):
            return
        alone = [model(row[None])[0] for row in rows]
        logits, cache = model.prefill(ids[:, :T], valid, logits_at="all")
        stepped = torch.stack([model.decode_step(ids[:, t], cache) for t in range(T, T + steps)], 1)
    for r, n in enumerate(lengths):
        got = torch.cat([logits[r, T - n:], stepped[r]])
        _close(got, alone[r], f"row {r} of a left-padded prefill + decode vs the row alone", tol)


def check_packed(model, *, lengths=(5, 1, 7), **tol) -> None:
    """Sequences packed into one row with `cu_seqlens` give the logits each gets alone. A model with a mixer
    that does not declare `varlen` must refuse `cu_seqlens` instead."""
    seqs = [_ids(model, (1, n), seed=i) for i, n in enumerate(lengths)]
    packed = torch.cat(seqs, 1)
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=packed.device)
    with _eval(model):
        if not _declares(model, "varlen"):
            _assert_refuses(lambda: model(packed, cu_seqlens=cu_seqlens), "varlen", "a forward with cu_seqlens")
            return
        got = model(packed, cu_seqlens=cu_seqlens)
        alone = torch.cat([model(s) for s in seqs], 1)
    _close(got, alone, "packed sequences (cu_seqlens) vs each sequence alone", tol)


def check_checkpoint_round_trip(model, path, **tol) -> None:
    """save_checkpoint → load_checkpoint (which builds on the `meta` device, as `generate` does) gives a
    model with the same parameters and buffers, persistent or not, and the same logits."""
    from hyloom.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint(path, model, {"model": model.spec.model_dump(mode="json")})
    loaded, _ = load_checkpoint(path, device=str(model.embed_tokens.weight.device))
    theirs = dict(loaded.named_buffers())
    for name, buf in model.named_buffers():
        if name not in theirs:
            raise AssertionError(f"buffer {name} is missing after load_checkpoint")
        _close(theirs[name], buf, f"buffer {name} after load_checkpoint", tol)
    ids = _ids(model, (2, 9))
    with _eval(model), _eval(loaded):
        _close(loaded(ids), model(ids), "logits after save_checkpoint → load_checkpoint", tol)


# ---- helpers -------------------------------------------------------------------------------------------------

def _ids(model, shape, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)  # a local generator: the caller's random state is left alone
    ids = torch.randint(0, model.spec.vocab_size, shape, generator=gen)
    return ids.to(model.embed_tokens.weight.device)


def _declares(model, capability: str) -> bool:
    return all(getattr(block.capabilities, capability) for block in model.layers)


def _assert_refuses(call, capability: str, what: str) -> None:
    try:
        call()
    except CapabilityError as exc:
        if capability not in str(exc):
            raise AssertionError(f"{what} was refused without naming {capability!r}: {exc}") from exc
        return
    raise AssertionError(f"{what} ran although a mixer does not declare {capability!r}")


def _close(actual, expected, what: str, tol: dict) -> None:
    torch.testing.assert_close(actual, expected, **{**TOL, **tol}, msg=lambda m: f"{what}: {m}")


@contextlib.contextmanager
def _eval(model):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
