"""The `mdm` objective (SPEC §7): a masked-diffusion ELBO for bidirectional models.

Per row, t ~ U(0, 1) and p = (1 - eps) t + eps; each token is replaced by the mask id with probability p; the
loss is the cross-entropy on the masked positions only, each weighted 1/p, summed and divided by B·T (an upper
bound on the row's negative log-likelihood per token)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hyloom.blueprint import BlueprintError, Problem
from hyloom.plugins.mdm.config import MdmObjectiveConfig
from hyloom.errors import SetupError


def mask_tokens(ids_BT, *, mask_id: int, eps: float = 1e-3, t_B=None, prompt_len_B=None, generator=None):
    """(noisy ids, masked [B, T] bool, p [B]). `t_B` fixes each row's time (default: drawn); positions before
    `prompt_len_B` are never masked."""
    B, T = ids_BT.shape
    if t_B is None:
        t_B = torch.rand(B, device=ids_BT.device, generator=generator)
    p_B = (1 - eps) * t_B + eps
    masked = torch.rand(B, T, device=ids_BT.device, generator=generator) < p_B[:, None]
    if prompt_len_B is not None:
        masked &= torch.arange(T, device=ids_BT.device)[None] >= prompt_len_B[:, None]
    return torch.where(masked, mask_id, ids_BT), masked, p_B


def masked_loss(logits_BTV, ids_BT, masked_BT, p_B) -> torch.Tensor:
    """Σ over masked positions of CE / p, divided by B·T."""
    B, T = ids_BT.shape
    ce = F.cross_entropy(logits_BTV[masked_BT].float(), ids_BT[masked_BT], reduction="none")
    weight = p_B[:, None].expand(B, T)[masked_BT]
    return (ce / weight).sum() / (B * T)


def prompt_lengths(ids_BT, end_id: int):
    """Each row's prompt length: up to and including its first `end_id` token; 0 for a row without one."""
    hit = ids_BT == end_id
    first = hit.int().argmax(1)
    return torch.where(hit.any(1), first + 1, torch.zeros_like(first))


class MdmObjective:
    name = "masked-diffusion"

    def __init__(self, cfg: MdmObjectiveConfig):
        self.cfg = cfg
        self.mask_id: int | None = cfg.mask_id
        self.end_id: int | None = None

    def check(self, blueprint) -> None:
        """Refuse, before any data is prepared, a model this objective cannot train."""
        if blueprint.model.causal:
            raise BlueprintError([Problem("model.causal", (
                "true, but train.objective is mdm: masked diffusion predicts each masked token from both sides, "
                "and a causal model sees only the left. Set model.causal: false (every mixer must support it)"))])
        vocab = blueprint.model.vocab_size
        if self.cfg.mask_id is not None and self.cfg.mask_id >= vocab:
            raise BlueprintError([Problem("train.objective.mask_id", (
                f"{self.cfg.mask_id} is outside the vocabulary (model.vocab_size {vocab}: ids 0..{vocab - 1})"))])

    def bind(self, tokenizer, vocab_size: int) -> None:
        """Resolve the mask id (and sft's prompt_end) against the tokenizer and the model's vocabulary."""
        if self.mask_id is None:
            self.mask_id = tokenizer.mask_id
            if self.mask_id is None:
                raise SetupError("train.objective.mask_id: the tokenizer has no <|mask|> token; give mask_id")
        if not 0 <= self.mask_id < vocab_size:
            raise SetupError(f"train.objective.mask_id: {self.mask_id} is outside the vocabulary (model.vocab_size "
                             f"{vocab_size}: ids 0..{vocab_size - 1})")
        if self.cfg.sft:
            self.end_id = tokenizer.hf.token_to_id(self.cfg.prompt_end)
            if self.end_id is None:
                raise SetupError(f"train.objective.prompt_end: {self.cfg.prompt_end!r} is not a token of the "
                                 "tokenizer; add it (e.g. the bpe tokenizer's extra_special_tokens)")

    def describe(self) -> str:
        sft = f", sft: prompts end at {self.cfg.prompt_end!r}" if self.cfg.sft else ""
        return f"mdm, mask id {self.mask_id}, eps {self.cfg.eps:g}{sft}"

    def __call__(self, model, batch_BT, generator=None) -> torch.Tensor:
        if self.mask_id is None:
            raise RuntimeError("MdmObjective.bind(tokenizer, vocab_size) must run first")
        prompt = prompt_lengths(batch_BT, self.end_id) if self.cfg.sft else None
        noisy, masked, p = mask_tokens(batch_BT, mask_id=self.mask_id, eps=self.cfg.eps, prompt_len_B=prompt,
                                       generator=generator)
        return masked_loss(model(noisy), batch_BT, masked, p)
