"""The hybrid model on a GPU, where the mixers run their Triton kernels (skipped without CUDA).
Run on the GPU machine: `python -m pytest tests/gpu -q`."""

import pytest
import torch
import yaml

import hyloom
from hyloom.blueprint import load_blueprint
from hyloom.train import RunDir, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_on_cuda(dtype=torch.float32):
    torch.manual_seed(0)
    return hyloom.build_model(load_blueprint("builtin:tiny"), device="cuda", dtype=dtype).eval()


def test_prefill_and_decode_match_a_full_pass_with_triton_kernels():
    model = tiny_on_cuda()
    ids = torch.randint(0, 4096, (2, 300), device="cuda")  # past dense_len (128): the sparse path runs
    with torch.no_grad():
        full = model(ids)
        logits, cache = model.prefill(ids[:, :200], logits_at="all")
        steps = [model.decode_step(ids[:, t], cache) for t in range(200, 300)]
    got = torch.cat([logits, torch.stack(steps, 1)], 1)
    rel = (got - full).norm() / full.norm()
    assert rel < 1e-2, rel  # Triton's fp32 dots use TF32


def test_triton_and_reference_paths_agree_in_bf16():
    model = tiny_on_cuda(torch.bfloat16)
    ids = torch.randint(0, 4096, (2, 300), device="cuda")
    with torch.no_grad():
        gpu = model(ids).float()
        reference = model.cpu().float()(ids.cpu()).cuda()
    assert (gpu - reference).norm() / reference.norm() < 3e-2


def test_training_in_bf16_autocast(tmp_path):
    bp_path = tmp_path / "bp.yaml"
    bp_path.write_text(yaml.safe_dump({
        "extends": "builtin:tiny",
        "data": {"source": {"type": "stdlib", "max_bytes": 2_000_000}, "cache_dir": str(tmp_path / "cache")},
        "train": {"steps": 60, "warmup": 10, "eval_every": 30, "save_every": 30, "out_dir": str(tmp_path / "run"),
                  "sample_tokens": 16}}))
    bp = load_blueprint(str(bp_path))
    result = train(bp, bp.model_dump(mode="json"), progress=False)
    metrics = RunDir(tmp_path / "run").metrics()
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 1.0
    assert result["eval_loss"] < result["unigram_loss"] + 1.0
    print(result)
