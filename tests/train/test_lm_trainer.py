"""The `lm` trainer: it learns, resumes exactly, stops on a non-finite loss, saves atomically, runs under torchrun;
it refuses what it cannot do (a bidirectional model, a used run directory, a missing device) before any work."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import hyloom
import hyloom.checkpoint
from hyloom.blueprint import load_blueprint
from hyloom.checkpoint import load_checkpoint, load_safetensors
from hyloom.cli import main
from hyloom.plugins.train import lm
from hyloom.plugins.train.schedule import learning_rate
from hyloom.train import RunDir, SetupError, TrainingError, train


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
    assert main(["train", path, "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "unigram baseline" in out and "sample:" in out
    # the startup summary, then a line per logged step in place of the progress bar
    assert re.search(r"model +53,472 parameters on cpu \(1 process\), fp32", out)
    assert re.search(r"data +[\d,]+ training tokens, [\d,]+ held out, vocab 512, seq_len 32", out)
    assert "from step 0" in out
    assert re.findall(r"^step (\d+)/30 +loss", out, re.M) == [str(i) for i in range(1, 31)]  # log_every: 1
    run_dir = tmp_path / "run"
    metrics = RunDir(run_dir).metrics()
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5
    assert [r["step"] for r in metrics if "eval_loss" in r] == [10, 20, 30]
    from matplotlib.image import imread

    assert imread(run_dir / "loss.png").shape[:2] == (630, 1050)  # matplotlib's figure: 7 x 4.2 in at 150 dpi
    latest = run_dir / (run_dir / "latest").read_text()
    assert latest.name == "checkpoint-000030" and (latest / "tokenizer.json").exists()
    model, bp = load_checkpoint(latest)
    assert bp.model.layout == ["L", "A"]
    greedy = ["--prompt", "def ", "--max-new-tokens", "12", "--temperature", "0"]
    assert main(["generate", str(latest)] + greedy) == 0
    text = capsys.readouterr().out
    assert text.startswith("def ")
    # a run directory means its newest checkpoint, on the device asked for
    assert main(["generate", str(run_dir), "--device", "cpu"] + greedy) == 0
    out, err = capsys.readouterr()
    assert out == text and err.startswith(f"checkpoint: {latest}\nsampler ar: 12 forward passes (NFE)")
    # --stop ends each continuation before the first stop string (here a character from its middle)
    new = text[len("def "):-1]
    assert len(new) >= 3
    stop = new[len(new) // 2]
    assert main(["generate", str(run_dir), "--stop", stop] + greedy) == 0
    assert capsys.readouterr().out == "def " + new[:new.index(stop)] + "\n"


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
    with pytest.raises(SetupError, match="model differs in model.d_model"):
        run(path, resume="auto", overrides=["model.d_model=48"])


def test_a_used_run_directory_needs_resume_or_overwrite(tmp_path, cache, capsys):
    # no TensorBoard folder, whether or not it is installed (the GPU image has it): the listing below is exact
    path = blueprint(tmp_path, cache, steps=2, eval_every=2, tensorboard=False)
    assert main(["train", path, "--no-progress"]) == 0
    run_dir = tmp_path / "run"
    (run_dir / "notes.txt").write_text("mine")
    before = RunDir(run_dir).metrics()
    capsys.readouterr()
    assert main(["train", path, "--no-progress"]) == 2  # not a silent rewind of `latest` and a mixed metrics.jsonl
    err = capsys.readouterr().err
    assert "already holds a run (checkpoint-000002, latest, loss.png, metrics.jsonl)" in err
    assert "--resume auto" in err and "--overwrite" in err and "Traceback" not in err
    assert RunDir(run_dir).metrics() == before
    with pytest.raises(SystemExit, match="2"):
        main(["train", path, "--overwrite", "--resume", "auto"])
    assert "--resume: not allowed with argument --overwrite" in capsys.readouterr().err
    # --overwrite starts clean: one run's metrics, new checkpoints, the user's own files left alone
    assert main(["train", path, "--no-progress", "--overwrite", "train.steps=3", "train.save_every=3"]) == 0
    assert [r["step"] for r in RunDir(run_dir).metrics()] == [1, 2, 3]
    assert [p.name for p in RunDir(run_dir).checkpoints()] == ["checkpoint-000003"]
    assert (run_dir / "notes.txt").read_text() == "mine"


def test_resume_with_other_steps_says_what_the_schedule_does(tmp_path, cache, capsys):
    path = blueprint(tmp_path, cache, steps=4, eval_every=4, save_every=4, log_every=2)
    assert main(["train", path, "--no-progress"]) == 0
    capsys.readouterr()
    # the README's form: an override after an option
    assert main(["train", path, "--resume", "auto", "train.steps=6", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resuming from checkpoint-000004 at step 4" in out
    kw = dict(lr=3e-3, warmup=2, schedule="cosine", min_lr_ratio=0.1, decay_fraction=0.2)
    said = re.search(r"resume: train.steps 4 -> 6\. The cosine schedule is recomputed .* the LR goes from (\S+) "
                     r"\(step 4\) to (\S+) \(step 5\) and ends at (\S+) \(step 6\)", out)
    assert said, out
    assert [float(x) for x in said.groups()] == pytest.approx(
        [learning_rate(3, steps=4, **kw), learning_rate(4, steps=6, **kw), learning_rate(5, steps=6, **kw)], rel=1e-2)
    assert re.findall(r"^step (\d+)/6 ", out, re.M) == ["6"]  # a line every log_every (2) steps
    assert [r["step"] for r in RunDir(tmp_path / "run").metrics()] == [2, 4, 6]
    assert main(["train", path, "--resume", "auto", "train.steps=6", "--no-progress"]) == 2
    assert "is at step 6, and train.steps is 6: nothing left to train" in capsys.readouterr().err


def test_bidirectional_models_are_refused_by_train_and_generate(tmp_path, cache, capsys):
    fresh_cache = tmp_path / "cache"
    path = blueprint(tmp_path, fresh_cache)
    assert main(["train", path, "model.causal=false", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "model.causal: false, but the lm trainer predicts each next token" in err
    assert "sees that token" in err and "Traceback" not in err
    assert not fresh_cache.exists()  # refused before any data was prepared
    # a bidirectional checkpoint (made by hand: no trainer writes one) cannot be sampled from
    bp = load_blueprint(path, ["model.causal=false"])
    ckpt = hyloom.checkpoint.save_checkpoint(tmp_path / "bidir", hyloom.build_model(bp), bp.model_dump(mode="json"),
                                             extra_files={"tokenizer.json": "{}"})
    assert main(["generate", str(ckpt), "--prompt", "def ", "--sampler", "ar"]) == 2
    assert "model.causal: cannot generate with the ar sampler: model.causal is false" in capsys.readouterr().err
    with pytest.raises(ValueError, match="model.causal is false"):
        hyloom.build_model(bp).generate([[1, 2]])


@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda:99"], "train.device: 'cuda:99', but"),  # no such GPU, on any machine
    (["train.device=gpu"], "train.device: String should match pattern"),
])
def test_a_bad_device_is_refused_before_any_work(tmp_path, argv, message, capsys):
    path = blueprint(tmp_path, tmp_path / "cache")
    assert main(["train", path, "--no-progress"] + argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_warmup_longer_than_the_run_warns(tmp_path, cache, capsys):
    path = blueprint(tmp_path, cache, steps=2, warmup=5, eval_every=2)
    assert main(["train", path, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: train.warmup (5) is longer than train.steps (2)" in err
    peak = learning_rate(1, lr=3e-3, steps=2, warmup=5, schedule="cosine", min_lr_ratio=0.1, decay_fraction=0.2)
    assert f"only climbs (to {peak:.2e} of lr 0.003) and never decays" in err


def test_sequences_longer_than_max_seq_len_warn(tmp_path, cache, capsys):
    path = blueprint(tmp_path, cache, steps=1, warmup=0, eval_every=1)
    assert main(["train", path, "--no-progress", "model.max_seq_len=16"]) == 0
    assert "warning: data.seq_len (32) is longer than model.max_seq_len (16)" in capsys.readouterr().err
    assert main(["train", path, "--no-progress", "--overwrite"]) == 0
    assert "model.max_seq_len" not in capsys.readouterr().err


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
    assert main(["train", path, "--no-progress", "--overwrite"]) == 1  # the same through the CLI: a message, status 1
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
    # on the CPU (gloo) everywhere: a one-GPU machine has no second GPU for the second process
    # Both runs in fresh processes with one thread each: the pytest process carries torch state (thread count)
    # that earlier tests may have changed, and a different summation order drifts past 1e-4 within 8 steps.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, nproc in (("one", 1), ("two", 2)):
        path = blueprint(tmp_path / name, cache, device="cpu")
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                               "-m", "hyloom", "train", path, "--no-progress"], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    a, b = losses(tmp_path / "one" / "run"), losses(tmp_path / "two" / "run")
    assert [s for s, _ in a] == [s for s, _ in b]
    for (_, x), (_, y) in zip(a, b):
        assert y == pytest.approx(x, rel=1e-4)


def test_learning_rate_schedules():
    kw = dict(lr=1.0, steps=100, warmup=10, min_lr_ratio=0.1, decay_fraction=0.2)
    assert learning_rate(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert learning_rate(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert learning_rate(10, schedule="cosine", **kw) == pytest.approx(1.0)
    assert learning_rate(99, schedule="cosine", **kw) == pytest.approx(0.1)  # the last step reaches the floor
    assert learning_rate(54, schedule="cosine", **kw) + learning_rate(55, schedule="cosine", **kw) == pytest.approx(1.1)
    assert learning_rate(2, lr=1.0, steps=3, warmup=1, schedule="cosine", min_lr_ratio=0.1,
                         decay_fraction=0.2) == pytest.approx(0.1)
    assert learning_rate(79, schedule="wsd", **kw) == 1.0
    assert learning_rate(99, schedule="wsd", **kw) == pytest.approx(0.1)
    assert learning_rate(89, schedule="wsd", **kw) == pytest.approx(0.55)
    assert learning_rate(50, schedule="constant", **kw) == 1.0
