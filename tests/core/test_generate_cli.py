"""`hyloom generate` on long inputs: a prompt file, --context, --chunk-size, streaming, the report on stderr,
and what it refuses (a chunk size that is not positive, a context that cannot fit in memory)."""

import re

import pytest
import torch

import hyloom
from hyloom.blueprint import blueprint_model
from hyloom.checkpoint import save_checkpoint
from hyloom.cli import main
from hyloom.plugins.data import bpe

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 0\n    y = 0\n" * 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny hybrid (InfLLM-V2 sparse, Lightning, attention) with random weights and a small BPE."""
    folder = tmp_path_factory.mktemp("generate")
    tokenizer = bpe.BPETrainer(bpe.BPEConfig(vocab_size=300, min_frequency=1)).train([TEXT], cache_dir=folder)
    model = {"d_model": 32, "n_layers": 3, "vocab_size": 300, "max_seq_len": 256, "position": {"type": "hype"},
             "layout": "SLA", "ffn": {"type": "swiglu", "hidden": 64},
             "mixers": {"S": {"type": "infllm_v2", "heads": 4, "kv_heads": 2, "head_dim": 16, "block_size": 4,
                              "kernel_size": 8, "kernel_stride": 2, "topk": 2, "window": 4, "dense_len": 16},
                        "L": {"type": "lightning", "heads": 2}, "A": {"type": "attention", "heads": 2}}}
    spec = blueprint_model().model_validate({"model": model})
    torch.manual_seed(0)
    path = tokenizer.save(folder / "tok" / "tokenizer.json")
    return save_checkpoint(folder / "ckpt", hyloom.build_model(spec), spec.model_dump(mode="json"),
                           extra_files={"tokenizer.json": path.read_text()})


GREEDY = ["--temperature", "0", "--max-new-tokens", "10", "--device", "cpu"]


def test_prompt_file_at_a_context_length_streams_and_reports(checkpoint, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(TEXT[:40])
    assert main(["generate", str(checkpoint), "--prompt-file", str(prompt), "--context", "120"] + GREEDY) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"[prompt: 120 tokens from {prompt}]\n")
    assert re.search(r"prefill [\d.]+ s \(120 tokens × 1\), decode [\d,.]+ tokens/s, peak memory [\d.]+ GiB", err)
    # chunks of any size give the same greedy continuation (chunked prefill equals one pass)
    for chunk in ("7", "50"):
        assert main(["generate", str(checkpoint), "--prompt-file", str(prompt), "--context", "120",
                     "--chunk-size", chunk] + GREEDY) == 0
        assert capsys.readouterr().out == out


def test_a_single_prompt_streams_what_a_batch_prints(checkpoint, capsys):
    assert main(["generate", str(checkpoint), "--prompt", "def add", "--stop", "\\n"] + GREEDY) == 0
    streamed = capsys.readouterr().out
    assert main(["generate", str(checkpoint), "--prompt", "def add", "--prompt", "class", "--stop", "\\n"]
                + GREEDY) == 0
    batched = capsys.readouterr().out
    assert streamed.startswith("def add") and "\n" not in streamed[:-1]  # cut before the stop string
    assert batched.startswith(streamed)


@pytest.mark.parametrize("argv, message", [
    (["--chunk-size", "0"], "argument --chunk-size: '0': expected a positive integer"),
    (["--chunk-size", "-5"], "argument --chunk-size: '-5': expected a positive integer"),
    (["--context", "0"], "argument --context: '0': expected a positive integer"),
])
def test_bad_sizes_exit_2(checkpoint, argv, message, capsys):
    with pytest.raises(SystemExit, match="2"):
        main(["generate", str(checkpoint), "--prompt", "x"] + argv)
    assert message in capsys.readouterr().err


def test_a_context_that_cannot_fit_is_refused_before_it_starts(checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(hyloom.inference, "free_bytes", lambda device: 50_000_000)
    argv = ["generate", str(checkpoint), "--prompt", "def ", "--context", "2000000"] + GREEDY
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(r"a context of 2,000,010 tokens × 1 row\(s\) needs ~[\d.]+ GiB \(weights [\d.]+ \+ cache", err)
    assert "GiB is free on cpu" in err and "Traceback" not in err


def test_missing_prompt_file_and_two_prompts_with_context_are_refused(checkpoint, tmp_path, capsys):
    assert main(["generate", str(checkpoint), "--prompt-file", str(tmp_path / "none.txt")] + GREEDY) == 2
    assert "none.txt: cannot read it" in capsys.readouterr().err
    assert main(["generate", str(checkpoint), "--prompt", "a", "--prompt", "b", "--context", "9"] + GREEDY) == 2
    assert "--context makes one prompt" in capsys.readouterr().err
