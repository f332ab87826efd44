"""The whole conversion (align → select → distill → lm) from one blueprint on a tiny teacher: each stage's
outputs, the hybrid the select step saves (kept layers the teacher's attention, the rest the aligned twins), the chosen
layout reaching the final checkpoint, --resume auto after a crash between stages; the select step's refusals
before any work; and the full-size recipe validating without its teacher and refused clearly by train."""

import json
from pathlib import Path

import pytest
import torch

from hyloom.blueprint import load_blueprint
from hyloom.checkpoint import load_safetensors
from hyloom.cli import main
from hyloom.plugins.convert.distill import DistillTrainer
from hyloom.train import RunDir, saved_blueprint
from tiny_teacher import make_teacher

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "blueprints" / "experiments" / "convert-tiny.yaml")
STAGES = ("align", "select", "distill", "long")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("teacher") / "checkpoint")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


def metrics(folder):
    """metrics.jsonl without the timing, which differs from run to run."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in RunDir(folder).metrics()]


def args(out, cache, teacher, *more):
    return ["train", TINY, *(f"stages.{i}.train.teacher={teacher}" for i in range(3)), f"out_dir={out}",
            f"data.cache_dir={cache}", *more, "--no-progress"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, cache, teacher_dir):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    assert main(args(out, cache, teacher_dir)) == 0
    return out


def test_every_stage_writes_its_outputs(pipeline):
    finished = json.loads((pipeline / "stages.json").read_text())["finished"]
    assert [d["name"] for d in finished] == list(STAGES)
    for name in ("align", "distill", "long"):
        assert (pipeline / name / "metrics.jsonl").is_file() and (pipeline / name / "loss.png").is_file()
    selection = json.loads((pipeline / "select" / "selection.json").read_text())
    assert selection["selector"] == "kl" and selection["budget"] == 1 and len(selection["kept"]) == 1
    assert all(row["score"] is not None for row in selection["layers"])
    assert (pipeline / "select" / "selection.png").stat().st_size > 0
    assert saved_blueprint(RunDir(pipeline / "align").latest())["model"]["layout"] == ["L"] * 3


def test_the_chosen_layout_reaches_the_final_checkpoint(pipeline):
    kept = json.loads((pipeline / "select" / "selection.json").read_text())["kept"]
    layout = ["A" if i in kept else "L" for i in range(3)]
    for name in ("select", "distill", "long"):
        assert saved_blueprint(RunDir(pipeline / name).latest())["model"]["layout"] == layout, name


def test_the_hybrid_keeps_the_teachers_attention_and_the_aligned_twins(pipeline, teacher_dir):
    kept = json.loads((pipeline / "select" / "selection.json").read_text())["kept"][0]
    hybrid = load_safetensors(RunDir(pipeline / "select").latest())
    aligned = load_safetensors(RunDir(pipeline / "align").latest())
    teacher = load_safetensors(teacher_dir)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
        key = f"layers.{kept}.mixer.{name}.weight"
        assert torch.equal(hybrid[key], teacher[key]), key
    assert f"layers.{kept}.mixer.g_proj.weight" in hybrid  # the fresh gate
    twins = [k for k in hybrid if ".mixer." in k and not k.startswith(f"layers.{kept}.")]
    outside = [k for k in hybrid if ".mixer." not in k]
    assert twins and outside
    for key in twins + outside:
        assert torch.equal(hybrid[key], aligned[key]), key


def test_a_neutral_gate_starts_the_kept_layers_as_the_teachers(tmp_path, cache, teacher_dir):
    """select's gate_init: neutral gives each kept layer a zero gate and o_proj doubled (2 · sigmoid(0) = 1)."""
    out = tmp_path / "run"
    assert main(args(out, cache, teacher_dir, "stages.1.train.gate_init=neutral")) == 0
    kept = json.loads((out / "select" / "selection.json").read_text())["kept"][0]
    hybrid, teacher = load_safetensors(RunDir(out / "select").latest()), load_safetensors(teacher_dir)
    prefix = f"layers.{kept}.mixer."
    assert not hybrid[prefix + "g_proj.weight"].any()
    assert torch.equal(hybrid[prefix + "o_proj.weight"], 2 * teacher[prefix + "o_proj.weight"])


def test_resume_auto_after_a_crash_between_stages(tmp_path, cache, teacher_dir, pipeline, monkeypatch, capsys):
    out = tmp_path / "run"

    def crash(self, model, data, run):
        raise KeyboardInterrupt("the machine went away")

    with monkeypatch.context() as m:
        m.setattr(DistillTrainer, "fit", crash)
        with pytest.raises(KeyboardInterrupt):
            main(args(out, cache, teacher_dir))
    finished = json.loads((out / "stages.json").read_text())["finished"]
    assert [d["name"] for d in finished] == ["align", "select"]
    assert main(args(out, cache, teacher_dir)) == 2  # a used folder needs --resume auto
    assert main(args(out, cache, teacher_dir, "--resume", "auto")) == 0
    assert [d["name"] for d in json.loads((out / "stages.json").read_text())["finished"]] == list(STAGES)
    for name in ("distill", "long"):  # exactly as the run that never stopped
        assert metrics(out / name) == metrics(pipeline / name), name
    final, reference = (load_safetensors(RunDir(p / "long").latest()) for p in (out, pipeline))
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_select_resumed_after_saving_is_not_run_again(tmp_path, cache, teacher_dir, pipeline, monkeypatch):
    """A crash after the hybrid was saved but before the stage was recorded: --resume auto keeps that hybrid."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(pipeline, out)
    for name in ("distill", "long"):
        shutil.rmtree(out / name)
    record = json.loads((out / "stages.json").read_text())
    (out / "stages.json").write_text(json.dumps({"finished": record["finished"][:1]}))
    from hyloom.plugins.convert import selectors

    monkeypatch.setattr(selectors.Kl, "measure", lambda *a: pytest.fail("measured again"))
    assert main(args(out, cache, teacher_dir, "--resume", "auto")) == 0
    assert metrics(out / "long") == metrics(pipeline / "long")


@pytest.mark.parametrize("override, said", [
    ("stages.1.train.budget=4", "budget 4 is outside [0, 3]"),
    ("stages.1.train.budget=1.5", "stages.1.train.budget"),
    ("stages.1.train.selector={type: fixed, layers: [0, 1]}", "keep 2 layers, but the budget is 1"),
    ("stages.1.train.selector={type: kl, seq_len: 0}", "stages.1.train.selector.seq_len"),
    ("stages.1.train.selector={type: halo, recall: {type: passkey, lengths: [0]}}", "selector.recall"),
    ("stages.1.train.selector={type: kl, sequence: 4}", "stages.1.train.selector.sequence: unknown key"),
    ("stages.1.train.selector={type: halp}", "'halp' is not a registered selector; did you mean 'halo'?"),
    ("stages.1.train.attention=L", "'L' is not an attention symbol"),
    ("model.mixers.A.heads=2", "model.mixers.A (layer 0).heads: 2, but the teacher's layer 0 has 4"),
])
def test_bad_selection_settings_are_refused_before_any_work(tmp_path, teacher_dir, capsys, override, said):
    fresh = tmp_path / "cache"
    assert main(args(tmp_path / "run", fresh, teacher_dir, override)) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err
    assert not fresh.exists() and not (tmp_path / "run").exists()


def test_a_fractional_budget_rounds_to_the_nearest_count():
    from hyloom.plugins.convert.config import SelectConfig

    assert [SelectConfig(teacher="t", selector={"type": "even"}, budget=b).layers(28) for b in (0.25, 0.0, 1.0)] == \
        [7, 0, 28]
    assert SelectConfig(teacher="t", selector={"type": "even"}, budget=0.5).layers(3) == 2  # 1.5: halves up


def test_the_full_size_recipe_validates_without_its_teacher_and_train_refuses(tmp_path, capsys):
    assert main(["validate", "builtin:convert-qwen3-1.7b-hypenet"]) == 0
    bp = load_blueprint("builtin:convert-qwen3-1.7b-hypenet")
    assert [s.name for s in bp.stages] == list(STAGES)
    assert bp.stages[1].train.layers(bp.model.n_layers) == 7 and bp.stages[1].train.selector.type == "halo"
    assert {bp.stages[i].train.teacher for i in range(3)} == {bp.data.tokenizer.path} == {"models/Qwen3-1.7B"}
    capsys.readouterr()
    assert main(["train", "builtin:convert-qwen3-1.7b-hypenet", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "teacher models/Qwen3-1.7B: does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
