"""The `align` trainer (conversion stage 1): the all-twin student's per-layer MSE to its teacher falls, only the
twins train, resume continues exactly, and a teacher that is missing or does not fit is refused before any work."""

import pytest
import torch
import yaml

from hyloom.blueprint import load_blueprint
from hyloom.checkpoint import load_checkpoint, load_safetensors, save_checkpoint
from hyloom.cli import main
from hyloom.plugins.convert import loop
from hyloom.plugins.convert.align import MixerTaps
from hyloom.plugins.convert.teacher import load_teacher
from hyloom.plugins.convert.transfer import transfer
from hyloom.train import RunDir, train
from tiny_teacher import build, make_teacher, student


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("teacher") / "checkpoint")


def blueprint(tmp_path, cache, teacher, layout="LAL", model=None, **train_cfg) -> str:
    data = {"model": model or student(layout),
            "data": {"source": {"type": "stdlib", "max_bytes": 400_000},
                     "tokenizer": {"type": "bpe", "vocab_size": 512}, "seq_len": 32, "cache_dir": str(cache)},
            "train": {"type": "align", "teacher": str(teacher), "steps": 8, "batch_size": 4, "lr": 1e-2,
                      "warmup": 1, "eval_every": 4, "eval_batches": 2, "save_every": 2, "keep": 10, "log_every": 1,
                      "out_dir": str(tmp_path / "run"), **train_cfg}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "bp.yaml").write_text(yaml.safe_dump(data))
    return str(tmp_path / "bp.yaml")


def run(path, resume=None):
    bp = load_blueprint(path)
    return train(bp, bp.model_dump(mode="json"), resume=resume, progress=False)


def layer_mse(teacher, student_model, ids):
    from dataclasses import replace

    recorded = MixerTaps(teacher)(ids)
    with torch.no_grad():
        return [torch.nn.functional.mse_loss(b.mixer(x, replace(ctx, position=b.position)), y).item()
                for b, (x, ctx, y) in zip(student_model.layers, recorded)]


def test_align_lowers_every_layer_mse_and_trains_only_the_twins(tmp_path, cache, teacher_dir):
    result = run(blueprint(tmp_path, cache, teacher_dir, steps=30, eval_every=10, save_every=30))
    aligned, bp = load_checkpoint(result["checkpoint"])
    assert bp.model.layout == ["L", "L", "L"]  # every layer the twin, whatever the blueprint's layout ("LAL")
    teacher = load_teacher(teacher_dir, device="cpu")
    start = build(student("LLL"))
    transfer(teacher, start)  # where align began
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(3))
    before, after = layer_mse(teacher, start, ids), layer_mse(teacher, aligned, ids)
    assert all(a < 0.7 * b for a, b in zip(after, before)), (before, after)
    for name, tensor in aligned.state_dict().items():  # embedding, norms, FFNs: the teacher's, untouched
        if ".mixer." not in name:
            assert torch.equal(tensor, teacher.state_dict()[name]), name
    metrics = RunDir(tmp_path / "run").metrics()
    assert {"mse/0", "mse/1", "mse/2", "lr", "grad_norm"} <= set(metrics[0])
    assert [r["step"] for r in metrics if "eval_loss" in r] == [10, 20, 30]
    assert "eval_mse/2" in metrics[-1] and (tmp_path / "run" / "loss.png").is_file()


def test_align_resumes_exactly(tmp_path, cache, teacher_dir, monkeypatch):
    run(blueprint(tmp_path / "a", cache, teacher_dir))
    broken = blueprint(tmp_path / "b", cache, teacher_dir)
    real = loop.learning_rate

    def crash_at_step_6(step, **kw):
        if step == 5:
            raise KeyboardInterrupt("the machine went away")
        return real(step, **kw)

    monkeypatch.setattr(loop, "learning_rate", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        run(broken)
    monkeypatch.setattr(loop, "learning_rate", real)
    assert RunDir(tmp_path / "b" / "run").latest().name == "checkpoint-000004"
    run(broken, resume="auto")
    assert RunDir(tmp_path / "b" / "run").metrics() == RunDir(tmp_path / "a" / "run").metrics()
    final_a = load_safetensors(tmp_path / "a" / "run" / "checkpoint-000008")
    final_b = load_safetensors(tmp_path / "b" / "run" / "checkpoint-000008")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_a_missing_teacher_is_refused_before_any_work(tmp_path, capsys):
    fresh = tmp_path / "cache"
    assert main(["train", blueprint(tmp_path, fresh, tmp_path / "no-teacher"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no-teacher: does not exist" in err and "Traceback" not in err
    assert not fresh.exists() and not (tmp_path / "run").exists()


def test_a_teacher_that_does_not_fit_is_refused_before_any_work(tmp_path, teacher_dir, capsys):
    fresh = tmp_path / "cache"
    wide = student("LLL", mixers={"L": {"type": "lightning", "heads": 2, "head_dim": 16}})
    assert main(["train", blueprint(tmp_path, fresh, teacher_dir, model=wide), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "model.mixers.L (layer 0).heads: 2, but the teacher's layer 0 has heads 4" in err
    assert "Traceback" not in err and not fresh.exists()


def test_data_in_another_tokenizer_than_the_teachers_is_refused(tmp_path, cache, teacher_dir, capsys):
    teacher, _ = load_checkpoint(teacher_dir)
    other = save_checkpoint(tmp_path / "teacher", teacher, yaml.safe_load((teacher_dir / "blueprint.yaml").read_text()),
                            extra_files={"tokenizer.json": '{"model": {"type": "BPE", "vocab": {"a": 0}}}'})
    assert main(["train", blueprint(tmp_path, cache, other), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the data's tokenizer" in err and "is not the teacher's" in err
    assert not RunDir(tmp_path / "run").checkpoints()
