import json

from hyloom.train import RunDir


def lines(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_forget_after_keeps_steps_up_to_the_resume_point_in_every_named_log(tmp_path):
    run = RunDir(tmp_path)
    for step in (10, 20, 30):
        run.log({"step": step, "loss": 1.0 / step})
    (tmp_path / "completions.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (10, 30)))
    run.forget_after(20, ("metrics.jsonl", "completions.jsonl", "absent.jsonl"))
    assert lines(tmp_path / "metrics.jsonl") == [10, 20]
    assert lines(tmp_path / "completions.jsonl") == [10]
    assert not (tmp_path / "absent.jsonl").exists()
    run.forget_after(0)  # a fresh start forgets everything
    assert (tmp_path / "metrics.jsonl").read_text() == ""
