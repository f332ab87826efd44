"""Speed options of the `lm` trainer: `compile` (torch.compile per block) and `activation_checkpointing`
(per block) change how a step runs, not what it computes. On CPU the compile backend is aot_eager (tracing and
autograd without code generation); tests/gpu/test_cuda_compile.py checks inductor on CUDA."""

from pathlib import Path

import pytest
import torch
import yaml
from torch._dynamo.utils import counters

from hyloom.blueprint import load_blueprint
from hyloom.plugins.train import lm
from hyloom.testing import tiny_model
from hyloom.train import RunDir, train


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(autouse=True)
def aot_eager(monkeypatch):
    monkeypatch.setattr(lm, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def run(tmp_path: Path, cache: Path, **train_options) -> list[float]:
    """Losses of a 4-step run of a small hybrid (Lightning + attention, HyPE) with these trainer options."""
    data = {
        "model": {"d_model": 32, "n_layers": 2, "vocab_size": 512, "position": {"type": "hype"},
                  "mixers": {"A": {"type": "attention", "heads": 2, "kv_heads": 1},
                             "L": {"type": "lightning", "heads": 2}},
                  "layout": "LA", "ffn": {"type": "swiglu", "hidden": 64}},
        "data": {"source": {"type": "stdlib", "max_bytes": 400_000}, "tokenizer": {"type": "bpe", "vocab_size": 512},
                 "seq_len": 32, "cache_dir": str(cache)},
        "train": {"type": "lm", "steps": 4, "batch_size": 4, "lr": 1e-2, "warmup": 1, "eval_every": 4,
                  "eval_batches": 1, "save_every": 4, "log_every": 1, "out_dir": str(tmp_path / "run"),
                  "sample_tokens": 0, "device": "cpu", "tensorboard": False, **train_options},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "bp.yaml").write_text(yaml.safe_dump(data))
    bp = load_blueprint(str(tmp_path / "bp.yaml"))
    train(bp, bp.model_dump(mode="json"), progress=False)
    return [r["loss"] for r in RunDir(tmp_path / "run").metrics()]


def test_compiled_training_gives_the_eager_losses(tmp_path, cache, capsys):
    eager = run(tmp_path / "eager", cache, compile=False)
    assert ", compiled" not in capsys.readouterr().out
    counters.clear()
    compiled = run(tmp_path / "compiled", cache, compile=True)
    assert ", compiled" in capsys.readouterr().out  # the startup summary says so
    # one graph per kind of block (Lightning, attention), each compiled once, none broken
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"], dict(counters["graph_break"])
    assert len(eager) == len(compiled) == 4
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=0)


def test_checkpointed_training_gives_the_same_losses(tmp_path, cache):
    plain = run(tmp_path / "plain", cache)
    counters.clear()
    checkpointed = run(tmp_path / "checkpointed", cache, activation_checkpointing=True, compile=True)
    assert not counters["graph_break"], dict(counters["graph_break"])  # the checkpoint wraps the compiled blocks
    torch.testing.assert_close(checkpointed, plain, rtol=1e-4, atol=0)


def test_compile_auto_means_cuda_only():
    assert lm.use_compile("auto", torch.device("cuda")) and not lm.use_compile("auto", torch.device("cpu"))
    assert lm.use_compile(True, torch.device("cpu")) and not lm.use_compile(False, torch.device("cuda"))


def hybrid():
    """InfLLM-V2 past its dense_len (selection and block-sparse attention), Lightning, HyPE; reference kernels."""
    sparse = {"type": "infllm_v2", "heads": 2, "kv_heads": 1, "head_dim": 16, "block_size": 16, "kernel_size": 8,
              "kernel_stride": 4, "topk": 2, "init_blocks": 1, "window": 16, "dense_len": 32}
    return tiny_model(sparse, mixers={"L": {"type": "lightning", "heads": 2, "head_dim": 16}}, layout="ML",
                      position={"type": "hype"}).train()


def gradients(model, ids):
    model.zero_grad()
    logits = model(ids)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_gives_the_same_gradients_and_names():
    model = hybrid()
    ids = torch.randint(0, 61, (2, 48), generator=torch.Generator().manual_seed(0))
    names = list(model.state_dict())
    want = gradients(model, ids)
    lm.checkpoint_blocks(model)
    lm.checkpoint_blocks(model)  # a second call wraps nothing twice
    assert list(model.state_dict()) == names  # checkpoints written from it load anywhere
    got = gradients(model, ids)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    with torch.no_grad():  # evaluation and sampling run the blocks as before
        torch.testing.assert_close(model(ids), hybrid()(ids))
