"""Rollouts for GRPO: sample completions through the model's own decode cache (prefill, then one decode_step per
token, left padding), recording the sampler's log-probability of every token it drew; and the training forward
that recomputes those log-probs.

Shapes: N completion rows, P prompt tokens (left-padded), T completion tokens (right-padded), V vocabulary."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DONE_CHECK_EVERY = 8  # decode steps between checks that every row has ended


@dataclass
class Rollout:
    prompt_NP: torch.Tensor  # prompt ids, left-padded with pad ids
    prompt_valid_NP: torch.Tensor  # bool: True on real prompt tokens
    tokens_NT: torch.Tensor  # the sampled completion, EOS included, pad ids after it
    mask_NT: torch.Tensor  # float: 1 on sampled tokens (EOS included), 0 after
    logp_NT: torch.Tensor  # float32: the sampler's log-prob of each sampled token (0 on padding)
    finished_N: torch.Tensor  # bool: ended with EOS (False: cut at max_new_tokens)
    seconds: float

    @property
    def lengths_N(self) -> torch.Tensor:
        return self.mask_NT.sum(1)

    def completion_ids(self, eos_id: int) -> list[list[int]]:
        """Every row's sampled ids without the EOS (what the verifiers read, decoded), copied to the host at once
        (row by row it would wait for the device three times a row)."""
        rows = zip(self.tokens_NT.tolist(), self.lengths_N.long().tolist(), self.finished_N.tolist())
        return [ids[:n - 1] if ended and n and ids[n - 1] == eos_id else ids[:n] for ids, n, ended in rows]

    def rows(self, index: torch.Tensor) -> "Rollout":
        """The rollout of rows `index`, trimmed to the longest prompt and completion among them."""
        prompt_valid = self.prompt_valid_NP[index]
        mask = self.mask_NT[index]
        keep_p = int(prompt_valid.sum(1).max()) if len(index) else 0
        keep_t = int(mask.sum(1).max()) if len(index) else 0
        P = prompt_valid.shape[1]
        return Rollout(self.prompt_NP[index][:, P - keep_p:], prompt_valid[:, P - keep_p:],
                       self.tokens_NT[index][:, :keep_t], mask[:, :keep_t], self.logp_NT[index][:, :keep_t],
                       self.finished_N[index], self.seconds)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, P], valid [N, P]): each prompt right-aligned, pad ids before it."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), P, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, P - len(prompt):] = torch.tensor(prompt)
        valid[row, P - len(prompt):] = True
    return ids.to(device), valid.to(device)


def _draw(logits_NV: torch.Tensor, temperature: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(token [N], its log-prob [N]) under softmax(logits / temperature); temperature 0: greedy, log-prob at T=1."""
    if temperature == 0:
        logp = F.log_softmax(logits_NV.float(), dim=-1)
        token = logp.argmax(-1)
    else:
        logp = F.log_softmax(logits_NV.float() / temperature, dim=-1)
        token = torch.multinomial(logp.exp(), 1, generator=generator)[:, 0]
    return token, logp.gather(-1, token[:, None])[:, 0]


@torch.no_grad()
def sample_completions(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, eos_id: int,
                       pad_id: int | None = None, generator: torch.Generator | None = None,
                       batch: int | None = None) -> Rollout:
    """Continue every prompt (token ids) once, `batch` rows at a time (None: all at once), until EOS or
    `max_new_tokens`. The sampler's log-probs are of softmax(logits / temperature), the distribution it drew from."""
    device = next(model.parameters()).device
    pad_id = eos_id if pad_id is None else pad_id
    began = time.perf_counter()
    prompt_NP, valid_NP = left_pad(prompts, pad_id, device)
    N = len(prompts)
    tokens = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(N, max_new_tokens, dtype=torch.bool, device=device)
    logps = torch.zeros(N, max_new_tokens, dtype=torch.float32, device=device)
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    step = batch or N
    for lo in range(0, N, step):
        rows = slice(lo, min(lo + step, N))
        ids, valid = prompt_NP[rows], valid_NP[rows]
        pad_cols = int((~valid).all(0).long().cumprod(0).sum())  # columns that are padding in every row here
        ids, valid = ids[:, pad_cols:], valid[:, pad_cols:]
        # the whole length up front: a cache that grows mid-rollout reallocates and recaptures its decode graphs
        logits, cache = model.prefill(ids, valid, capacity=ids.shape[1] + max_new_tokens)
        logits = logits[:, -1]  # prefill may return every position or only the last
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            token, logp = _draw(logits, temperature, generator)
            live = ~done
            token = torch.where(live, token, torch.full_like(token, pad_id))
            tokens[rows, t], mask[rows, t], logps[rows, t] = token, live, torch.where(live, logp, 0.0)
            done |= token == eos_id
            # asking the device whether every row is done waits for it: only every few steps, so that the host
            # queues the next steps meanwhile (the steps after the last EOS only write padding)
            if t == max_new_tokens - 1 or (t % DONE_CHECK_EVERY == DONE_CHECK_EVERY - 1 and bool(done.all())):
                break
            logits = model.decode_step(token, cache)
        finished[rows] = done
    longest = int(mask.sum(1).max()) if N else 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return Rollout(prompt_NP, valid_NP, tokens[:, :longest], mask[:, :longest].float(), logps[:, :longest],
                   finished, time.perf_counter() - began)


def completion_logits(model, roll: Rollout) -> torch.Tensor:
    """The training forward over prompt + completion: the logits that predict each completion token, [N, T, V].
    Padding before the prompt and after the completion is masked out (`valid_BT`), so positions count only real
    tokens, as in the rollout."""
    P, T = roll.prompt_NP.shape[1], roll.tokens_NT.shape[1]
    ids = torch.cat([roll.prompt_NP, roll.tokens_NT], dim=1)
    valid = torch.cat([roll.prompt_valid_NP, roll.mask_NT.bool()], dim=1)
    return model(ids[:, :-1], valid_BT=valid[:, :-1])[:, P - 1:P + T - 1]
