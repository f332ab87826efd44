"""Weight transfer, Transformer teacher → hybrid student (SPEC §6 step 0).

Everything outside the mixers (embedding, norms, FFNs, head) is copied. A kept attention layer copies the
teacher's attention exactly; its output gate, when the teacher has none, starts fresh: random as SPEC §6 has it,
or neutral, when the layer then starts as exactly the teacher's (HyPE takes its RoPE away through the position
policy, not here). A Lightning twin starts from the teacher layer's W_q, W_k, W_v, W_o and QK-norm, with each K/V
head repeated for the query heads that shared it (GQA → MHA); its output norm and gate start fresh. `check_fits`
(teacher.py) has refused every student these copies do not fit.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from hyloom.blueprint import BlueprintError, Loaded, Problem, validate
from hyloom.plugins.lightning.mixer import Lightning
from hyloom.plugins.transformer.attention import GroupedQKV


def repeat_kv(weight_KD: torch.Tensor, kv_heads: int, heads: int) -> torch.Tensor:
    """A K or V projection [Hkv·D, d] as [H·D, d]: query head h read K/V head h // (H/Hkv) (SDPA's enable_gqa),
    so that head's rows come right after each other."""
    rows, d = weight_KD.shape
    return weight_KD.view(kv_heads, rows // kv_heads, d).repeat_interleave(heads // kv_heads, dim=0).reshape(-1, d)


@torch.no_grad()
def copy_attention(src: GroupedQKV, dst: GroupedQKV, init_std: float, gate: str = "random") -> None:
    """dst computes what src computes (given the same position encoding); a gate src lacks starts fresh: random
    (SPEC §6; sigmoid ≈ 0.5 with per-channel noise scales the copied output) or neutral (zero weights, o_proj
    doubled: 2 · sigmoid(0) = 1, so the layer starts as exactly the teacher's)."""
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
        if getattr(dst, name) is not None:
            getattr(dst, name).weight.copy_(getattr(src, name).weight)
    if dst.g_proj is not None:
        if src.g_proj is not None:
            dst.g_proj.weight.copy_(src.g_proj.weight)
        elif gate == "neutral":
            dst.g_proj.weight.zero_()
            dst.o_proj.weight.mul_(2)
        else:
            nn.init.normal_(dst.g_proj.weight, std=init_std)


@torch.no_grad()
def twin_from_attention(src: GroupedQKV, dst: Lightning, init_std: float) -> None:
    """A Lightning twin initialised from an attention layer: q/k/v/o and QK-norm copied (K/V per query head)."""
    dst.q_proj.weight.copy_(src.q_proj.weight)
    dst.k_proj.weight.copy_(repeat_kv(src.k_proj.weight, src.kv_heads, src.heads))
    dst.v_proj.weight.copy_(repeat_kv(src.v_proj.weight, src.kv_heads, src.heads))
    dst.o_proj.weight.copy_(src.o_proj.weight)
    if dst.q_norm is not None:
        if src.q_norm is not None:
            dst.q_norm.weight.copy_(src.q_norm.weight)
            dst.k_norm.weight.copy_(src.k_norm.weight)
        else:  # a Llama teacher has no QK-norm: the twin's starts as the identity scale
            dst.q_norm.reset_parameters()
            dst.k_norm.reset_parameters()
    if dst.o_norm is not None:
        dst.o_norm.reset_parameters()
    if dst.z_proj is not None:
        nn.init.normal_(dst.z_proj.weight, std=init_std)


@torch.no_grad()
def transfer(teacher, student, gate: str = "random") -> None:
    """Fill `student` (in place) from `teacher`; both are HybridLMs that `check_fits` accepted. `gate`: how a kept
    attention layer's fresh output gate starts (copy_attention)."""
    own = {k for k in student.state_dict() if ".mixer." not in k}
    theirs = teacher.state_dict()
    for name, tensor in student.state_dict().items():
        if name in own:
            tensor.copy_(theirs[name])
    init_std = student.spec.init_std
    for i, (t_block, s_block) in enumerate(zip(teacher.layers, student.layers)):
        src, dst = t_block.mixer, s_block.mixer
        if isinstance(dst, Lightning):
            twin_from_attention(src, dst, init_std)
        elif isinstance(dst, GroupedQKV):
            copy_attention(src, dst, init_std, gate)
        else:  # check_fits refuses this first; here so a caller that skipped it hears why
            raise TypeError(f"layer {i}: no weight transfer into {type(dst).__name__}")


def twin_symbol(spec, chosen: str | None = None) -> str:
    """The model.mixers symbol of the linear twins: `chosen`, or the one linear-family symbol."""
    from hyloom.registry import registry

    linear = [s for s, cfg in spec.mixers.items() if registry().get("mixer", cfg.type).capabilities.family == "linear"]
    if chosen is not None:
        if chosen not in spec.mixers:
            raise BlueprintError([Problem("twin", f"{chosen!r} is not a model.mixers symbol "
                                                  f"(defined: {', '.join(spec.mixers)})")])
        if chosen not in linear:
            raise BlueprintError([Problem("twin", f"{chosen!r} is a {spec.mixers[chosen].type} mixer, not a linear "
                                                  "one")])
        return chosen
    if len(linear) != 1:
        found = f"several ({', '.join(linear)}); name one in the trainer's `twin`" if linear else "none"
        raise BlueprintError([Problem("model.mixers", f"the align stage makes every layer a linear twin, so it needs "
                                                      f"one linear-family mixer (e.g. lightning); found {found}")])
    return linear[0]


def all_twins(resolved: dict, symbol: str) -> dict:
    """A resolved blueprint whose every layer is the twin `symbol` (per-layer overrides dropped: they were written
    for the layers' own mixers)."""
    out = copy.deepcopy(resolved)
    out["model"]["layout"] = [symbol] * out["model"]["n_layers"]
    out["model"]["overrides"] = {}
    return out


def student_spec(model: dict):
    """The validated `model` section of a resolved one."""
    return validate(Loaded({"model": model}, "<conversion student>")).model
