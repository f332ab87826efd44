"""Blueprints with `stages:`: stages run in order, each in out_dir/<name>/, each starting from the previous
stage's final weights and model; --resume auto restarts at the first unfinished stage (and inside it from its
last checkpoint); a stage may change the model; bad stage lists are refused with their key paths."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import BaseModel

import hyloom
from hyloom.blueprint import BlueprintError, load_blueprint
from hyloom.checkpoint import load_checkpoint, load_safetensors
from hyloom.cli import main
from hyloom.plugins.train import lm
from hyloom.train import RunDir, SetupError, train

MODEL = {"d_model": 32, "n_layers": 2, "vocab_size": 512, "position": {"type": "hype"},
         "mixers": {"A": {"type": "attention", "heads": 2, "kv_heads": 1}, "L": {"type": "lightning", "heads": 2}},
         "layout": "LA", "ffn": {"type": "swiglu", "hidden": 64}}
LM = {"type": "lm", "steps": 4, "batch_size": 4, "lr": 3e-3, "warmup": 1, "eval_every": 4, "eval_batches": 1,
      "save_every": 2, "keep": 10, "log_every": 1, "sample_tokens": 0, "device": "cpu"}
FIRST = {"name": "pretrain", "train": LM}
SECOND = {"name": "long", "train": {**LM, "steps": 6, "lr": 1e-3, "schedule": "constant"}, "data": {"seq_len": 64}}


def blueprint(folder: Path, cache: Path, stages, **top) -> str:
    data = {"model": MODEL, "data": {"source": {"type": "stdlib", "max_bytes": 400_000},
                                     "tokenizer": {"type": "bpe", "vocab_size": 512}, "seq_len": 32,
                                     "cache_dir": str(cache)},
            "out_dir": str(folder / "run"), "stages": stages, **top}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bp.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


def run(path, resume=None, overwrite=False):
    bp = load_blueprint(path)
    return train(bp, bp.model_dump(mode="json"), resume=resume, progress=False, overwrite=overwrite)


@pytest.fixture
def starts(monkeypatch):
    """The weights (and layout) each stage's lm trainer is handed, in order."""
    seen = []
    real = lm.LMTrainer.fit

    def fit(self, model, data, run):
        seen.append((run.stage, run.blueprint.model.layout, {k: v.clone() for k, v in model.state_dict().items()}))
        return real(self, model, data, run)

    monkeypatch.setattr(lm.LMTrainer, "fit", fit)
    return seen


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_stages_run_in_order_and_hand_on_their_weights(tmp_path, cache, capsys, starts):
    path = blueprint(tmp_path, cache, [FIRST, SECOND])
    assert main(["train", path, "--no-progress"]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "run"
    assert re.search(r"^stage 1/2 pretrain: lm trainer in .*run/pretrain, from a fresh model$", out, re.M)
    assert re.search(r"^stage 2/2 long: lm trainer in .*run/long, from .*run/pretrain/checkpoint-000004$", out, re.M)
    assert re.search(r"^stage 2/2 long: done in [\d.]+ s, checkpoint .*run/long/checkpoint-000006$", out, re.M)
    assert "last stage: long (2 of 2)" in out and f"checkpoint: {run_dir / 'long' / 'checkpoint-000006'}" in out
    # each stage in its own folder, with the lm trainer's usual outputs; none at the top
    for name, steps, seq_len in (("pretrain", 4, 32), ("long", 6, 64)):
        stage = RunDir(run_dir / name)
        assert stage.latest().name == f"checkpoint-{steps:06d}" and (stage.path / "loss.png").exists()
        assert [r["step"] for r in stage.metrics()] == list(range(1, steps + 1))
        assert re.search(rf"seq_len {seq_len} ", out)
    assert sorted(p.name for p in run_dir.iterdir()) == ["long", "pretrain", "stages.json"]
    record = json.loads((run_dir / "stages.json").read_text())["finished"]
    assert [(r["name"], r["checkpoint"]) for r in record] == [("pretrain", "pretrain/checkpoint-000004"),
                                                              ("long", "long/checkpoint-000006")]
    # the checkpoint carries the one-stage blueprint that made it: the stage's trainer and its data
    _, bp = load_checkpoint(run_dir / "long" / "checkpoint-000006")
    assert (bp.train.lr, bp.train.steps, bp.train.out_dir) == (1e-3, 6, str(run_dir / "long"))
    assert bp.data.seq_len == 64 and bp.data.source.max_bytes == 400_000  # merged with the blueprint's data
    assert bp.stages is None and bp.model.layout == ["L", "A"]
    # stage 2 starts exactly from stage 1's final weights
    assert [s[0] for s in starts] == ["pretrain", "long"]
    final_1 = load_safetensors(run_dir / "pretrain" / "checkpoint-000004")
    assert same(starts[1][2], final_1) and not same(starts[0][2], final_1)


def test_a_used_run_dir_is_refused_and_overwrite_starts_over(tmp_path, cache, capsys):
    path = blueprint(tmp_path, cache, [{**FIRST, "train": {**LM, "steps": 2}}])
    run(path)
    assert main(["train", path]) == 2
    err = capsys.readouterr().err
    assert "already holds a run (stages.json, pretrain/checkpoint-000002, pretrain/latest, pretrain/loss.png" in err
    assert "--overwrite" in err
    stale = tmp_path / "run" / "pretrain" / "checkpoint-000001"
    stale.mkdir()
    kept = tmp_path / "run" / "notes.txt"
    kept.write_text("mine")
    run(path, overwrite=True)
    assert not stale.exists() and kept.read_text() == "mine"
    assert RunDir(tmp_path / "run" / "pretrain").latest().name == "checkpoint-000002"
    with pytest.raises(SetupError, match="--resume auto"):  # a checkpoint path names no stage
        run(path, resume=str(tmp_path / "run" / "pretrain" / "checkpoint-000002"))
    with pytest.raises(SetupError, match="every stage of this run has finished"):
        run(path, resume="auto")
    capsys.readouterr()
    longer = blueprint(tmp_path, cache, [{**FIRST, "train": {**LM, "steps": 3}},
                                         {**SECOND, "train": {**LM, "steps": 1}}])
    run(longer, resume="auto")
    assert "stage pretrain: finished with other train.steps; it is not run again" in capsys.readouterr().out
    assert RunDir(tmp_path / "run" / "pretrain").latest().name == "checkpoint-000002"


def test_resume_between_and_inside_stages_continues_exactly(tmp_path, cache, monkeypatch, starts):
    straight = blueprint(tmp_path / "a", cache, [FIRST, SECOND])
    run(straight)
    # stage 1 alone, then the blueprint gains stage 2: --resume auto skips the finished stage
    broken = tmp_path / "b"
    run(blueprint(broken, cache, [FIRST]))
    path = blueprint(broken, cache, [FIRST, SECOND])
    with pytest.raises(SetupError, match="already holds a run"):
        run(path)
    calls = {"n": 0}
    real = lm.lm_loss

    def crash_at_step_4(model, batch):  # inside stage 2, after its checkpoint at step 2
        calls["n"] += model.training
        if calls["n"] == 4 and model.training:
            raise KeyboardInterrupt("the machine went away")
        return real(model, batch)

    monkeypatch.setattr(lm, "lm_loss", crash_at_step_4)
    del starts[:]
    with pytest.raises(KeyboardInterrupt):
        run(path, resume="auto")
    monkeypatch.setattr(lm, "lm_loss", real)
    assert [s[0] for s in starts] == ["long"]  # the finished stage did not run again
    assert RunDir(broken / "run" / "long").latest().name == "checkpoint-000002"
    assert [r["name"] for r in json.loads((broken / "run" / "stages.json").read_text())["finished"]] == ["pretrain"]
    result = run(path, resume="auto")
    assert result["stage"] == "long" and result["checkpoint"].endswith("long/checkpoint-000006")
    for stage, final in (("pretrain", "checkpoint-000004"), ("long", "checkpoint-000006")):
        a, b = RunDir(tmp_path / "a" / "run" / stage), RunDir(broken / "run" / stage)
        assert [(r["step"], r["loss"]) for r in a.metrics()] == [(r["step"], r["loss"]) for r in b.metrics()]
        assert same(load_safetensors(a.path / final), load_safetensors(b.path / final))


class RelayoutConfig(BaseModel):
    out_dir: str = "runs/relayout"


class Relayout:
    """A test trainer that changes the model, as a selection stage does: it saves a checkpoint whose blueprint
    turns layer 0 into attention, with the weights of a model built from that blueprint."""

    def hyloom_register_trainers(register):
        register("relayout", RelayoutTrainer, config=RelayoutConfig, summary="test: changes the layout")


class RelayoutTrainer:
    def __init__(self, cfg):
        self.cfg = cfg

    def fit(self, model, data, run):
        from hyloom.blueprint import blueprint_model
        from hyloom.model import build_model

        resolved = {**run.resolved, "model": {**run.resolved["model"], "layout": "AA"}}
        new = build_model(blueprint_model().model_validate(resolved))
        with torch.no_grad():  # the layer that stays keeps its trained weights
            for name, p in new.named_parameters():
                if not name.startswith("layers.0."):
                    p.copy_(model.state_dict()[name])
        path = RunDir(self.cfg.out_dir).save(1, new, resolved, {"step": 1}, keep=1)
        return {"checkpoint": str(path)}


@pytest.fixture
def relayout():
    name = hyloom.register_plugin(Relayout, "test-relayout")
    yield
    hyloom.unregister_plugin(name)


def test_a_stage_that_changes_the_model_hands_on_the_new_model(tmp_path, cache, relayout, starts):
    path = blueprint(tmp_path, cache, [FIRST, {"name": "select", "train": {"type": "relayout"}},
                                       {**SECOND, "train": {**SECOND["train"], "steps": 2}}])
    result = run(path)
    assert result["stage"] == "long"
    assert [(s[0], s[1]) for s in starts] == [("pretrain", ["L", "A"]), ("long", ["A", "A"])]
    chosen = load_safetensors(tmp_path / "run" / "select" / "checkpoint-000001")
    assert same(starts[1][2], chosen)
    _, bp = load_checkpoint(tmp_path / "run" / "long" / "checkpoint-000002")
    assert bp.model.layout == ["A", "A"]


def test_init_starts_a_stage_from_a_given_checkpoint(tmp_path, cache, starts):
    first = blueprint(tmp_path / "a", cache, [{**FIRST, "train": {**LM, "steps": 2}}])
    run(first)
    given = tmp_path / "a" / "run" / "pretrain"  # a run directory: its latest checkpoint
    run(blueprint(tmp_path / "b", cache, [{**SECOND, "train": {**SECOND["train"], "steps": 1}, "init": str(given)}]))
    assert same(starts[-1][2], load_safetensors(given / "checkpoint-000002"))


@pytest.mark.parametrize("stages, top, where, message", [
    ([FIRST, {**SECOND, "name": "pretrain"}], {}, "stages.1.name", "'pretrain' is also the name of stages.0"),
    ([], {}, "stages", "is empty"),
    ([FIRST], {"train": LM}, "train", "has no top-level train"),
    ([{**FIRST, "name": "Pre train"}], {}, "stages.0.name", "should match pattern"),
    ([{**FIRST, "train": {**LM, "out_dir": "x"}}], {}, "stages.0.train.out_dir", "set by the runner"),
    ([{**FIRST, "train": {**LM, "stepz": 3}}], {}, "stages.0.train.stepz", "did you mean 'steps'"),
    ([{**FIRST, "data": {"seq_len": 0}}], {}, "stages.0.data.seq_len", "greater than 0"),
    ([FIRST, {**SECOND, "init": "/nonexistent/run"}], {}, "stages.1.init", "/nonexistent/run: does not exist"),
])
def test_bad_stages_are_refused_with_their_key_path(tmp_path, cache, capsys, stages, top, where, message):
    path = blueprint(tmp_path, cache, stages, **top)
    assert main(["train", path]) == 2
    err = capsys.readouterr().err
    assert f"{where}: " in err and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_out_dir_belongs_to_stages_and_train_alone_is_unchanged(tmp_path, cache):
    data = {"model": MODEL, "train": LM, "out_dir": str(tmp_path)}
    (tmp_path / "bp.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(BlueprintError, match="out_dir: is the run directory of a blueprint with stages"):
        load_blueprint(str(tmp_path / "bp.yaml"))
    # --out places a staged run
    path = blueprint(tmp_path, cache, [{**FIRST, "train": {**LM, "steps": 1}}])
    assert main(["train", path, "--out", str(tmp_path / "elsewhere")]) == 0
    assert RunDir(tmp_path / "elsewhere" / "pretrain").latest().name == "checkpoint-000001"


def test_a_stage_data_section_is_merged_over_the_blueprints(tmp_path, cache):
    text = {"type": "text", "path": str(tmp_path)}
    path = blueprint(tmp_path, cache, [{**FIRST, "data": {"seq_len": 64, "tokenizer": {"vocab_size": 300}}},
                                       {**SECOND, "data": {"source": text}}])
    first, second = load_blueprint(path).stages
    assert (first.data.seq_len, first.data.tokenizer.vocab_size, first.data.source.max_bytes) == (64, 300, 400_000)
    # a component of another type is replaced whole: stdlib's max_bytes does not leak into the text source
    assert second.data.source.type == "text" and second.data.seq_len == 32 and second.data.cache_dir == str(cache)


def test_resume_of_a_run_made_by_another_blueprint_is_refused(tmp_path, cache):
    run(blueprint(tmp_path, cache, [{**FIRST, "train": {**LM, "steps": 1}}]))
    renamed = blueprint(tmp_path, cache, [{**FIRST, "name": "warmup", "train": {**LM, "steps": 1}}, FIRST])
    with pytest.raises(SetupError, match="this run finished stages pretrain, but the blueprint's stages are "
                                         "warmup, pretrain: it was made by another blueprint"):
        run(renamed, resume="auto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks that --device reaches the stages by asking for CUDA")
def test_device_option_reaches_every_stage(tmp_path, cache, capsys):
    path = blueprint(tmp_path, cache, [FIRST, SECOND])
    assert main(["train", path, "--device", "cuda"]) == 2
    assert "train.device: 'cuda', but this torch" in capsys.readouterr().err
