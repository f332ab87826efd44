"""The math of GRPO (SPEC §8, JustRL's recipe): group-normalised advantages, per-token log-probs and entropy, the
clipped surrogate with clip-higher and dual clip, and the token-mean over the global batch. Plain functions on
tensors, no trainer state; docs/rl.md ("GRPO loss") states the same formulas for users.

Shapes: B prompts, G completions per prompt, N = B·G completion rows (prompt-major: prompt b's G completions are
rows b·G .. b·G+G−1), T completion tokens, V vocabulary. `mask_NT` is 1 on a completion's real tokens and 0 on
padding (and on prompt tokens, if the caller keeps them in the row).

Not imported by `hyloom.plugins.rl` (that module stays torch-free); the trainer imports this directly."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

# log-ratios are clamped here before exp() so a wildly off-policy token gives a large finite ratio, not inf
# (inf·0 would make the dual-clipped loss NaN); ±20 is far outside every clip range used, as in verl.
_LOG_RATIO_LIMIT = 20.0


def group_advantages(rewards_BG: torch.Tensor, eps: float = 1e-6, normalise_std: bool = True) -> torch.Tensor:
    """A_bi = (r_bi − mean_i r_bi) / (std_i r_bi + eps) for each prompt b's group of G rewards; [B, G] float32.

    std is the *sample* (unbiased, Bessel-corrected: divide by G − 1) standard deviation: verl's
    compute_grpo_outcome_advantage and TRL's GRPOTrainer both call torch.std with its default, so the same rewards
    give the same advantages as there (for ±1 rewards and G = 8 the two differ by √(8/7) ≈ 1.07). A group whose
    rewards are all equal has std 0 and numerator 0, so its advantages are exactly 0 (no signal, no NaN).
    `normalise_std=False` gives Dr. GRPO's A_bi = r_bi − mean_i r_bi."""
    if rewards_BG.dim() != 2:
        raise ValueError(f"rewards must be [prompts, G], got shape {tuple(rewards_BG.shape)}")
    if rewards_BG.shape[1] < 2:
        raise ValueError(f"GRPO needs G >= 2 completions per prompt to form a group baseline, got G = "
                         f"{rewards_BG.shape[1]}")
    r = rewards_BG.float()
    # equal rewards need not centre to exactly 0 in floating point (eight times -0.7 averages to -0.7 + 1e-8),
    # and dividing by the std + eps would blow that rounding up into a signal; such a group has none
    uniform = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    centred = torch.where(uniform, 0.0, r - r.mean(dim=1, keepdim=True))
    if not normalise_std:
        return centred
    return centred / (r.std(dim=1, keepdim=True, unbiased=True) + eps)


def token_advantages(adv_BG: torch.Tensor, mask_NT: torch.Tensor) -> torch.Tensor:
    """Broadcast each completion's advantage to its tokens: A_nt = A_n · mask_nt; [N, T] float32, 0 on padding.
    Row n of `mask_NT` is completion n of the prompt-major flattening of `adv_BG` (n = b·G + i)."""
    adv_N = adv_BG.reshape(-1).float()
    if adv_N.shape[0] != mask_NT.shape[0]:
        raise ValueError(f"{adv_N.shape[0]} advantages (from shape {tuple(adv_BG.shape)}) but the token mask has "
                         f"{mask_NT.shape[0]} rows")
    return adv_N[:, None] * mask_NT.float()


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def token_logprobs(logits_NTV: torch.Tensor, tokens_NT: torch.Tensor) -> torch.Tensor:
    """log π(tokens_nt | context) = log_softmax(z_nt)[tokens_nt], computed in float32 (float64 stays float64)
    (bf16 log-softmax loses ~3 significant digits, enough to bias the ratio exp(new − old)); [N, T].
    The caller aligns them: logits_NTV[:, t] must be the prediction *of* tokens_NT[:, t] (i.e. shifted by one)."""
    if logits_NTV.shape[:-1] != tokens_NT.shape:
        raise ValueError(f"logits {tuple(logits_NTV.shape)} do not match tokens {tuple(tokens_NT.shape)} "
                         "(expected logits [N, T, V] for tokens [N, T])")
    logp = F.log_softmax(_at_least_fp32(logits_NTV), dim=-1)
    return logp.gather(-1, tokens_NT.long().unsqueeze(-1)).squeeze(-1)


def token_entropy(logits_NTV: torch.Tensor) -> torch.Tensor:
    """H_nt = −Σ_v p_ntv · log p_ntv of the model's next-token distribution, in float32; [N, T]."""
    logp = F.log_softmax(_at_least_fp32(logits_NTV), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def clipped_surrogate(logp_new: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                      clip_low: float = 0.2, clip_high: float = 0.28, dual_clip: float | None = 10.0):
    """Per-token PPO/GRPO loss with clip-higher (DAPO) and dual clip (Ye et al. 2020, as verl's clip_ratio_c):

        ρ = exp(logp_new − logp_old)
        L = max(−A·ρ, −A·clip(ρ, 1 − clip_low, 1 + clip_high))     (= −min(ρA, clip(ρ)A), the PPO loss)
        L = min(L, −dual_clip·A)                                     only where A < 0

    With A < 0 a token whose ratio grew past dual_clip would otherwise contribute an unbounded −A·ρ; the dual clip
    caps it at dual_clip·|A| (and its gradient at 0). `dual_clip=None` turns it off; it must exceed 1 + clip_high.
    All inputs [N, T]; `adv` is the token-broadcast advantage.

    Returns (per-token loss [N, T] with 0 on padding, stats). Stats are masked means over this call's valid tokens
    (float tensors, detached); `tokens` is their count, to weight them when averaging over micro-batches:
      clip_high   A > 0 and ρ > 1 + clip_high  (the clipped branch is taken: no gradient)
      clip_low    A < 0 and ρ < 1 − clip_low
      clip_dual   A < 0 and ρ > dual_clip
      approx_kl   k3 estimator of KL(π_old ‖ π_new) from tokens sampled by π_old: (ρ − 1) − log ρ (≥ 0, unbiased,
                  low variance; Schulman, "Approximating KL divergence")
      ratio_mean  mean ρ (1 on the first mini-batch update, when new = old)"""
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    if dual_clip is not None and dual_clip <= 1 + clip_high:
        raise ValueError(f"dual_clip must exceed 1 + clip_high = {1 + clip_high}, got {dual_clip}")
    if not logp_new.shape == logp_old.shape == adv.shape == mask.shape:
        raise ValueError(f"shapes differ: logp_new {tuple(logp_new.shape)}, logp_old {tuple(logp_old.shape)}, "
                         f"adv {tuple(adv.shape)}, mask {tuple(mask.shape)}")
    log_ratio = (_at_least_fp32(logp_new) - logp_old).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    ratio = log_ratio.exp()
    adv, m = adv.to(ratio.dtype), mask.to(ratio.dtype)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -dual_clip * adv), loss)
    loss = loss * m

    with torch.no_grad():
        n = m.sum()

        def share(hit):
            return (hit.float() * m).sum() / n.clamp(min=1)

        stats = {
            "clip_high": share((adv > 0) & (ratio > 1 + clip_high)),
            "clip_low": share((adv < 0) & (ratio < 1 - clip_low)),
            "clip_dual": share((adv < 0) & (ratio > dual_clip)) if dual_clip is not None else n.new_zeros(()),
            "approx_kl": ((ratio - 1 - log_ratio) * m).sum() / n.clamp(min=1),
            "ratio_mean": (ratio * m).sum() / n.clamp(min=1),
            "tokens": n,
        }
    return loss, stats


def kl_to_reference(logp_new: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_new ‖ π_ref) (verl's "low_var_kl", the GRPO paper's penalty):
    δ = logp_ref − logp_new,  k = exp(δ) − δ − 1  (≥ 0), with δ clamped to ±20 and k to ≤ 10 as verl does, so one
    token the reference finds absurd cannot dominate the batch. Off by default (SPEC §8: no reference model)."""
    delta = (logp_ref - _at_least_fp32(logp_new)).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    return (delta.exp() - delta - 1).clamp(max=10.0)


def grpo_token_loss(logp_new, logp_old, adv, mask, *, clip_low: float = 0.2, clip_high: float = 0.28,
                    dual_clip: float | None = 10.0, kl_coef: float = 0.0, logp_ref=None, entropy_coef: float = 0.0,
                    entropy=None):
    """The per-token loss the trainer sums: clipped_surrogate + kl_coef · kl_to_reference − entropy_coef · H.
    Both extra terms are off by default (JustRL); turning one on needs its input (`logp_ref`, `entropy` [N, T]).
    Returns (per-token loss [N, T], stats: clipped_surrogate's, plus `kl_ref` / `entropy` when used)."""
    loss, stats = clipped_surrogate(logp_new, logp_old, adv, mask, clip_low, clip_high, dual_clip)
    m = mask.to(loss.dtype)
    n = stats["tokens"].clamp(min=1)
    if kl_coef:
        if logp_ref is None:
            raise ValueError(f"kl_coef = {kl_coef} needs the reference model's log-probs (logp_ref)")
        kl = kl_to_reference(logp_new, logp_ref) * m
        loss = loss + kl_coef * kl
        stats["kl_ref"] = kl.detach().sum() / n
    if entropy_coef:
        if entropy is None:
            raise ValueError(f"entropy_coef = {entropy_coef} needs the per-token entropy (token_entropy(logits))")
        ent = entropy * m
        loss = loss - entropy_coef * ent
        stats["entropy"] = ent.detach().sum() / n
    return loss, stats


def global_token_count(masks, group=None) -> int:
    """Σ mask over every micro-batch of this optimiser step on this process, summed over all processes
    (all-reduce when torch.distributed is initialised). `masks`: one [N, T] mask or a list of them. Count it
    before the first backward of the step: every process must join the all-reduce."""
    if isinstance(masks, torch.Tensor):
        masks = [masks]
    local = sum(float(m.float().sum()) for m in masks)
    if dist.is_available() and dist.is_initialized():
        device = masks[0].device if masks else torch.device("cpu")
        if dist.get_backend(group) == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        t = torch.tensor([local], dtype=torch.float64, device=device)
        dist.all_reduce(t, group=group)
        local = float(t)
    return int(round(local))


def token_mean(per_token_loss: torch.Tensor, mask: torch.Tensor, global_tokens: int, world_size: int = 1):
    """This micro-batch's share of the global token-mean: world_size · Σ_valid L_nt / global_tokens.

    Summed over micro-batches (gradient accumulation, no extra division) and over processes, the gradients equal
    those of Σ_all L / global_tokens on the whole batch, whatever each micro-batch's length: every token weighs
    the same (DAPO's token-level loss, as JustRL uses). `world_size` undoes the 1/world averaging that
    DistributedDataParallel (and FSDP) apply to gradients: pass the data-parallel world size when they average,
    1 when gradients are summed. `global_tokens` comes from `global_token_count`; 0 (no valid token anywhere)
    gives a zero loss, not NaN."""
    total = (per_token_loss * mask.to(per_token_loss.dtype)).sum()
    return total * (world_size / max(global_tokens, 1))
