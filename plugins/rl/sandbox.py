"""Run untrusted Python (a model's completion) in a separate, limited process.

What is contained, and how (docs/rl.md, "The sandbox", says the same for users):
- a fresh interpreter (`python -I -S`: no site-packages, no PYTHON* variables, no user site), in a new process
  group, killed as a whole (SIGKILL) when the wall-clock limit passes;
- resource limits, set by a launcher before it execs the interpreter: CPU seconds (RLIMIT_CPU), address space
  (RLIMIT_AS), file size (RLIMIT_FSIZE), open files (RLIMIT_NOFILE), processes (RLIMIT_NPROC), no core dumps;
- an empty temporary working directory, deleted afterwards; an environment holding only a minimal PATH;
- where `unshare` works here: a network namespace with no interfaces up (no network), a PID namespace whose
  init dies with the sandbox (so every process it forked dies too, even one that left the process group), and,
  when we are root, the uid/gid `nobody` (RLIMIT_NPROC does not bind root; and `nobody` cannot write the
  caller's files or read other users' /proc/<pid>/environ).
What the probe found is in `containment()` and in every result's `info`.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

NOBODY = 65534
MINIMAL_PATH = "/usr/bin:/bin"


@dataclass(frozen=True)
class Limits:
    wall_s: float = 5.0
    cpu_s: int = 5
    memory_mb: int = 512
    max_processes: int = 32
    file_mb: int = 16
    output_kb: int = 64  # of stdout and of stderr kept for the caller


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None  # None: killed at the wall-clock limit
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float


def _works(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _unshare_prefix(root: bool) -> list[str]:
    """The `unshare` arguments that isolate network and PIDs here, or [] when this OS does not allow them."""
    exe = shutil.which("unshare")
    if exe is None:
        return []
    base = [exe, "--net", "--pid", "--fork", "--kill-child"]
    # root: drop to nobody inside; otherwise a user namespace (unprivileged) is needed to create the others
    prefix = base + ["--setuid", str(NOBODY), "--setgid", str(NOBODY)] if root else base + ["--map-root-user"]
    return prefix + ["--"] if _works(prefix + ["true"]) else []


@functools.cache
def containment() -> dict:
    """What this machine lets the sandbox contain, and the interpreter it runs (probed once per process)."""
    root = os.geteuid() == 0
    prefix = _unshare_prefix(root)
    # `nobody` may not reach this interpreter (a venv under /root): then a system one; the code gets only stdlib
    candidates = [os.path.realpath(sys.executable), shutil.which("python3", path=MINIMAL_PATH)]
    python = next((c for c in candidates if c and _works([*prefix, c, "-I", "-S", "-c", "pass"])), None)
    if python is None:
        raise RuntimeError(f"the sandbox found no Python interpreter it can run (tried {candidates}, "
                           f"wrapped in {prefix or 'nothing'})")
    return {
        "prefix": tuple(prefix),
        "python": python,
        "network": bool(prefix),  # no network namespace: the code can reach the network
        "pid_namespace": bool(prefix),
        "user": "nobody" if prefix and root else ("caller" if not root else "root"),
        # RLIMIT_NPROC counts the processes of the uid; root is exempt, so without the drop to nobody it is void
        "process_limit": not root or bool(prefix),
    }


# The first program inside the sandbox: it lowers its own limits, then becomes the interpreter that runs the code.
# (Setting them here rather than in a preexec_fn keeps the fork in the caller free of Python code, which is unsafe
# when the caller has threads.) Limits already set hold for everything it execs and forks.
LAUNCHER = ("import os, resource, sys\n"
            "for arg in sys.argv[1:]:\n"
            "    name, value = arg.split('=')\n"
            "    resource.setrlimit(getattr(resource, name), (int(value), int(value)))\n"
            "os.execv(sys.executable, [sys.executable, '-I', '-S', '-'])\n")


def _rlimits(limits: Limits) -> list[str]:
    mb = 1 << 20
    return [f"RLIMIT_CPU={limits.cpu_s}", f"RLIMIT_AS={limits.memory_mb * mb}", f"RLIMIT_FSIZE={limits.file_mb * mb}",
            f"RLIMIT_NPROC={limits.max_processes}", "RLIMIT_NOFILE=64", "RLIMIT_CORE=0"]


def _tail(path: str, kb: int) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - kb * 1024))
        return f.read().decode("utf-8", "replace")


def run_python(source: str, limits: Limits = Limits()) -> SandboxResult:
    """Run `source` (read by the interpreter from stdin, so the code cannot read it back from a file or its
    command line) under `limits`. Never raises for anything the code does."""
    info = containment()
    work = tempfile.mkdtemp(prefix="hyloom-sandbox-")  # the code's working directory
    private = tempfile.mkdtemp(prefix="hyloom-sandbox-io-")  # stdout/stderr files: the code holds only the fds
    try:
        if info["user"] == "nobody":
            os.chown(work, NOBODY, NOBODY)
        out_path, err_path = os.path.join(private, "out"), os.path.join(private, "err")
        argv = [*info["prefix"], info["python"], "-I", "-S", "-c", LAUNCHER, *_rlimits(limits)]
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=work,
                                    env={"PATH": MINIMAL_PATH}, start_new_session=True, close_fds=True)
            timed_out = False
            try:
                proc.communicate(source.encode(), timeout=limits.wall_s)  # the timeout covers feeding stdin too
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)  # also whatever it left behind in its group
                proc.wait()
        seconds = time.monotonic() - start
        return SandboxResult(None if timed_out else proc.returncode, _tail(out_path, limits.output_kb),
                             _tail(err_path, limits.output_kb), timed_out, seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
