"""GRPO math (plugins/rl/grpo.py) on hand-computed values: advantages, each clipping regime, stats, and the
token-mean under gradient accumulation and several processes."""

import math
import socket

import pytest
import torch
import torch.distributed as dist

from hyloom.plugins.rl import grpo


def test_group_advantages_hand_values_sample_std():
    r = torch.tensor([[1.0, -1.0, 1.0, -1.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    a = grpo.group_advantages(r)
    # group 0: mean 0, sample std sqrt(4/3); group 1: mean .25, sample var (.5625 + 3*.0625)/3 = .25, std .5
    s = math.sqrt(4 / 3)
    want = torch.tensor([[1 / s, -1 / s, 1 / s, -1 / s], [1.5, -0.5, -0.5, -0.5], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(a, want, atol=1e-5, rtol=0)
    assert torch.isfinite(a).all() and (a[2] == 0).all()  # equal rewards: exactly zero, no NaN
    torch.testing.assert_close(grpo.group_advantages(r, normalise_std=False)[1], torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_a_group_of_equal_rewards_has_exactly_zero_advantages():
    """-0.7 (weights 1 and 0.3, both verifiers wrong) is not a dyadic fraction: its mean over 8 is off by a rounding
    step, which the std + eps division would turn into a same-signed advantage for the whole group."""
    r = torch.tensor([[-0.7] * 8, [1.3] * 8, [-0.7] * 7 + [1.3]])
    a = grpo.group_advantages(r)
    assert torch.equal(a[:2], torch.zeros(2, 8)) and (a[2, :7] < 0).all() and a[2, 7] > 0
    assert torch.equal(grpo.group_advantages(r, normalise_std=False)[:2], torch.zeros(2, 8))


def test_group_advantages_rejects_single_completion_groups():
    with pytest.raises(ValueError, match="G >= 2"):
        grpo.group_advantages(torch.ones(3, 1))


def test_token_advantages_broadcast_prompt_major_and_zero_on_padding():
    adv = torch.tensor([[1.0, -1.0], [2.0, -2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
    want = torch.tensor([[1.0, 1, 0], [-1, 0, 0], [2, 2, 2], [0, 0, 0]])
    torch.testing.assert_close(grpo.token_advantages(adv, mask), want)
    with pytest.raises(ValueError, match="4 advantages"):
        grpo.token_advantages(adv, mask[:3])


def _surrogate(ratio, adv, **kw):
    new = torch.tensor(ratio, dtype=torch.float64).log().requires_grad_()
    old = torch.zeros_like(new)
    loss, stats = grpo.clipped_surrogate(new, old, torch.tensor(adv, dtype=torch.float64), torch.ones_like(new), **kw)
    loss.sum().backward()
    return loss.detach(), new.grad, stats


def test_clipped_surrogate_each_regime_hand_values():
    ratio = [[1.1, 1.5, 0.5, 0.5, 1.5, 5.0, math.exp(5)]]
    adv = [[2.0, 1.0, -1.0, 1.0, -1.0, -1.0, -1.0]]
    loss, grad, _ = _surrogate(ratio, adv)
    want = [[-2.2,       # inside the range: -ρA
             -1.28,      # A > 0, ρ above 1 + 0.28: clipped to -(1.28)A
             0.8,        # A < 0, ρ below 1 - 0.2: clipped to -(0.8)A
             -0.5,       # A > 0, ρ low: unclipped (the min picks ρA)
             1.5,        # A < 0, ρ high but below the dual clip: unclipped
             5.0,        # A < 0, ρ = 5 < 10: unclipped
             10.0]]      # A < 0, ρ = e^5 > 10: dual clip caps the loss at 10·|A|
    torch.testing.assert_close(loss, torch.tensor(want, dtype=torch.float64))
    # d(-ρA)/d log ρ = -ρA where unclipped, 0 where a clip is active
    torch.testing.assert_close(grad, torch.tensor([[-2.2, 0, 0, -0.5, 1.5, 5.0, 0]], dtype=torch.float64))


def test_clipped_surrogate_without_dual_clip_is_unbounded():
    loss, grad, stats = _surrogate([[math.exp(5)]], [[-1.0]], dual_clip=None)
    assert loss.item() == pytest.approx(math.exp(5)) and grad.item() == pytest.approx(math.exp(5))
    assert stats["clip_dual"].item() == 0


def test_clip_fraction_stats():
    ratio = [[1.1, 1.5, 0.5, 0.5, 1.5, 5.0, math.exp(5), 1.0]]
    adv = [[2.0, 1.0, -1.0, 1.0, -1.0, -1.0, -1.0, 0.0]]
    _, _, s = _surrogate(ratio, adv)
    assert s["tokens"].item() == 8
    assert s["clip_high"].item() == pytest.approx(1 / 8)
    assert s["clip_low"].item() == pytest.approx(1 / 8)
    assert s["clip_dual"].item() == pytest.approx(1 / 8)
    r = torch.tensor(ratio[0], dtype=torch.float64)
    assert s["ratio_mean"].item() == pytest.approx(r.mean().item())
    assert s["approx_kl"].item() == pytest.approx((r - 1 - r.log()).mean().item())  # k3, >= 0
    assert s["approx_kl"].item() > 0


def test_stats_ignore_padding_and_are_zero_on_policy():
    new = torch.tensor([[-1.0, -2.0, 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, s = grpo.clipped_surrogate(new, new.clone().index_fill_(1, torch.tensor([2]), -9.0), torch.ones(1, 3), mask)
    assert loss[0, 2].item() == 0  # the padded token's ratio e^14 would give a loss; the mask zeroes it
    assert s["tokens"].item() == 2 and s["ratio_mean"].item() == 1.0
    assert s["approx_kl"].item() == 0 and s["clip_high"].item() == 0


def test_bad_clip_settings_are_refused():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="dual_clip must exceed"):
        grpo.clipped_surrogate(x, x, x, x, dual_clip=1.1)
    with pytest.raises(ValueError, match="shapes differ"):
        grpo.clipped_surrogate(x, x, x, torch.zeros(2, 1))


def test_logprobs_fp32_from_bf16_logits_and_entropy():
    torch.manual_seed(0)
    logits = (torch.randn(2, 3, 50) * 4).bfloat16()
    tokens = torch.randint(0, 50, (2, 3))
    lp = grpo.token_logprobs(logits, tokens)
    assert lp.dtype == torch.float32
    want = torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(lp, want, atol=1e-6, rtol=0)
    bf16_path = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0].float()
    assert (bf16_path - want).abs().max() > 1e-4  # the fp32 path is doing something bf16 would not
    ent = grpo.token_entropy(torch.zeros(1, 2, 8).bfloat16())
    assert ent.dtype == torch.float32
    torch.testing.assert_close(ent, torch.full((1, 2), math.log(8)))
    peaked = torch.tensor([[[100.0, 0, 0, 0]]])
    assert grpo.token_entropy(peaked).item() < 1e-6
    with pytest.raises(ValueError, match="do not match tokens"):
        grpo.token_logprobs(logits, tokens[:, :2])


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(11, 8)
        self.out = torch.nn.Linear(8, 11)

    def forward(self, x):
        return self.out(torch.tanh(self.emb(x)))


def _batch(n, t, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 11, (n, t), generator=g)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).float()
    old = -torch.rand(n, t, generator=g) * 3
    adv = torch.randn(n, 1, generator=g).expand(n, t) * mask
    return tokens, mask, old, adv


def _micro_loss(model, batch, global_tokens, world_size=1):
    tokens, mask, old, adv = batch
    new = grpo.token_logprobs(model(tokens), tokens)
    per_token, _ = grpo.clipped_surrogate(new, old, adv, mask)
    return grpo.token_mean(per_token, mask, global_tokens, world_size)


def _pad(batch, t):
    return tuple(torch.nn.functional.pad(x, (0, t - x.shape[1])) for x in batch)


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_token_mean_accumulation_equals_one_big_batch():
    a, b = _batch(3, 5, 1), _batch(2, 9, 2)  # unequal lengths and valid-token counts
    assert grpo.global_token_count([a[1], b[1]]) == int(a[1].sum() + b[1].sum())
    big = tuple(torch.cat(x) for x in zip(_pad(a, 9), b))
    model = _Tiny()
    n = grpo.global_token_count([a[1], b[1]])
    for micro in (a, b):
        _micro_loss(model, micro, n).backward()
    accumulated = _grads(model)
    model.zero_grad()
    _micro_loss(model, big, grpo.global_token_count(big[1])).backward()
    for x, y in zip(accumulated, _grads(model)):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    # the per-micro-batch mean (dividing by each micro-batch's own count) would not match
    model.zero_grad()
    for micro in (a, b):
        (_micro_loss(model, micro, grpo.global_token_count(micro[1])) / 2).backward()
    assert any((x - y).abs().max() > 1e-4 for x, y in zip(_grads(model), accumulated))


def test_token_mean_over_processes_with_averaged_gradients():
    """Two data-parallel ranks whose gradients get averaged (as DDP does) reproduce the big batch."""
    ranks = [_batch(2, 4, 3), _batch(3, 7, 4)]
    n = grpo.global_token_count([r[1] for r in ranks])  # what the all-reduce gives every rank
    per_rank = []
    for r in ranks:
        model = _Tiny()
        _micro_loss(model, r, n, world_size=2).backward()
        per_rank.append(_grads(model))
    averaged = [(x + y) / 2 for x, y in zip(*per_rank)]
    model = _Tiny()
    _micro_loss(model, tuple(torch.cat(x) for x in zip(_pad(ranks[0], 7), ranks[1])), n).backward()
    for x, y in zip(averaged, _grads(model)):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


def test_padding_contributes_nothing():
    tokens, mask, old, adv = _batch(3, 6, 5)
    model = _Tiny()
    n = grpo.global_token_count(mask)
    _micro_loss(model, (tokens, mask, old, adv), n).backward()
    clean = _grads(model)
    model.zero_grad()
    pad = mask == 0
    junk = (tokens.masked_fill(pad, 7), mask, old.masked_fill(pad, -50.0), adv.masked_fill(pad, -1e3))
    loss = _micro_loss(model, junk, n)
    loss.backward()
    for x, y in zip(clean, _grads(model)):
        torch.testing.assert_close(x, y, atol=1e-7, rtol=0)
    assert grpo.token_mean(torch.ones(2, 2), torch.zeros(2, 2), 0).item() == 0  # no valid token: 0, not NaN


def test_global_token_count_all_reduces_when_distributed():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        assert grpo.global_token_count([torch.ones(2, 3), torch.ones(1, 4)]) == 10
    finally:
        dist.destroy_process_group()


def test_optional_kl_and_entropy_terms():
    new = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones(1, 2)
    adv = torch.tensor([[1.0, 1.0]])
    base, stats = grpo.grpo_token_loss(new, new, adv, mask)
    assert "kl_ref" not in stats and "entropy" not in stats  # off by default
    torch.testing.assert_close(base, torch.tensor([[-1.0, -1.0]]))
    ref = new + torch.tensor([[1.0, 0.0]])  # δ = 1: e − 2; δ = 0: 0
    loss, stats = grpo.grpo_token_loss(new, new, adv, mask, kl_coef=0.5, logp_ref=ref,
                                       entropy_coef=0.1, entropy=torch.tensor([[2.0, 3.0]]))
    torch.testing.assert_close(loss, base + torch.tensor([[0.5 * (math.e - 2) - 0.2, -0.3]]))
    assert stats["kl_ref"].item() == pytest.approx((math.e - 2) / 2)
    assert stats["entropy"].item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="logp_ref"):
        grpo.grpo_token_loss(new, new, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="token_entropy"):
        grpo.grpo_token_loss(new, new, adv, mask, entropy_coef=0.1)
