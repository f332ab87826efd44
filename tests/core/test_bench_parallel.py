"""bench/parallel.sh: jobs run side by side, each with its own folder, log and status, packed one file each; the
exit status counts the failed jobs; bad arguments exit 2."""

import subprocess
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "parallel.sh"


def test_jobs_run_side_by_side_and_each_folder_comes_back_packed(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(SCRIPT), str(out), "2", "ok", "echo 42 > $JOB_OUT/answer.txt; echo said",
                           "slow", "sleep 5", "bad", "exit 3"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2  # slow (timed out) and bad
    assert sorted(p.name for p in out.iterdir()) == ["bad.tgz", "ok.tgz", "slow.tgz"]
    with tarfile.open(out / "ok.tgz") as tar:
        read = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}
    assert read["ok/answer.txt"] == "42\n" and read["ok/log.txt"] == "said\n"
    assert read["ok/status.txt"].startswith("rc=0 ")
    assert "slow: rc=124" in done.stdout and "bad: rc=3" in done.stdout


def test_bad_arguments_exit_2(tmp_path):
    for argv in (["x"], [str(tmp_path), "soon", "a", "true"], [str(tmp_path), "5", "a b", "true"]):
        assert subprocess.run(["bash", str(SCRIPT), *argv], capture_output=True, timeout=10).returncode == 2
