"""A tiny Qwen3-style teacher (GQA with QK-norm, RoPE, tied embeddings) saved as a hyloom checkpoint, and student
blueprints that fit it: the conversion tests' common ground."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from hyloom.blueprint import Loaded, validate
from hyloom.checkpoint import save_checkpoint
from hyloom.model import build_model

VOCAB = 512  # the bpe vocabulary of the test data, so the teacher reads the same ids

TEACHER = {
    "d_model": 32, "n_layers": 3, "vocab_size": VOCAB, "position": {"type": "rope", "rope_theta": 10000.0},
    "mixers": {"A": {"type": "attention", "heads": 4, "kv_heads": 2, "head_dim": 8, "qk_norm": True}},
    "layout": "AAA", "ffn": {"type": "swiglu", "hidden": 64}, "norm": {"type": "rmsnorm", "eps": 1e-6},
    "tie_embeddings": True,
}


def student(layout: str = "LLL", **changes) -> dict:
    """A HyPE student of the teacher: kept attention A (NoPE + gate) and Lightning twins L."""
    model = copy.deepcopy(TEACHER)
    model.update({"position": {"type": "hype", "rope_theta": 10000.0}, "layout": layout,
                  "mixers": {"A": {**TEACHER["mixers"]["A"], "gate": True},
                             "L": {"type": "lightning", "heads": 4, "head_dim": 8}}})
    model.update(changes)
    return model


def build(model: dict, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(validate(Loaded({"model": model}, "<test>")))


def make_teacher(folder: Path, seed: int = 1, model: dict | None = None) -> Path:
    """A random teacher (its weights scaled up a little so its layers do visibly different things)."""
    teacher = build(model or TEACHER, seed)
    with torch.no_grad():
        for p in teacher.parameters():
            if p.ndim >= 2:
                p.mul_(5)
    return save_checkpoint(folder, teacher, {"model": model or TEACHER})
