"""The conversion under torchrun (gloo, 2 CPU processes): the tiny staged blueprint (align → select → distill → lm)
runs end to end, and matches the same run in one process step for step. batch_size is global, so both runs see the
same sequences each step: each process takes half, DDP averages the gradients, the metrics are averaged over the
processes. The align stage accumulates over two micro-steps, so DDP's no_sync path runs too. A two-process run
stopped inside the distill stage resumes (--resume auto, two processes) exactly where it stopped."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hyloom.checkpoint import load_safetensors
from hyloom.train import RunDir
from tiny_teacher import make_teacher

TINY = str(Path(__file__).resolve().parents[2] / "blueprints" / "experiments" / "convert-tiny.yaml")
TRAINED = ("align", "distill", "long")


# stops the run at the distill stage's (lr 3e-3 in convert-tiny.yaml) third step, after its step-2 checkpoint
CRASH = """
import sys
from hyloom.cli import main
from hyloom.plugins.convert import loop
real = loop.learning_rate
def crash_in_distill(step, **kw):
    if step == 2 and kw["lr"] == 3e-3:
        raise KeyboardInterrupt("the machine went away")
    return real(step, **kw)
loop.learning_rate = crash_in_distill
sys.exit(main(sys.argv[1:]))
"""


def torchrun(nproc: int, out: Path, cache: Path, teacher: Path, *more, program=("-m", "hyloom"), ok=True) -> str:
    # fresh processes with one thread each: a different summation order drifts past the tolerance within a few steps
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    overrides = [*(f"stages.{i}.train.teacher={teacher}" for i in range(3)), *(f"stages.{i}.train.device=cpu"
                                                                                for i in (0, 1, 2, 3)),
                 "stages.0.train.grad_accum=2", f"out_dir={out}", f"data.cache_dir={cache}"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           *program, "train", TINY, *overrides, *more, "--no-progress"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert (done.returncode == 0) == ok, done.stderr[-3000:]
    return done.stdout


def test_two_processes_match_one_and_resume_exactly(tmp_path):
    teacher = make_teacher(tmp_path / "teacher" / "checkpoint")
    said = {name: torchrun(nproc, tmp_path / name, tmp_path / "cache", teacher) for name, nproc in (("one", 1),
                                                                                                    ("two", 2))}
    assert said["two"].count("(2 processes)") == 3  # align, distill and lm said so, once each (rank 0 only)
    one, two = tmp_path / "one", tmp_path / "two"
    finished = json.loads((two / "stages.json").read_text())["finished"]
    assert [d["name"] for d in finished] == ["align", "select", "distill", "long"]
    assert json.loads((two / "select" / "selection.json").read_text())["kept"] == \
        json.loads((one / "select" / "selection.json").read_text())["kept"]
    for stage in TRAINED:
        a, b = RunDir(one / stage).metrics(), RunDir(two / stage).metrics()
        assert [r["step"] for r in a] == [r["step"] for r in b], stage
        for x, y in zip(a, b):
            for key in ("loss", "eval_loss", "mse/0", "lm_loss", "eval_lm_loss"):
                if key in x:
                    assert y[key] == pytest.approx(x[key], rel=1e-4), (stage, x["step"], key)
        # AdamW divides by the gradient's root mean square: where that is near zero (an embedding row only the
        # tied head touches), a different summation order moves a weight by up to ~1e-5 more
        final_a = load_safetensors(RunDir(one / stage).latest())
        final_b = load_safetensors(RunDir(two / stage).latest())
        for key in final_a:
            torch.testing.assert_close(final_b[key], final_a[key], rtol=1e-4, atol=1e-4, msg=f"{stage} {key}")

    (tmp_path / "crash.py").write_text(CRASH)
    broken = tmp_path / "broken"
    torchrun(2, broken, tmp_path / "cache", teacher, program=(str(tmp_path / "crash.py"),), ok=False)
    assert [r["step"] for r in RunDir(broken / "distill").metrics()] == [1, 2]
    torchrun(2, broken, tmp_path / "cache", teacher, "--resume", "auto")
    for stage in ("distill", "long"):
        timeless = [[{k: v for k, v in r.items() if k != "tokens_per_s"} for r in RunDir(run / stage).metrics()]
                    for run in (two, broken)]
        assert timeless[0] == timeless[1], stage
        final_a = load_safetensors(RunDir(two / stage).latest())
        final_b = load_safetensors(RunDir(broken / stage).latest())
        assert all(torch.equal(final_a[k], final_b[k]) for k in final_a), stage
