"""python_tests and its sandbox against hostile completions: each gets the failure reward and the caller goes on.

Timeouts are short (1-2 s); the fork bomb is bounded by the process limit and the wall-clock kill of its group."""

import os
import time

import pytest

from hyloom.plugins.rl.sandbox import Limits, containment, run_python
from hyloom.plugins.rl.verifiers import build_verifier

RECORD = {"prompt": "write add", "tests": ["assert add(2, 3) == 5", "assert add(3, 0) == 3"]}
FAST = {"type": "python_tests", "timeout_s": 2.0, "cpu_s": 2, "max_processes": 16, "correct": 1.0, "wrong": -1.0}


def _verify(code, record=RECORD, **cfg):
    return build_verifier({**FAST, **cfg})(record, code)


def test_honest_pass_and_fail():
    ok = _verify("Here it is:\n```python\ndef add(a, b):\n    return a + b\n```")
    assert ok.reward == 1.0 and ok.info["passed"] == 2
    bad = _verify("def add(a, b):\n    return a - b")
    assert bad.reward == -1.0 and bad.info["passed"] == 1 and "AssertionError" in bad.info["stderr"]


def test_early_exit_or_a_printed_claim_does_not_pass():
    assert _verify("import os\nos._exit(0)").reward == -1.0
    assert _verify('print(\'{"marker": "x", "passed": 2}\')\nraise SystemExit(0)').reward == -1.0


def test_infinite_loop_is_killed_at_the_wall_clock_limit():
    start = time.monotonic()
    r = _verify("while True:\n    pass", timeout_s=1.0)
    assert r.reward == -1.0 and r.info["timed_out"] and time.monotonic() - start < 5


def test_the_limits_hold_inside():
    code = ("import resource\nfor n in ('CPU', 'AS', 'FSIZE', 'NPROC'):\n"
            "    print(resource.getrlimit(getattr(resource, 'RLIMIT_' + n))[0])")
    r = run_python(code, Limits(wall_s=2, cpu_s=3, memory_mb=300, max_processes=7, file_mb=2))
    assert r.stdout.split() == ["3", str(300 << 20), str(2 << 20), "7"]


def test_cpu_limit_stops_a_busy_loop_before_the_wall_clock_one():
    r = run_python("while True: pass", Limits(wall_s=10, cpu_s=1))
    assert not r.timed_out and r.returncode != 0 and r.seconds < 5


def test_memory_bomb_fails():
    r = _verify("hog = [b'x' * 10**7 for _ in range(400)]\ndef add(a, b):\n    return a + b", memory_mb=256)
    assert r.reward == -1.0 and "MemoryError" in r.info["stderr"]


def test_a_flood_of_output_is_cut_off():
    r = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", Limits(wall_s=5, file_mb=1))
    assert not r.timed_out and r.returncode != 0 and len(r.stdout) <= 64 * 1024  # RLIMIT_FSIZE stopped it


def _uid_processes(uid):
    pids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                pids.add(pid)
        except FileNotFoundError:
            pass
    return pids


@pytest.mark.skipif(not containment()["process_limit"], reason="RLIMIT_NPROC does not bind here (root, no unshare)")
def test_fork_bomb_is_bounded_and_leaves_nothing_behind():
    uid = 65534 if containment()["user"] == "nobody" else os.getuid()
    before = _uid_processes(uid)
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    r = _verify(code, timeout_s=1.0, max_processes=16)
    assert r.reward == -1.0 and time.monotonic() - start < 10
    if uid == 65534:  # our own uid runs pytest itself: only nobody's processes can be told apart
        deadline = time.monotonic() + 5  # SIGKILL is delivered at once, the reaping takes a moment
        while _uid_processes(uid) - before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _uid_processes(uid) - before == set()


def test_writes_outside_its_directory_are_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    code = f"open({str(target)!r}, 'w').write('x')\ndef add(a, b):\n    return a + b"
    r = _verify(code)
    if containment()["user"] == "nobody":
        assert r.reward == -1.0 and "PermissionError" in r.info["stderr"] and not target.exists()
    else:  # running as the caller's own user, the caller's files are writable: docs/rl.md says so
        pytest.skip("the sandbox runs as the caller here; file writes are not contained")


def test_its_own_directory_is_empty_writable_and_removed():
    r = run_python("import os\nprint(os.listdir('.'))\nopen('f', 'w').write('x')\nprint(os.getcwd())",
                   Limits(wall_s=2))
    listing, cwd = r.stdout.split()
    assert r.returncode == 0 and listing == "[]" and not os.path.exists(cwd)


def test_the_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("HYLOOM_TEST_SECRET", "s3cr3t-value")
    code = ("import os, glob\n"
            "seen = 's3cr3t-value' in str(os.environ)\n"
            "for path in glob.glob('/proc/*/environ'):\n"
            "    try:\n        seen = seen or b's3cr3t-value' in open(path, 'rb').read()\n"
            "    except OSError:\n        pass\n")
    leak = _verify(code, record={"tests": "assert seen"})
    assert leak.reward == -1.0 and leak.info["passed"] == 0  # the secret was found nowhere
    env = run_python("import os; print(sorted(os.environ))", Limits(wall_s=2)).stdout
    assert "HYLOOM_TEST_SECRET" not in env and "PATH" in env


@pytest.mark.skipif(not containment()["network"], reason="no network namespace on this machine")
def test_no_network():
    r = run_python("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)", Limits(wall_s=2))
    assert r.returncode != 0 and "unreachable" in r.stderr
