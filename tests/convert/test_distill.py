"""The `distill` trainer (conversion stage 2): the forward KL to the teacher falls with every weight training, a
fresh student starts from the teacher (weight transfer) while one from an earlier stage keeps its weights, resume
continues exactly, and a teacher that is missing or does not fit is refused before any work."""

import pytest
import torch
import yaml

from hyloom.blueprint import load_blueprint
from hyloom.checkpoint import load_checkpoint, load_safetensors
from hyloom.cli import main
from hyloom.plugins.convert import loop
from hyloom.plugins.convert.distill import forward_kl
from hyloom.plugins.convert.teacher import load_teacher
from hyloom.plugins.convert.transfer import transfer
from hyloom.train import RunDir, train
from tiny_teacher import build, make_teacher, student

DATA = {"source": {"type": "stdlib", "max_bytes": 400_000}, "tokenizer": {"type": "bpe", "vocab_size": 512},
        "seq_len": 32}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("teacher") / "checkpoint")


def settings(tmp_path, teacher, **train_cfg):
    return {"type": "distill", "teacher": str(teacher), "steps": 8, "batch_size": 4, "lr": 3e-3, "warmup": 1,
            "eval_every": 4, "eval_batches": 2, "save_every": 2, "keep": 10, "log_every": 1,
            "out_dir": str(tmp_path / "run"), **train_cfg}


def blueprint(tmp_path, cache, teacher, model=None, **train_cfg) -> str:
    data = {"model": model or student("LAL"), "data": {**DATA, "cache_dir": str(cache)},
            "train": settings(tmp_path, teacher, **train_cfg)}
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "bp.yaml").write_text(yaml.safe_dump(data))
    return str(tmp_path / "bp.yaml")


def run(path, resume=None):
    bp = load_blueprint(path)
    return train(bp, bp.model_dump(mode="json"), resume=resume, progress=False)


def kl_on(teacher, model, ids):
    with torch.no_grad():
        return forward_kl(model(ids), teacher(ids)).item()


def test_forward_kl_is_the_textbook_one():
    s, t = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    p = t.softmax(-1)
    expected = (p * (p.log() - s.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(forward_kl(s, t), expected)
    p2 = (t / 2).softmax(-1)
    torch.testing.assert_close(forward_kl(s, t, 2.0), 4 * (p2 * (p2.log() - (s / 2).log_softmax(-1))).sum(-1).mean())
    assert forward_kl(t, t).item() == pytest.approx(0, abs=1e-6)


def test_distill_lowers_the_kl_from_the_transferred_student(tmp_path, cache, teacher_dir):
    result = run(blueprint(tmp_path, cache, teacher_dir, steps=30, eval_every=10, save_every=30))
    teacher = load_teacher(teacher_dir, device="cpu")
    start = build(student("LAL"))
    transfer(teacher, start)  # what a fresh first stage starts from
    distilled, bp = load_checkpoint(result["checkpoint"])
    assert bp.model.layout == ["L", "A", "L"]
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(3))
    before, after = kl_on(teacher, start, ids), kl_on(teacher, distilled, ids)
    assert after < 0.7 * before, (before, after)
    changed = [k for k, v in distilled.state_dict().items() if not torch.equal(v, start.state_dict()[k])]
    assert "embed_tokens.weight" in changed and "layers.1.ffn_norm.weight" in changed  # all weights train
    metrics = RunDir(tmp_path / "run").metrics()
    assert {"loss", "lm_loss", "lr"} <= set(metrics[0])
    assert {"eval_loss", "eval_lm_loss", "eval_teacher_lm_loss"} <= set(metrics[-1])


def test_transfer_happens_only_for_a_fresh_student(tmp_path, cache, teacher_dir):
    teacher = load_teacher(teacher_dir, device="cpu")
    tiny = dict(steps=1, lr=1e-12, warmup=0, eval_every=1, save_every=1)
    on = load_safetensors(run(blueprint(tmp_path / "on", cache, teacher_dir, **tiny))["checkpoint"])
    off = load_safetensors(run(blueprint(tmp_path / "off", cache, teacher_dir, transfer=False, **tiny))["checkpoint"])
    theirs = teacher.state_dict()
    assert torch.allclose(on["embed_tokens.weight"], theirs["embed_tokens.weight"], atol=1e-8)
    assert not torch.allclose(off["embed_tokens.weight"], theirs["embed_tokens.weight"], atol=1e-3)


def test_distill_after_align_starts_from_the_aligned_twins(tmp_path, cache, teacher_dir):
    data = {"model": student("LLL"), "data": {**DATA, "cache_dir": str(cache)}, "out_dir": str(tmp_path / "runs"),
            "stages": [{"name": "align", "train": {**settings(tmp_path, teacher_dir, steps=4, lr=1e-2),
                                                   "type": "align"}},
                       {"name": "distill", "train": settings(tmp_path, teacher_dir, steps=1, lr=1e-12, warmup=0)}]}
    for stage in data["stages"]:
        del stage["train"]["out_dir"]  # the runner's: runs/<stage>
    (tmp_path / "bp.yaml").write_text(yaml.safe_dump(data))
    run(str(tmp_path / "bp.yaml"))
    aligned = load_safetensors(RunDir(tmp_path / "runs" / "align").latest())
    distilled = load_safetensors(RunDir(tmp_path / "runs" / "distill").latest())
    for name in ("layers.0.mixer.z_proj.weight", "layers.2.mixer.q_proj.weight"):  # not reset by a transfer
        assert torch.allclose(distilled[name], aligned[name], atol=1e-8), name


def test_distill_resumes_exactly(tmp_path, cache, teacher_dir, monkeypatch):
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
    run(broken, resume="auto")
    assert RunDir(tmp_path / "b" / "run").metrics() == RunDir(tmp_path / "a" / "run").metrics()
    final_a = load_safetensors(tmp_path / "a" / "run" / "checkpoint-000008")
    final_b = load_safetensors(tmp_path / "b" / "run" / "checkpoint-000008")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


@pytest.mark.parametrize("changes, said", [
    ({"d_model": 48}, "model.d_model: 48, but the teacher's is 32"),
    ({"vocab_size": 600}, "model.vocab_size: 600, but the teacher's is 512"),
])
def test_a_teacher_that_does_not_fit_is_refused_before_any_work(tmp_path, teacher_dir, capsys, changes, said):
    fresh = tmp_path / "cache"
    assert main(["train", blueprint(tmp_path, fresh, teacher_dir, model=student("LAL", **changes)),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err and not fresh.exists()


def test_without_transfer_only_the_vocabulary_must_match(tmp_path, cache, teacher_dir, capsys):
    fresh = tmp_path / "cache"
    assert main(["train", blueprint(tmp_path / "a", fresh, teacher_dir, model=student("LAL", vocab_size=600),
                                    transfer=False), "--no-progress"]) == 2
    assert "model.vocab_size: 600, but the teacher's is 512" in capsys.readouterr().err and not fresh.exists()
    wider = student("LLL", d_model=48, mixers={"L": {"type": "lightning", "heads": 2}})  # a student of its own
    assert main(["train", blueprint(tmp_path / "b", cache, teacher_dir, model=wider, transfer=False, steps=1),
                 "--no-progress"]) == 0


def test_a_missing_teacher_is_refused_before_any_work(tmp_path, capsys):
    fresh = tmp_path / "cache"
    assert main(["train", blueprint(tmp_path, fresh, tmp_path / "gone"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "gone: does not exist" in err and "Traceback" not in err and not fresh.exists()


def test_compiled_distillation_gives_the_eager_losses(tmp_path, cache, teacher_dir, monkeypatch, capsys):
    """`compile: true` runs the student's blocks compiled for the training steps (aot_eager on CPU: tracing and
    autograd, no code generation): one graph per kind of block, none broken, the same losses as eager; the
    held-out evaluations run the blocks as written."""
    from torch._dynamo.utils import counters

    from hyloom.plugins.train import lm
    monkeypatch.setattr(lm, "COMPILE_BACKEND", "aot_eager")
    losses = {}
    for name, compile_ in (("eager", False), ("compiled", True)):
        torch._dynamo.reset()
        counters.clear()
        run(blueprint(tmp_path / name, cache, teacher_dir, steps=3, eval_every=3, save_every=3, compile=compile_))
        assert (", compiled" in capsys.readouterr().out) == compile_  # the startup summary says so
        losses[name] = [r["loss"] for r in RunDir(tmp_path / name / "run").metrics()]
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()
    assert len(losses["eager"]) == 3
    torch.testing.assert_close(losses["compiled"], losses["eager"], rtol=1e-4, atol=0)


def test_lm_weight_mixes_the_next_token_loss_into_the_training_loss(tmp_path, cache, teacher_dir, capsys):
    """w = 0 trains on the KL alone; otherwise every step's loss is (1 − w)·KL + w·CE, and the held-out loss stays
    the KL."""
    for w in (0.0, 0.5):
        run(blueprint(tmp_path / str(w), cache, teacher_dir, steps=4, eval_every=4, save_every=4, lm_weight=w))
        assert ("next-token loss (weight 0.5)" in capsys.readouterr().out) == (w > 0)
        rows = RunDir(tmp_path / str(w) / "run").metrics()
        for r in rows:
            assert r["loss"] == pytest.approx((1 - w) * r["kl"] + w * r["lm_loss"], rel=1e-5)
        assert rows[-1]["eval_loss"] != pytest.approx(rows[-1]["eval_lm_loss"], rel=1e-3)
