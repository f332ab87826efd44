"""The `lm` trainer: it learns, resumes exactly, stops on a non-finite loss, saves atomically, runs under torchrun."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import hyloom.checkpoint
from hyloom.blueprint import load_blueprint
from hyloom.checkpoint import load_checkpoint, load_safetensors
from hyloom.cli import main
from hyloom.plugins.train import lm
from hyloom.plugins.train.schedule import learning_rate
from hyloom.train import RunDir, TrainingError, train


def blueprint(tmp_path: Path, cache: Path, **train) -> str:
    data = {
        "model": {"d_model": 32, "n_layers": 2, "vocab_size": 512, "position": {"type": "hype"},
                  "mixers": {"A": {"type": "attention", "heads": 2, "kv_heads": 1},
                             "L": {"type": "lightning", "heads": 2}},
                  "layout": "LA", "ffn": {"type": "swiglu", "hidden": 64}},
        "data": {"source": {"type": "stdlib", "max_bytes": 400_000}, "tokenizer": {"type": "bpe", "vocab_size": 512},
                 "seq_len": 32, "cache_dir": str(cache)},
        "train": {"type": "lm", "steps": 8, "batch_size": 4, "lr": 3e-3, "warmup": 2, "eval_every": 4,
                  "eval_batches": 2, "save_every": 2, "keep": 10, "log_every": 1, "out_dir": str(tmp_path / "run"),
                  "sample_tokens": 0, **train},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "bp.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


def run(path, resume=None, overrides=()):
    bp = load_blueprint(path, overrides)
    return train(bp, bp.model_dump(mode="json"), resume=resume, progress=False)


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in RunDir(run_dir).metrics()]


def test_training_learns_and_writes_its_outputs(tmp_path, cache, capsys):
    path = blueprint(tmp_path, cache, steps=30, lr=1e-2, eval_every=10, save_every=10, sample_tokens=8)
    # (beating the unigram baseline takes longer: the README's run of builtin:tiny shows it)
    assert main(["train", path, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "unigram baseline" in out and "sample:" in out
    run_dir = tmp_path / "run"
    metrics = RunDir(run_dir).metrics()
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5
    assert [r["step"] for r in metrics if "eval_loss" in r] == [10, 20, 30]
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    latest = run_dir / (run_dir / "latest").read_text()
    assert latest.name == "checkpoint-000030" and (latest / "tokenizer.json").exists()
    model, bp = load_checkpoint(latest)
    assert bp.model.layout == ["L", "A"]
    assert main(["generate", str(latest), "--prompt", "def ", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def test_resume_continues_exactly(tmp_path, cache, monkeypatch):
    straight = blueprint(tmp_path / "a", cache)
    run(straight)
    broken = blueprint(tmp_path / "b", cache)
    calls = {"n": 0}
    real = lm.lm_loss

    def crash_at_step_6(model, batch):
        calls["n"] += model.training  # count training steps, not evaluation batches
        if calls["n"] == 6 and model.training:
            raise KeyboardInterrupt("the machine went away")
        return real(model, batch)

    monkeypatch.setattr(lm, "lm_loss", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        run(broken)
    monkeypatch.setattr(lm, "lm_loss", real)
    assert RunDir(tmp_path / "b" / "run").latest().name == "checkpoint-000004"
    run(broken, resume="auto")
    assert losses(tmp_path / "b" / "run") == losses(tmp_path / "a" / "run")
    final_a = load_safetensors(tmp_path / "a" / "run" / "checkpoint-000008")
    final_b = load_safetensors(tmp_path / "b" / "run" / "checkpoint-000008")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_resuming_into_another_model_is_refused(tmp_path, cache):
    path = blueprint(tmp_path, cache, steps=2)
    run(path)
    with pytest.raises(TrainingError, match="model differs in model.d_model"):
        run(path, resume="auto", overrides=["model.d_model=48"])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, cache, monkeypatch):
    path = blueprint(tmp_path, cache)
    calls = {"n": 0}
    real = lm.lm_loss

    def nan_at_step_5(model, batch):
        calls["n"] += model.training
        loss = real(model, batch)
        return loss * float("nan") if calls["n"] == 5 and model.training else loss

    monkeypatch.setattr(lm, "lm_loss", nan_at_step_5)
    with pytest.raises(TrainingError, match="step 5: the loss is nan.*checkpoint-000004"):
        run(path)
    calls["n"] = 0
    assert main(["train", path, "--no-progress"]) == 1  # the same through the CLI: a message, status 1
    load_checkpoint(RunDir(tmp_path / "run").latest())


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, cache, monkeypatch):
    path = blueprint(tmp_path, cache)
    real = hyloom.checkpoint.save_safetensors
    calls = {"n": 0}

    def dies_on_second_save(folder, state, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] < 2:
            return real(folder, state, *args, **kwargs)
        real(folder, dict(list(state.items())[:3]), *args, **kwargs)  # part of the weights are written...
        raise OSError("disk full")  # ...then the writer dies

    monkeypatch.setattr(hyloom.checkpoint, "save_safetensors", dies_on_second_save)
    with pytest.raises(OSError, match="disk full"):
        run(path)
    run_dir = RunDir(tmp_path / "run")
    assert [p.name for p in run_dir.checkpoints()] == ["checkpoint-000002"]
    assert run_dir.latest().name == "checkpoint-000002"
    assert not [p for p in run_dir.path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    model, _ = load_checkpoint(run_dir.latest())
    assert model.num_parameters() > 0


def test_two_processes_match_one(tmp_path, cache):
    one = blueprint(tmp_path / "one", cache)
    run(one)
    two = blueprint(tmp_path / "two", cache)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "hyloom", "train", two, "--no-progress"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = losses(tmp_path / "one" / "run"), losses(tmp_path / "two" / "run")
    assert [s for s, _ in a] == [s for s, _ in b]
    for (_, x), (_, y) in zip(a, b):
        assert y == pytest.approx(x, rel=1e-4)


def test_learning_rate_schedules():
    kw = dict(lr=1.0, steps=100, warmup=10, min_lr_ratio=0.1, decay_fraction=0.2)
    assert learning_rate(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert learning_rate(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert learning_rate(99, schedule="cosine", **kw) == pytest.approx(0.1, abs=1e-3)
    assert learning_rate(55, schedule="cosine", **kw) == pytest.approx(0.55)
    assert learning_rate(79, schedule="wsd", **kw) == 1.0
    assert learning_rate(99, schedule="wsd", **kw) == pytest.approx(0.1)
    assert learning_rate(89, schedule="wsd", **kw) == pytest.approx(0.55)
    assert learning_rate(50, schedule="constant", **kw) == 1.0
