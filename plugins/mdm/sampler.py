"""The samplers: `ar` (today's autoregressive loop, counted) and `mdm` (masked-diffusion denoising, SPEC §7).

The mdm sampler starts from prompt + N mask tokens and decodes N/block_length blocks left to right. Each step
runs the whole sequence once (one NFE), predicts every masked position of the current block (argmax of the
logits, with Gumbel noise in float64 when temperature > 0) and commits some of them: the k most confident
(`low_confidence`), k at random (`random`), or all above `threshold` (at least one). k splits the block evenly
over `steps`, the first steps taking the remainder, so the block's last step fills its last mask."""

from __future__ import annotations

import time

import torch

from hyloom.generate import SampleResult, generate
from hyloom.plugins.mdm.config import ArSamplerConfig, MdmSamplerConfig


class _Counted:
    """The model, counting forward passes (prefill and decode steps) for the NFE."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def prefill(self, *args, **kwargs):
        self.calls += 1
        return self.model.prefill(*args, **kwargs)

    def decode_step(self, *args, **kwargs):
        self.calls += 1
        return self.model.decode_step(*args, **kwargs)


class ArSampler:
    def __init__(self, cfg: ArSamplerConfig):
        self.cfg = cfg

    def sample(self, model, prompts, *, tokenizer=None, generator=None, stop_strings=()) -> SampleResult:
        counted, began = _Counted(model), time.perf_counter()
        stops = [tokenizer.eos_id] if tokenizer is not None else []
        out = generate(counted, prompts, max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                       top_k=self.cfg.top_k, top_p=self.cfg.top_p, stop_tokens=stops, stop_strings=stop_strings,
                       decode=tokenizer.decode if tokenizer is not None else None, generator=generator)
        return SampleResult(out, counted.calls, time.perf_counter() - began, sum(map(len, out)))


def transfer_counts(n: int, steps: int) -> list[int]:
    """How many masks each of `steps` steps commits so that all `n` are filled: as even as can be."""
    base, extra = divmod(n, steps)
    return [base + (i < extra) for i in range(steps)]


def mask_id_of(model, tokenizer, given: int | None) -> int:
    """The mask id: given, else the tokenizer's <|mask|>; refused unless the model's vocabulary holds it."""
    mask_id = given if given is not None else getattr(tokenizer, "mask_id", None)
    if mask_id is None:
        raise ValueError("mask_id: the tokenizer has no <|mask|> token; give the mask id")
    vocab = model.spec.vocab_size
    if not 0 <= mask_id < vocab:
        raise ValueError(f"mask_id: {mask_id} is outside the model's vocabulary (ids 0..{vocab - 1})")
    return mask_id


@torch.no_grad()
def denoise(model, prompt_BP, *, mask_id: int, cfg: MdmSamplerConfig, generator=None):
    """Fill prompt_BP + N masks. Returns (ids [B, P+N], NFE, tokens committed per step [steps, B])."""
    B, P = prompt_BP.shape
    N = cfg.max_new_tokens
    block = cfg.block_length or N
    steps = cfg.steps or block
    x = torch.cat([prompt_BP, torch.full((B, N), mask_id, dtype=torch.long, device=prompt_BP.device)], 1)
    nfe, commits = 0, []
    for lo in range(P, P + N, block):
        plan = transfer_counts(block, steps) if cfg.threshold is None else None
        step = 0
        while True:
            open_ = x[:, lo:lo + block] == mask_id  # the prompt is outside every block: it never changes
            if not open_.any():
                break
            # only the block's positions can be committed: float64 logits for those alone
            logits = model(x)[:, lo:lo + block].double()
            nfe += 1
            logits[..., mask_id] = float("-inf")  # a committed token is never the mask itself
            scores = logits
            if cfg.temperature > 0:
                u = torch.rand(logits.shape, dtype=torch.float64, device=x.device, generator=generator)
                scores = logits / cfg.temperature - torch.log(-torch.log(u.clamp_min(1e-300)))
            guess = scores.argmax(-1)
            if cfg.remasking == "random":
                conf = torch.rand(open_.shape, dtype=torch.float64, device=x.device, generator=generator)
            else:
                conf = logits.softmax(-1).gather(-1, guess[..., None])[..., 0]
            conf = conf.masked_fill(~open_, float("-inf"))
            if plan is not None:
                top = conf.topk(plan[step], dim=-1).indices
                commit = torch.zeros_like(open_).scatter(1, top, True) & open_
            else:
                best = torch.zeros_like(open_).scatter(1, conf.argmax(-1, keepdim=True), True)
                commit = open_ & ((conf > cfg.threshold) | best)
            x[:, lo:lo + block] = torch.where(commit, guess, x[:, lo:lo + block])
            commits.append(commit.sum(1).tolist())
            step += 1
    return x, nfe, commits


class MdmSampler:
    def __init__(self, cfg: MdmSamplerConfig):
        self.cfg = cfg

    def sample(self, model, prompts, *, tokenizer=None, generator=None, stop_strings=()) -> SampleResult:
        from hyloom.generate import cut_at_stop

        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        mask_id = mask_id_of(model, tokenizer, self.cfg.mask_id)
        device = next(model.parameters()).device
        out, nfe, began = [None] * len(prompts), 0, time.perf_counter()
        by_length: dict[int, list[int]] = {}
        for row, prompt in enumerate(prompts):  # rows of one length share a batch: no padding to attend to
            by_length.setdefault(len(prompt), []).append(row)
        for length, rows in by_length.items():
            prompt_BP = torch.tensor([prompts[r] for r in rows], dtype=torch.long, device=device)
            x, calls, _ = denoise(model, prompt_BP, mask_id=mask_id, cfg=self.cfg, generator=generator)
            nfe += calls
            for r, ids in zip(rows, x[:, length:].tolist()):
                out[r] = ids
        produced = sum(map(len, out))
        seconds = time.perf_counter() - began
        if tokenizer is not None:  # the answer ends at its first end-of-text, as with the ar sampler
            out = [ids[:ids.index(tokenizer.eos_id)] if tokenizer.eos_id in ids else ids for ids in out]
            if stop_strings:
                out = [_cut_ids(ids, tokenizer.decode, stop_strings, cut_at_stop) for ids in out]
        return SampleResult(out, nfe, seconds, produced)


def _cut_ids(ids, decode, stop_strings, cut_at_stop):
    """The shortest prefix of ids whose text contains a stop string (the ar sampler's convention), else all."""
    for n in range(1, len(ids) + 1):
        if cut_at_stop(decode(ids[:n]), stop_strings) is not None:
            return ids[:n]
    return ids
