"""GRPO pushes the policy toward what the verifier rewards, on a tiny random model on the CPU.

The reward depends on the first completion token alone (does the completion start with a space or a lowercase
letter?), which a random model samples about a quarter of the time, so most groups are mixed and the model's
probability of that first token, read straight from its logits, measures what the updates did. A flipped sign,
advantages given to the wrong completions or mini-batch rows mixed up with other rows' advantages leave it flat
or push it the wrong way (checked by hand against each of those faults: 0.25 -> 0.02, 0.17, 0.28). An
off-by-one logit alignment is caught by test_trainer's test_sampler_logprobs_equal_the_training_forward instead:
the first-token reward still rises under it (a random model's next-token distribution barely depends on
position)."""

import contextlib
import re
from types import SimpleNamespace

import pytest
import torch
import yaml

from hyloom.blueprint import blueprint_model, load_blueprint
from hyloom.checkpoint import load_safetensors
from hyloom.data import prepare
from hyloom.model import build_model
from hyloom.plugins.rl import grpo
from hyloom.plugins.rl.config import GrpoConfig
from hyloom.plugins.rl.rollout import sample_completions
from hyloom.plugins.rl.trainer import GrpoTrainer
from hyloom.train import RunDir, param_groups, train

MODEL = {"d_model": 32, "n_layers": 2, "vocab_size": 320, "position": {"type": "hype"},
         "mixers": {"A": {"type": "attention", "heads": 2, "kv_heads": 1}, "L": {"type": "lightning", "heads": 2}},
         "layout": "LA", "ffn": {"type": "swiglu", "hidden": 64}}
# with this tokenizer the first character of a decoded completion is in the class exactly when the first token's
# own text starts with it (no byte token completes to an ASCII character), so the reward is a first-token choice
FIRST = "^[ a-z]"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("rl-learning-data")


def first_token_blueprint(folder, cache, correct: float, wrong: float):
    data = {"model": MODEL,
            "data": {"source": {"type": "arithmetic", "count": 300, "steps": 2},
                     "tokenizer": {"type": "bpe", "vocab_size": 320}, "seq_len": 48, "cache_dir": str(cache)},
            "train": {"type": "grpo", "steps": 25, "prompts_per_step": 4, "group_size": 8, "updates_per_step": 2,
                      "micro_batch": 6, "max_new_tokens": 4, "lr": 1e-2, "warmup": 1, "device": "cpu",
                      "reward_workers": 1, "prompts": {"type": "arithmetic", "count": 40, "steps": 1},
                      "verifiers": [{"verifier": {"type": "regex", "pattern": FIRST, "correct": correct,
                                                  "wrong": wrong}}],
                      "save_every": 1000, "completions_logged": 0, "out_dir": str(folder / "run")}}
    path = folder / "bp.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_blueprint(str(path))


@torch.no_grad()
def first_token_probability(model, prompt_ids: list[list[int]], chosen_V: torch.Tensor) -> float:
    """Mean over prompts of the model's probability (temperature 1, as the rollouts) that the completion's first
    token is one of `chosen_V`."""
    total = 0.0
    for ids in prompt_ids:
        probs_V = torch.softmax(model(torch.tensor([ids]))[0, -1].float(), -1)
        total += float(probs_V[chosen_V].sum())
    return total / len(prompt_ids)


@pytest.mark.parametrize("rewarded", [True, False], ids=["rewarded", "penalised"])
def test_grpo_moves_the_first_token_toward_the_reward(tmp_path, cache, rewarded):
    """Rewarding the first-token class must raise its probability far above the start, penalising it must drive it
    towards zero; random drift (no signal) moves it by up to about ±0.15 in this many steps. Seen: 0.25 -> 0.97 and
    0.25 -> 0.02."""
    bp = first_token_blueprint(tmp_path, cache, correct=1.0 if rewarded else 0.0, wrong=0.0 if rewarded else 1.0)
    tokenizer = prepare(bp.data, progress=False).tokenizer
    chosen_V = torch.tensor([bool(re.search(FIRST, tokenizer.decode([v]))) for v in range(MODEL["vocab_size"])])
    records = GrpoTrainer(bp.train).records()[0]
    prompt_ids = [tokenizer.encode(bp.train.prompt_template.format(prompt=r["prompt"])) for r in records]

    torch.manual_seed(bp.train.seed)  # the weights train() starts from
    model = build_model(bp)
    before = first_token_probability(model, prompt_ids, chosen_V)
    train(bp, bp.model_dump(mode="json"), progress=False)
    model.load_state_dict(load_safetensors(RunDir(tmp_path / "run").latest()))
    after = first_token_probability(model, prompt_ids, chosen_V)

    assert 0.15 < before < 0.35  # mixed groups from the start
    if rewarded:
        assert after > 0.7, (before, after)
    else:
        assert after < 0.05, (before, after)
    rewards = [r["reward_mean"] for r in RunDir(tmp_path / "run").metrics()]  # rewards are 0 or 1
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert 1 - last < (1 - first) / 2, rewards  # the unrewarded share of the samples at least halves


def test_one_update_raises_positive_advantage_completions_and_lowers_negative_ones():
    """The trainer's own step pieces on fixed rollouts (left-padded prompts of several lengths, shuffled
    mini-batches, micro-batches that split them): every completion with A > 0 gains log-probability and every one
    with A < 0 loses some, each scored afterwards on its own, unpadded, by the plain forward."""
    torch.manual_seed(0)
    model = build_model(blueprint_model().model_validate({"model": MODEL}))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    G = 4
    roll = sample_completions(model, [p for p in prompts for _ in range(G)], max_new_tokens=5, temperature=1.0,
                              eos_id=3, generator=torch.Generator().manual_seed(1))
    rewards_BG = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    cfg = GrpoConfig(lr=1e-3, updates_per_step=2, micro_batch=5, warmup=0)
    trainer = GrpoTrainer(cfg)
    adv_BG = grpo.group_advantages(rewards_BG)
    adv_NT = grpo.token_advantages(adv_BG, roll.mask_NT)

    @torch.no_grad()
    def completion_logprob(row: int) -> float:
        prompt, n = prompts[row // G], int(roll.mask_NT[row].sum())
        ids = torch.tensor([prompt + roll.tokens_NT[row, :n].tolist()])
        logp = torch.log_softmax(model(ids)[0, len(prompt) - 1:-1].float(), -1)
        return float(logp.gather(-1, roll.tokens_NT[row, :n, None]).sum())

    N = len(roll.finished_N)
    before = [completion_logprob(n) for n in range(N)]
    model.train()
    old, _, _ = trainer._old_logprobs(model, roll, None, contextlib.nullcontext)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    trainer._update(model, opt, roll, old, None, adv_NT, 0, SimpleNamespace(world=1, rank=0), contextlib.nullcontext)
    model.eval()
    change = torch.tensor([completion_logprob(n) for n in range(N)]) - torch.tensor(before)
    adv_N = adv_BG.reshape(-1)
    assert (change[adv_N > 0] > 0).all() and (change[adv_N < 0] < 0).all(), (adv_N, change)
