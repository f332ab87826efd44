"""The reproduction scripts under bench/, run as scripts, end bad input with their message and exit status 2, not a
traceback: here `--device cuda` on a machine whose torch sees no GPU (what a user gets who runs a documented GPU
command on a laptop)."""

import runpy
import sys

import pytest
import torch

from bench_scripts import BENCH

SCRIPTS = ["convert_small", "grpo_small", "grpo_step", "hype_length", "infllm_v2_locality", "mdm_small", "rollout"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that sees no GPU")
@pytest.mark.parametrize("name", SCRIPTS)
def test_cuda_without_a_gpu_exits_2_with_the_message(name, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--out", str(tmp_path), "--device", "cuda"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(BENCH / f"{name}.py"), run_name="__main__")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{name}: --device: 'cuda'") and "sees no CUDA device" in err
