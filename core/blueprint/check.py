"""What `validate` and `show` check beyond the schema: the model is built on the `meta` device (no memory) and
one token goes through it, so that a config every field of which is valid but which cannot run (heads that do
not divide d_model, an odd head size under RoPE, a kernel's size limit) is refused before any data is prepared.
Any exception, from a built-in component or a plugin's, is reported at the blueprint key of the component."""

from __future__ import annotations

import warnings

from hyloom.blueprint.errors import BlueprintError, Problem
from hyloom.blueprint.load import Loaded


def build_checked(bp, loaded: Loaded):
    """The model of a validated blueprint, built on `meta` after a one-token forward; problems name the file
    that set the component's config."""
    from hyloom.model import build_model

    try:
        model = build_model(bp, device="meta")
        _one_token(model)
    except BlueprintError as exc:
        raise BlueprintError([Problem(p.path, p.message, p.file or loaded.file_of(tuple(p.path.split("."))))
                              for p in exc.problems]) from None
    return model


def _cannot_run_on_meta(exc: Exception) -> bool:
    """Data-dependent code (`.item()`, `if x.any()`) and ops without a meta kernel fail on `meta` for reasons
    that say nothing about the blueprint."""
    text = str(exc)
    return "meta tensor" in text or "'Meta' backend" in text or "on meta" in text.lower()


def _one_token(model) -> None:
    import torch

    from hyloom.model import component_error, mixer_path

    spec, entered, left, handles = model.spec, [], [("model", "failed")], []

    # The culprit is the innermost component still running when the exception flies, else the one that ran
    # last (a mixer whose output has the wrong shape breaks the residual add after it returns).
    def watch(module, path, what):
        def enter(*_):
            entered.append((path, what))

        def leave(*_):
            left.append(entered.pop())

        handles.extend([module.register_forward_pre_hook(enter), module.register_forward_hook(leave)])

    for i, block in enumerate(model.layers):
        where = f"in layer {i}"
        watch(block.mixer, mixer_path(spec, i), f"mixer {spec.layers[i].type!r} failed {where}")
        watch(block.ffn, "model.ffn", f"ffn {spec.ffn.type!r} failed {where}")
        for norm in (block.mixer_norm, block.ffn_norm):
            watch(norm, "model.norm", f"norm {spec.norm.type!r} failed {where}")
    watch(model.norm, "model.norm", f"norm {spec.norm.type!r} failed (final)")
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, dtype=torch.long, device="meta"))
    except (BlueprintError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 (any plugin code: reported at the blueprint key it runs for)
        if _cannot_run_on_meta(exc):
            warnings.warn(f"the one-token check on the meta device could not run ({exc}); the blueprint is "
                          "validated but not run", stacklevel=2)
            return
        path, what = (entered or left)[-1]
        raise component_error(path, f"{what} (a one-token forward on the meta device)", exc) from exc
    finally:
        for handle in handles:
            handle.remove()
