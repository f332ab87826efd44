"""A third-party eval task, installed as a distribution with an entry point, runs through `hyloom eval` and a
trainer's `train.eval_tasks` alike; its numbers are the ones computed by hand from the run's held-out split."""

import json
from pathlib import Path

import pytest
import torch
import yaml

import hyloom
from hyloom.checkpoint import load_checkpoint
from hyloom.cli import main
from hyloom.data import prepare
from hyloom.eval import heldout_reader
from hyloom.train import RunDir

# The distribution's whole module: what docs/plugins.md shows a task author writing.
SOURCE = '''
from pydantic import BaseModel, Field, PositiveInt

from hyloom.eval import EvalResult
from hyloom.hookspecs import hookimpl


class NextTokenConfig(BaseModel):
    lengths: list[PositiveInt] = Field([16], description="window lengths, in tokens")
    windows: PositiveInt = Field(2, description="held-out windows per length")


class NextToken:
    """Greedy next-token accuracy on held-out windows of each length (teacher-forced, one forward pass)."""

    def __init__(self, cfg):
        self.cfg = cfg

    def run(self, ctx):
        import torch

        ids = ctx.heldout_ids()
        metrics, rows = {}, []
        for n in self.cfg.lengths:
            if len(ids) < n * self.cfg.windows:
                raise ValueError(f"length {n}: the held-out split has {len(ids)} tokens, fewer than "
                                 f"{self.cfg.windows} windows of {n}")
            x = torch.as_tensor(ids[:n * self.cfg.windows].astype("int64")).view(self.cfg.windows, n).to(ctx.device)
            hits = (ctx.model(x)[:, :-1].argmax(-1) == x[:, 1:]).float()
            metrics[f"next_token/acc@{n}"] = hits.mean().item()
            rows.append({"length": n, "correct": int(hits.sum()), "total": hits.numel(),
                         "extrapolated": n > ctx.train_len})
        metrics = {"next_token/acc": sum(metrics.values()) / len(metrics), **metrics}
        return EvalResult(metrics, rows)


@hookimpl
def hyloom_register_eval_tasks(register):
    register("next_token", NextToken, config=NextTokenConfig, summary="greedy next-token accuracy by length",
             example={"type": "next_token", "lengths": [16, 64]})
'''


@pytest.fixture
def next_token(make_distribution, on_path, tmp_path):
    on_path(make_distribution(tmp_path / "dist", "hyloom-next-token", "0.1", "hyloom_next_token", SOURCE,
                              "next_token"))
    assert hyloom.registry.registry().get("eval_task", "next_token").dist == "hyloom-next-token"


def blueprint(folder: Path, **train) -> Path:
    data = {"model": {"d_model": 32, "n_layers": 2, "vocab_size": 300, "position": {"type": "hype"},
                      "mixers": {"A": {"type": "attention", "heads": 2, "kv_heads": 1},
                                 "L": {"type": "lightning", "heads": 2}},
                      "layout": "LA", "ffn": {"type": "swiglu", "hidden": 64}},
            "data": {"source": {"type": "stdlib", "max_bytes": 100_000},
                     "tokenizer": {"type": "bpe", "vocab_size": 300}, "seq_len": 16,
                     "cache_dir": str(folder.parent / "cache")},
            "train": {"type": "lm", "steps": 4, "batch_size": 2, "warmup": 0, "eval_every": 2, "eval_batches": 1,
                      "save_every": 4, "log_every": 4, "out_dir": str(folder / "run"), "sample_tokens": 0,
                      "tensorboard": False, **train}}
    folder.mkdir(parents=True)
    (folder / "bp.yaml").write_text(yaml.safe_dump(data))
    return folder / "bp.yaml"


def by_hand(checkpoint: Path, length: int, windows: int = 2) -> float:
    model, bp = load_checkpoint(checkpoint)
    ids = heldout_reader(prepare(bp.data, progress=False).dir)()
    x = torch.as_tensor(ids[:length * windows].astype("int64")).view(windows, length)
    with torch.no_grad():
        return (model.eval()(x)[:, :-1].argmax(-1) == x[:, 1:]).float().mean().item()


def test_third_party_task_in_training_and_in_hyloom_eval(next_token, tmp_path, capsys):
    path = blueprint(tmp_path / "a", eval_tasks=[{"type": "next_token", "lengths": [8, 32]}])
    assert main(["train", str(path), "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    records = RunDir(tmp_path / "a" / "run").metrics()
    # at each evaluation (eval_every 2: steps 2 and 4), logged even between log_every lines
    scored = [r for r in records if "eval/next_token/acc" in r]
    assert [r["step"] for r in scored] == [2, 4]
    assert set(scored[-1]) >= {"eval/next_token/acc", "eval/next_token/acc@8", "eval/next_token/acc@32"}
    # the headline metric (a task's first) is printed on each logged line
    assert f"next_token/acc {scored[-1]['eval/next_token/acc']:.3g}" in out.splitlines()[-3]
    checkpoint = tmp_path / "a" / "run" / "checkpoint-000004"
    assert scored[-1]["eval/next_token/acc@32"] == pytest.approx(by_hand(checkpoint, 32), abs=1e-6)

    # the same task, the same numbers, through hyloom eval on the final checkpoint
    assert main(["eval", str(checkpoint), "--task", "next_token", "task.lengths=[8,32]", "--device", "cpu",
                 "--no-progress"]) == 0
    table = capsys.readouterr().out
    report = json.loads((checkpoint / "eval" / "eval.json").read_text())["tasks"]["next_token"]
    assert report["metrics"] == pytest.approx({k[len("eval/"):]: v for k, v in scored[-1].items()
                                               if k.startswith("eval/")}, abs=1e-6)
    assert report["rows"][1] == {"length": 32, "correct": report["rows"][1]["correct"], "total": 62,
                                 "extrapolated": True}
    assert "next_token/acc@32" in table and "extrapolated" in table


def test_eval_tasks_every_and_bad_task_configs_in_a_blueprint(next_token, tmp_path, capsys):
    path = blueprint(tmp_path / "b", eval_tasks=[{"type": "next_token"}], eval_tasks_every=3)
    assert main(["train", str(path), "--no-progress", "--device", "cpu"]) == 0
    capsys.readouterr()
    steps = [r["step"] for r in RunDir(tmp_path / "b" / "run").metrics() if "eval/next_token/acc" in r]
    assert steps == [3, 4]  # every 3 steps, and at the end
    for override, message in [
        ("train.eval_tasks=[{type: next_tokn}]", "train.eval_tasks.0.type: 'next_tokn' is not a registered eval_task; "
                                                 "did you mean 'next_token'?"),
        ("train.eval_tasks=[{type: next_token, lengths: [0]}]", "train.eval_tasks.0.lengths.0: Input should be "
                                                                "greater than 0"),
        ("train.eval_tasks=[{type: next_token, windos: 1}]", "train.eval_tasks.0.windos: unknown key 'windos'; "
                                                             "did you mean 'windows'?"),
        ("train.eval_tasks=[{type: next_token}, {type: next_token}]", "'next_token' listed twice"),
    ]:
        assert main(["validate", str(path), override]) == 2
        assert message in capsys.readouterr().err


def test_a_task_that_cannot_run_stops_training_with_exit_2(next_token, tmp_path, capsys):
    path = blueprint(tmp_path / "c", eval_tasks=[{"type": "next_token", "lengths": [10 ** 7]}])
    assert main(["train", str(path), "--no-progress", "--device", "cpu"]) == 2
    assert "task 'next_token' cannot run: length 10000000: the held-out split has" in capsys.readouterr().err


def test_the_documented_example_is_this_module():
    text = (Path(__file__).resolve().parents[2] / "docs" / "plugins.md").read_text()
    block = next(b for b in text.split("```python\n")[1:] if "class NextToken" in b).split("```")[0]
    assert block.strip() == SOURCE.strip()
