"""`hyloom eval`: the command end to end on a tiny trained checkpoint (with a task registered in-process), how
`task.KEY` / `NAME.KEY` overrides reach the tasks, the table, eval.json, and every bad input exiting with 2."""

import json
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

import hyloom
from hyloom.cli import main
from hyloom.eval import EvalResult, format_table
from hyloom.hookspecs import hookimpl
from hyloom.train import train

SEQ_LEN = 16


def tiny_blueprint(folder: Path, cache: Path, **train_options) -> Path:
    """A 2-layer hybrid on a small slice of the standard library (data prepared in a few seconds)."""
    data = {"model": {"d_model": 32, "n_layers": 2, "vocab_size": 300, "position": {"type": "hype"},
                      "mixers": {"A": {"type": "attention", "heads": 2, "kv_heads": 1},
                                 "L": {"type": "lightning", "heads": 2}},
                      "layout": "LA", "ffn": {"type": "swiglu", "hidden": 64}},
            "data": {"source": {"type": "stdlib", "max_bytes": 100_000},
                     "tokenizer": {"type": "bpe", "vocab_size": 300}, "seq_len": SEQ_LEN, "cache_dir": str(cache)},
            "train": {"type": "lm", "steps": 2, "batch_size": 2, "warmup": 0, "eval_every": 2, "eval_batches": 1,
                      "save_every": 2, "out_dir": str(folder / "run"), "sample_tokens": 0, "tensorboard": False,
                      **train_options}}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class ProbeConfig(BaseModel):
    lengths: list[int] = [8, 32]
    depth: float = 0.5
    fail: bool = False


class Probe:
    """Reports what it was given (its config, the context), so the tests see exactly what reached it."""

    def __init__(self, cfg):
        self.cfg = cfg

    def run(self, ctx):
        if self.cfg.fail:
            raise ValueError("this model has no sampler for greedy answers")
        metrics = {"probe/acc": 0.5, **{f"probe/acc@{n}": n / 100 for n in self.cfg.lengths},
                   "probe/depth": self.cfg.depth, "probe/train_len": ctx.train_len,
                   "probe/batch_size": ctx.batch_size, "probe/seed": ctx.seed,
                   "probe/heldout_tokens": len(ctx.heldout_ids()), "probe/training": ctx.model.training}
        rows = [{"length": n, "extrapolated": n > ctx.train_len} for n in self.cfg.lengths]
        return EvalResult(metrics, rows, plot=lambda path: Path(path).write_bytes(b"\x89PNG probe"))


class ProbePlugin:
    @staticmethod
    @hookimpl
    def hyloom_register_eval_tasks(register):
        register("probe", Probe, config=ProbeConfig, summary="reports what reached it", example={"type": "probe"})
        register("prob_other", Probe, config=ProbeConfig, summary="another name", example={"type": "prob_other"})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval-cli")
    bp = hyloom.load_blueprint(str(tiny_blueprint(folder, folder / "cache")))
    result = train(bp, bp.model_dump(mode="json"), progress=False)
    return Path(result["checkpoint"])


@pytest.fixture
def probe():
    name = hyloom.register_plugin(ProbePlugin, name="probe_plugin")
    yield
    hyloom.unregister_plugin(name)


def test_eval_runs_tasks_and_writes_eval_json_and_figures(checkpoint, probe, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["eval", str(checkpoint.parent), "--task", "probe", "--task", "prob_other", "task.lengths=[8,64]",
                 "prob_other.lengths=[4]", "probe.depth=0.25", "--out", str(out), "--device", "cpu",
                 "--batch-size", "3", "--seed", "7", "--no-progress"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert printed.err == f"checkpoint: {checkpoint}\n"  # a run directory means its newest checkpoint
    report = json.loads((out / "eval.json").read_text())
    probe_metrics = report["tasks"]["probe"]["metrics"]
    heldout_tokens = probe_metrics.pop("probe/heldout_tokens")
    # task.KEY reached both tasks, NAME.KEY only its own and over task.KEY; the context is the run's
    assert probe_metrics == {"probe/acc": 0.5, "probe/acc@8": 0.08, "probe/acc@64": 0.64, "probe/depth": 0.25,
                             "probe/train_len": SEQ_LEN, "probe/batch_size": 3, "probe/seed": 7,
                             "probe/training": 0.0}
    assert report["tasks"]["prob_other"]["config"] == {"type": "prob_other", "lengths": [4], "depth": 0.5,
                                                        "fail": False}
    assert report["tasks"]["probe"]["rows"] == [{"length": 8, "extrapolated": False},
                                                {"length": 64, "extrapolated": True}]
    # the held-out split is the run's own: the same number of tokens the prepared data holds out
    manifest = json.loads(next((checkpoint.parents[1] / "cache").glob("data-*/manifest.json")).read_text())
    assert heldout_tokens == manifest["splits"]["eval"]["tokens"]
    assert report["checkpoint"] == str(checkpoint) and report["train_len"] == SEQ_LEN
    assert report["device"] == "cpu" and report["model"]["layout"] == "LA"
    assert set(report["versions"]) == {"hyloom", "torch", "python"}
    assert all(entry["seconds"] >= 0 for entry in report["tasks"].values())
    assert (out / "probe.png").read_bytes() == b"\x89PNG probe" and report["tasks"]["probe"]["figure"] == "probe.png"
    # the table: a line per metric, lengths above the training length flagged
    table = printed.out.splitlines()
    assert [line for line in table if "extrapolated" in line] == [
        next(line for line in table if "probe/acc@64" in line),
        f"extrapolated: longer than the {SEQ_LEN} tokens the model was trained on"]
    assert "probe/acc@64" in table[3] and table[3].endswith("0.64  extrapolated")
    assert printed.out.rstrip().endswith(f"wrote {out / 'eval.json'}, probe.png, prob_other.png")


def test_default_out_dir_is_inside_the_checkpoint(checkpoint, probe, capsys):
    assert main(["eval", str(checkpoint), "--task", "probe", "--device", "cpu", "--no-progress"]) == 0
    assert json.loads((checkpoint / "eval" / "eval.json").read_text())["tasks"]["probe"]["metrics"]["probe/acc"] == 0.5
    assert capsys.readouterr().err == ""  # a checkpoint given directly: nothing to say about which


def test_format_table_marks_only_lengths_above_training():
    report = {"train_len": 512, "tasks": {"t": {"metrics": {"t/acc": 1.0, "t/acc@512": 1.0, "t/acc@513": None},
                                                "seconds": 1.5}}}
    lines = format_table(report).splitlines()
    assert [line.endswith("extrapolated") for line in lines[1:4]] == [False, False, True]
    assert "nan" in lines[3] and "(1.5 s)" in lines[4]


@pytest.mark.parametrize("argv, message", [
    (["--task", "prob"], "'prob' is not a registered eval_task; did you mean 'probe'"),
    (["--task", "probe", "task.lengths=[8,x]"], "task config: task.lengths.1: Input should be a valid integer"),
    (["--task", "probe", "probe.depht=1"], "task config: probe.depht: unknown key for task 'probe' "
                                           "(its keys: lengths, depth, fail)"),
    (["--task", "probe", "passkey.depth=1"], "passkey.depth: 'passkey' is not one of the tasks given with --task"),
    (["--task", "probe", "depth=1"], "expected task.KEY=VALUE or NAME.KEY=VALUE"),
    (["--task", "probe", "task.lengths=[8"], "task.lengths: not a YAML value"),
    (["--task", "probe", "task.fail=true"], "task 'probe' cannot run: this model has no sampler"),
    (["--task", "probe", "--device", "tpu"], "--device: 'tpu' is not a device"),
])
def test_bad_input_exits_2_with_one_clear_line(checkpoint, probe, tmp_path, argv, message, capsys):
    assert main(["eval", str(checkpoint), "--out", str(tmp_path), "--no-progress"] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "neither a checkpoint (no blueprint.yaml) nor a run directory"),
    (lambda p: p / "missing", "does not exist"),
])
def test_a_folder_that_is_not_a_checkpoint_exits_2(tmp_path, probe, make, message, capsys):
    assert main(["eval", str(make(tmp_path)), "--task", "probe"]) == 2
    assert message in capsys.readouterr().err


def test_a_bad_batch_size_is_refused_by_the_parser(checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(checkpoint), "--task", "probe", "--batch-size", "0"])
    assert exit_.value.code == 2 and "expected an integer >= 1" in capsys.readouterr().err
