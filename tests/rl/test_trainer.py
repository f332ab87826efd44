"""The `grpo` trainer on a tiny model on the CPU: a few steps write metrics, checkpoints, completions and the figure;
resuming is exact; micro-batching does not change the update; bad input is refused (exit 2); hostile
python_tests completions get the failure reward while training goes on; rollouts record the policy's log-probs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hyloom.blueprint import BlueprintError, load_blueprint
from hyloom.checkpoint import load_safetensors
from hyloom.cli import main
from hyloom.data import prepare
from hyloom.model import build_model
from hyloom.plugins.rl import grpo
from hyloom.plugins.rl import rollout as rollout_module
from hyloom.plugins.rl import trainer as trainer_module
from hyloom.plugins.rl.prompts import PromptSetError
from hyloom.train import RunDir, train

MODEL = {"d_model": 32, "n_layers": 2, "vocab_size": 320, "position": {"type": "hype"},
         "mixers": {"A": {"type": "attention", "heads": 2, "kv_heads": 1}, "L": {"type": "lightning", "heads": 2}},
         "layout": "LA", "ffn": {"type": "swiglu", "hidden": 64}}
# a reward a random model earns sometimes (a digit somewhere), so groups differ and the updates move the weights
DIGIT = {"verifier": {"type": "regex", "pattern": "[0-9]", "correct": 1.0, "wrong": 0.0}, "name": "digit"}
GRPO = {"type": "grpo", "steps": 4, "prompts_per_step": 4, "group_size": 4, "updates_per_step": 2,
        "max_new_tokens": 8, "lr": 3e-3, "warmup": 1, "device": "cpu", "reward_workers": 1,
        "prompts": {"type": "arithmetic", "count": 40, "steps": 1},
        "eval_prompts": {"type": "arithmetic", "count": 6, "steps": 1, "seed": 9},
        "verifiers": [{"verifier": {"type": "math"}}, DIGIT],
        "eval_every": 2, "completions_every": 2, "completions_logged": 3, "save_every": 2, "keep": 10}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("rl-data")


def blueprint(folder: Path, cache: Path, model: dict = MODEL, **train) -> str:
    data = {"model": model,
            "data": {"source": {"type": "arithmetic", "count": 300, "steps": 2},
                     "tokenizer": {"type": "bpe", "vocab_size": 320}, "seq_len": 48, "cache_dir": str(cache)},
            "train": {**GRPO, "out_dir": str(folder / "run"), **train}}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bp.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def run(path, resume=None):
    bp = load_blueprint(path)
    return train(bp, bp.model_dump(mode="json"), resume=resume, progress=False)


def weights(folder: Path) -> dict:
    return load_safetensors(RunDir(folder).latest())


def test_a_few_steps_write_metrics_checkpoints_completions(tmp_path, cache):
    result = run(blueprint(tmp_path, cache))
    out = RunDir(tmp_path / "run")
    assert result["steps"] == 4 and result["checkpoint"] == str(out.path / "checkpoint-000004")
    assert [p.name for p in out.checkpoints()] == ["checkpoint-000002", "checkpoint-000004"]
    assert (out.path / "rewards.png").stat().st_size > 0
    assert (out.latest() / "tokenizer.json").exists()
    metrics = out.metrics()
    assert [r["step"] for r in metrics] == [0, 1, 2, 3, 4]
    assert set(metrics[0]) == {"step", "eval/accuracy", "eval/reward_mean", "eval/response_length_mean"}  # before
    for r in metrics[1:]:
        for key in ("reward_mean", "reward_std", "reward/math", "reward/digit", "accuracy", "response_length_mean",
                    "response_length_max", "clipped", "entropy", "clip_high", "clip_low", "clip_dual", "approx_kl",
                    "grad_norm", "logp_mismatch", "rollout_seconds", "update_seconds", "rollout_tokens_per_s", "lr"):
            assert key in r, key
        assert r["reward_mean"] == pytest.approx(r["reward/math"] + r["reward/digit"], abs=1e-5)  # weights 1 + 1
        assert 0 < r["response_length_mean"] <= r["response_length_max"] <= 8
        assert r["logp_mismatch"] < 1e-4  # fp32: the sampler's log-probs are the training forward's
        assert r["skipped_update"] is False
    assert "eval/accuracy" in metrics[2] and "eval/accuracy" in metrics[4] and "eval/accuracy" not in metrics[3]
    assert any(r["grad_norm"] > 0 for r in metrics[1:])
    rows = [json.loads(line) for line in (out.path / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] * 3 + [2] * 3 + [4] * 3
    assert set(rows[0]) == {"step", "prompt", "completion", "reward", "rewards", "length", "finished", "answer"}
    assert rows[0]["prompt"] == rows[1]["prompt"]  # the first rows are one prompt's group
    assert set(rows[0]["rewards"]) == {"math", "digit"}


def test_resume_is_exact(tmp_path, cache):
    run(blueprint(tmp_path / "whole", cache))
    half = blueprint(tmp_path / "half", cache, steps=2)
    run(half)
    run(blueprint(tmp_path / "half", cache), resume="auto")  # steps back to 4, from checkpoint-000002
    a, b = weights(tmp_path / "whole" / "run"), weights(tmp_path / "half" / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    whole, halves = RunDir(tmp_path / "whole" / "run").metrics(), RunDir(tmp_path / "half" / "run").metrics()
    assert [r["step"] for r in halves] == [r["step"] for r in whole]
    assert [r["reward_mean"] for r in halves[1:]] == [r["reward_mean"] for r in whole[1:]]


def test_kl_to_the_start_and_entropy_bonus_options(tmp_path, cache):
    """kl_coef keeps a frozen copy of the starting weights (saved for resume) and logs the KL to it; both options
    change the update."""
    run(blueprint(tmp_path / "plain", cache, steps=2, eval_prompts=None))
    run(blueprint(tmp_path / "kl", cache, steps=1, eval_prompts=None, kl_coef=0.5, entropy_coef=0.01, save_every=1))
    out = RunDir(tmp_path / "kl" / "run")
    assert (out.path / "reference.safetensors").exists()
    first = out.metrics()[-1]["kl_ref"]  # the first update starts at the reference, the second one step away
    run(blueprint(tmp_path / "kl", cache, steps=2, eval_prompts=None, kl_coef=0.5, entropy_coef=0.01), resume="auto")
    assert 0 < first < out.metrics()[-1]["kl_ref"]
    a, b = weights(tmp_path / "plain" / "run"), weights(out.path)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_micro_batches_give_the_same_update(tmp_path, cache):
    """The loss is normalised by the mini-batch's token count, so accumulating micro-batches of any lengths is one
    big batch (up to float summation order)."""
    run(blueprint(tmp_path / "big", cache, steps=1, eval_prompts=None))
    run(blueprint(tmp_path / "micro", cache, steps=1, eval_prompts=None, micro_batch=3))
    a, b = weights(tmp_path / "big" / "run"), weights(tmp_path / "micro" / "run")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)  # Adam: 1e-5 is 0.3% of one step (lr)
    # Adam's first step hides a uniform scale of the gradient; its norm (before clipping) does not
    norms = [RunDir(tmp_path / name / "run").metrics()[-1]["grad_norm"] for name in ("big", "micro")]
    assert norms[1] == pytest.approx(norms[0], rel=1e-5) and norms[0] > 0


def test_compiled_updates_give_the_eager_weights(tmp_path, cache, monkeypatch, capsys):
    """`compile: true` compiles each block for the updates (aot_eager on CPU: tracing and autograd, no code
    generation) with symbolic shapes: micro-batches of several row counts and lengths share one graph, none
    broken, and the weights after a step equal the eager run's. Attention blocks only: on CPU Lightning runs its
    PyTorch reference, whose Python loop over chunks specialises on the length (on a GPU its Triton kernels are
    opaque custom ops)."""
    from torch._dynamo.utils import counters

    from hyloom.plugins.train import lm
    monkeypatch.setattr(lm, "COMPILE_BACKEND", "aot_eager")
    dense = {**MODEL, "position": {"type": "rope"}, "layout": "AA"}
    run(blueprint(tmp_path / "eager", cache, model=dense, steps=1, eval_prompts=None, micro_batch=5))
    torch._dynamo.reset()
    counters.clear()
    run(blueprint(tmp_path / "compiled", cache, model=dense, steps=1, eval_prompts=None, micro_batch=5,
                  compile=True))
    assert ", compiled" in capsys.readouterr().out
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()
    a, b = weights(tmp_path / "eager" / "run"), weights(tmp_path / "compiled" / "run")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)


def test_bad_input_is_refused_with_exit_2(tmp_path, cache, capsys):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": "2 + 2?"}) + "\n")
    cases = {
        "missing": ({"prompts": {"type": "jsonl", "path": str(jsonl)}}, "p.jsonl:1: the record needs 'answer' or 'tests'"),
        "tests": ({"prompts": {"type": "arithmetic", "count": 4},
                   "verifiers": [{"verifier": {"type": "python_tests"}}]},
                  "record 0 has no field 'tests', which verifier 'python_tests'"),
        "unregistered": ({"verifiers": [{"verifier": {"type": "maths"}}]}, "train.verifiers.0.verifier"),
        "group": ({"group_size": 1}, "GRPO needs group_size >= 2"),
    }
    for name, (train_cfg, message) in cases.items():
        path = blueprint(tmp_path / name, cache, **train_cfg)
        assert main(["train", path, "--no-progress"]) == 2, name
        err = capsys.readouterr().err
        assert message in err, (name, err)
        assert not (tmp_path / name / "run" / "metrics.jsonl").exists()  # refused before any work
    with pytest.raises(BlueprintError, match="maths"):
        load_blueprint(blueprint(tmp_path / "again", cache, verifiers=[{"verifier": {"type": "maths"}}]))
    with pytest.raises(PromptSetError):
        run(blueprint(tmp_path / "again2", cache, prompts={"type": "jsonl", "path": str(jsonl)}))


HOSTILE = {
    "loop": "while True:\n    pass\n",
    "fork": "import os\nwhile True:\n    os.fork()\n",
    "memory": "x = bytearray(1 << 40)\n",
    "exit": "import os\nos._exit(0)\n",
    "correct": "def double(x):\n    return 2 * x\n",
}


def test_hostile_python_completions_get_the_failure_reward(tmp_path, cache, monkeypatch):
    prompts = tmp_path / "code.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Write double ({i}).", "tests": ["assert double(3) == 6"]}) + "\n"
                               for i in range(4)))
    texts = list(HOSTILE.values())
    real = rollout_module.sample_completions

    def scripted(model, prompts, **kw):
        """The real rollout, with each row's tokens replaced by one of the scripted programs."""
        roll = real(model, prompts, **kw)
        tok = trainer_module_tokenizer[0]
        ids = [tok.encode(texts[i % len(texts)]) + [kw["eos_id"]] for i in range(len(prompts))]
        T = max(map(len, ids))
        roll.tokens_NT = torch.full((len(ids), T), kw["eos_id"], dtype=torch.long)
        roll.mask_NT = torch.zeros(len(ids), T)
        for row, x in enumerate(ids):
            roll.tokens_NT[row, :len(x)] = torch.tensor(x)
            roll.mask_NT[row, :len(x)] = 1
        roll.logp_NT = torch.zeros(len(ids), T)
        roll.finished_N = torch.ones(len(ids), dtype=torch.bool)
        return roll

    trainer_module_tokenizer = []
    real_fit = trainer_module.GrpoTrainer.fit

    def fit(self, model, data, run):
        trainer_module_tokenizer.append(data.tokenizer)
        return real_fit(self, model, data, run)

    monkeypatch.setattr(trainer_module, "sample_completions", scripted)
    monkeypatch.setattr(trainer_module.GrpoTrainer, "fit", fit)
    path = blueprint(tmp_path, cache, steps=2, eval_prompts=None, group_size=5, prompts_per_step=2,
                     updates_per_step=1, completions_logged=5, completions_every=1,
                     prompts={"type": "jsonl", "path": str(prompts)},
                     verifiers=[{"verifier": {"type": "python_tests", "timeout_s": 2.0, "cpu_s": 2}}])
    result = run(path)
    assert result["steps"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 10
    by_text = {r["completion"]: r["reward"] for r in rows}
    for name, text in HOSTILE.items():
        assert by_text[text] == (1.0 if name == "correct" else -1.0), name
    metrics = RunDir(tmp_path / "run").metrics()
    assert metrics[-1]["accuracy"] == pytest.approx(0.2)
    assert metrics[-1]["grad_norm"] > 0  # the correct completion's group trained on


@pytest.mark.parametrize("layout", ["LA", "AA"])
def test_sampler_logprobs_equal_the_training_forward(layout):
    """Left-padded rollouts through the decode cache give the tokens the plain training forward would score the
    same (fp32), for attention and Lightning layers."""
    from hyloom.blueprint import blueprint_model

    torch.manual_seed(0)
    spec = blueprint_model().model_validate({"model": {**MODEL, "layout": layout}})
    model = build_model(spec)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    gen = torch.Generator().manual_seed(1)
    roll = rollout_module.sample_completions(model, prompts, max_new_tokens=6, temperature=1.0, eos_id=3,
                                             generator=gen, batch=2)
    assert roll.tokens_NT.shape[0] == 3 and roll.mask_NT[:, 0].all()
    logits = rollout_module.completion_logits(model, roll)
    logp = grpo.token_logprobs(logits, roll.tokens_NT) * roll.mask_NT
    torch.testing.assert_close(logp, roll.logp_NT, atol=1e-5, rtol=0)
    # each row on its own, unpadded, scores its tokens the same
    for row, prompt in enumerate(prompts):
        n = int(roll.mask_NT[row].sum())
        ids = torch.tensor([prompt + roll.tokens_NT[row, :n].tolist()])
        alone = torch.log_softmax(model(ids)[0, len(prompt) - 1:-1].float(), -1)
        picked = alone.gather(-1, roll.tokens_NT[row, :n, None])[:, 0]
        torch.testing.assert_close(picked, roll.logp_NT[row, :n], atol=1e-5, rtol=0)


def test_rollout_allocates_its_cache_once_and_stops_soon_after_every_row_ended(monkeypatch):
    """The cache holds prompt + max_new_tokens from the prefill on (growing it mid-rollout would recapture the
    decode graphs); once every row has drawn EOS the rollout stops at the next check and is trimmed to the
    longest row."""
    from hyloom.blueprint import blueprint_model
    from hyloom.model import ModelCache

    torch.manual_seed(0)
    model = build_model(blueprint_model().model_validate({"model": {**MODEL, "layout": "LA"}}))
    draws, real_draw = [], rollout_module._draw

    end = 20  # every row ends with its 20th token, past the 16 slots a cache sized for the prompt would have

    def eos_at_end(logits, temperature, generator):
        token, logp = real_draw(logits, temperature, generator)
        draws.append(token)
        return (torch.full_like(token, 3) if len(draws) == end else torch.where(token == 3, 4, token)), logp

    grown, real_reserve = [], ModelCache.reserve

    def reserve(cache, tokens):
        grown.extend([tokens] if cache.capacity and tokens > cache.capacity else [])
        real_reserve(cache, tokens)

    monkeypatch.setattr(rollout_module, "_draw", eos_at_end)
    monkeypatch.setattr(ModelCache, "reserve", reserve)
    roll = rollout_module.sample_completions(model, [[5, 6, 7], [8, 9]], max_new_tokens=40, temperature=1.0,
                                             eos_id=3, generator=torch.Generator().manual_seed(1))
    assert grown == []
    every = rollout_module.DONE_CHECK_EVERY
    assert len(draws) == -(-end // every) * every
    assert roll.tokens_NT.shape[1] == end and roll.finished_N.all() and (roll.tokens_NT[:, -1] == 3).all()
    assert roll.mask_NT.sum().item() == 2 * end


def test_completion_ids_drop_only_a_final_eos():
    """What the verifiers read: each row's sampled tokens up to its length, without the EOS that ended it; a row cut
    at max_new_tokens keeps every token."""
    eos, pad = 3, 0
    tokens = torch.tensor([[7, 8, eos, pad], [9, eos, pad, pad], [5, 6, 7, 8]])
    mask = (torch.arange(4) < torch.tensor([[3], [2], [4]])).float()
    roll = rollout_module.Rollout(torch.ones(3, 1, dtype=torch.long), torch.ones(3, 1, dtype=torch.bool), tokens,
                                  mask, torch.zeros(3, 4), torch.tensor([True, True, False]), 0.0)
    assert roll.completion_ids(eos) == [[7, 8], [9], [5, 6, 7, 8]]


def test_only_verifiers_that_wait_are_scored_on_threads(monkeypatch):
    """A thread pool around verifiers that only compute would add its overhead and no parallelism (the GIL);
    python_tests waits on a sandbox process per completion, so its completions are scored on reward_workers threads."""
    from hyloom.plugins.rl.config import GrpoConfig

    pools = []

    class Counting(trainer_module.ThreadPoolExecutor):
        def __init__(self, workers):
            pools.append(workers)
            super().__init__(workers)

    monkeypatch.setattr(trainer_module, "ThreadPoolExecutor", Counting)
    record = {"prompt": "2 + 2", "answer": "4", "tests": ["assert f() == 4"]}
    compute = trainer_module.Scorer(GrpoConfig(verifiers=[{"verifier": {"type": "math"}}, DIGIT]))
    rewards, accurate = compute([record] * 3, ["\\boxed{4}", "\\boxed{5}", "x"])
    assert pools == [] and accurate.tolist() == [True, False, False]
    waiting = trainer_module.Scorer(GrpoConfig(verifiers=[{"verifier": {"type": "python_tests"}}], reward_workers=3))
    rewards, accurate = waiting([record] * 2, ["def f():\n    return 4", "def f():\n    return 5"])
    assert pools == [3] and accurate.tolist() == [True, False]


def test_sft_documents_continue_the_grpo_prompt(cache):
    """The arithmetic data source writes the prompt exactly as the trainer shows it, then the worked solution, so
    the boxed answer is what the math verifier reads."""
    from hyloom.plugins.rl.config import ArithmeticSourceConfig, GrpoConfig
    from hyloom.plugins.rl.prompts import ArithmeticSource, arithmetic
    from hyloom.plugins.rl.verifiers import build_verifier

    cfg = ArithmeticSourceConfig(count=20, steps=3, min_steps=1, seed=4)
    docs = list(ArithmeticSource(cfg))
    records = arithmetic(cfg)
    template = GrpoConfig().prompt_template
    math = build_verifier({"type": "math"})
    assert {r["steps"] for r in records} == {1, 2, 3}
    for doc, record in zip(docs, records):
        head = template.format(prompt=record["prompt"])
        assert doc["text"].startswith(head)
        solution = doc["text"][len(head):]
        assert len(solution.splitlines()) == record["steps"] + 1
        assert math(record, solution).reward == 1.0
    prepared = prepare({"source": {"type": "arithmetic", "count": 300, "steps": 2},
                        "tokenizer": {"type": "bpe", "vocab_size": 320}, "seq_len": 48, "cache_dir": str(cache)},
                       progress=False)
    assert prepared.tokenizer.vocab_size <= MODEL["vocab_size"]


@pytest.mark.slow
def test_two_processes(tmp_path, cache):
    """Under torchrun (gloo, 2 CPU processes) each process samples its half of the prompts; the run finishes with
    every metric, and DDP keeps one set of weights."""
    path = blueprint(tmp_path, cache)
    run(blueprint(tmp_path / "prepare", cache, steps=1, eval_prompts=None))  # the data cache, built once
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "hyloom", "train", path, "--no-progress"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = RunDir(tmp_path / "run").metrics()
    assert [r["step"] for r in metrics] == [0, 1, 2, 3, 4]
    assert all(r["prompts"] == 4 * r["step"] for r in metrics[1:])


def test_held_out_prompts_are_left_out_of_training():
    """One-operation problems repeat across seeds: the held-out set stays whole, the training set loses them."""
    from hyloom.plugins.rl.config import GrpoConfig

    cfg = GrpoConfig(prompts={"type": "arithmetic", "count": 400, "steps": 1},
                     eval_prompts={"type": "arithmetic", "count": 50, "steps": 1, "seed": 9})
    trainer = trainer_module.GrpoTrainer(cfg)
    train_set, held = trainer.records()
    assert len(held) == 50 and trainer.dropped > 0 and len(train_set) == 400 - trainer.dropped
    assert not {r["prompt"] for r in train_set} & {r["prompt"] for r in held}
    everything = GrpoConfig(prompts={"type": "arithmetic", "count": 5, "steps": 1},
                            eval_prompts={"type": "arithmetic", "count": 5, "steps": 1})
    with pytest.raises(PromptSetError, match="every training prompt is also a held-out prompt"):
        trainer_module.GrpoTrainer(everything).records()


def test_a_batch_without_mixed_rewards_takes_no_optimizer_step(tmp_path, cache, capsys):
    """Every completion earns the same reward: no group carries a gradient, and AdamW's momentum and weight decay
    must not move the weights anyway. The rows say so and leave out the update metrics (a 0.0 loss or gradient
    norm would pass for a measurement) but keep the rollout's."""
    same = {"verifier": {"type": "regex", "pattern": "^", "correct": 1.0, "wrong": 0.0}, "name": "always"}
    run(blueprint(tmp_path, cache, steps=2, save_every=1, eval_prompts=None, verifiers=[same], weight_decay=0.1))
    out = RunDir(tmp_path / "run")
    first, second = (load_safetensors(out.path / f"checkpoint-00000{i}") for i in (1, 2))
    assert all(torch.equal(first[k], second[k]) for k in first)
    metrics = out.metrics()
    assert [r["skipped_update"] for r in metrics] == [True, True]
    update = {"loss", "grad_norm", "grad_norm_max", "clip_high", "clip_low", "clip_dual", "approx_kl", "ratio_mean"}
    for r in metrics:
        assert not update & set(r), update & set(r)
        assert r["groups_all_same"] == 1.0 and r["reward_mean"] == 1.0 and r["entropy"] > 0
        assert {"accuracy", "response_length_mean", "rollout_seconds", "rollout_tokens_per_s"} <= set(r)
    assert capsys.readouterr().out.count("no update (no mixed rewards)") == 2  # the --no-progress line
