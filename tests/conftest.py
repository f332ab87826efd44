"""Shared fixtures. The device the Triton kernels are tested on is decided here, once, before anything imports
triton: with a CUDA GPU they are compiled and run on CUDA tensors; without one they run under Triton's CPU
interpreter (TRITON_INTERPRET=1, read when triton decorates the kernels). HYLOOM_TEST_DEVICE=cpu hides the GPU
and runs the whole suite as on a CPU machine; HYLOOM_TEST_DEVICE=cuda refuses to run without a GPU."""
import importlib
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

# `python -m pytest` from the repository root puts the root on sys.path, where our kernels/ folder shadows Hugging
# Face's `kernels` distribution (transformers 5.25+ imports it). The tests use hyloom as installed, like a user: the
# root comes off the path here, and PYTHONSAFEPATH (Python 3.11+) keeps it off in the processes the tests start.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
os.environ["PYTHONSAFEPATH"] = "1"

_forced = os.environ.get("HYLOOM_TEST_DEVICE", "")
if _forced not in ("", "cpu", "cuda"):
    raise pytest.UsageError(f"HYLOOM_TEST_DEVICE must be cpu or cuda, not {_forced!r}")
if _forced == "cpu":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch looks for a GPU: every test sees a CPU machine

import torch  # noqa: E402

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if _forced == "cuda" and KERNEL_DEVICE != "cuda":
    raise pytest.UsageError("HYLOOM_TEST_DEVICE=cuda but torch sees no CUDA GPU")
if KERNEL_DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
elif os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    # the interpreter on CUDA tensors would also reach the model and trainer tests, which expect compiled kernels
    raise pytest.UsageError("TRITON_INTERPRET is set on a machine with a CUDA GPU; unset it, or test the "
                            "interpreter with HYLOOM_TEST_DEVICE=cpu")
else:
    # fp32 dots in fp32 (Triton's default on a GPU is tf32, ~1e-3): the fp32 kernel tests then check the kernels'
    # arithmetic to 1e-5; the tensor-core path is what the bf16 tests check.
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

from packaging.version import Version  # noqa: E402

from hyloom.registry import reset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PLUGIN = ROOT / "docs" / "examples" / "hyloom-example-plugin"
# Kernel tests that take `dtype` run in fp32 everywhere, and in bf16 too on CUDA (the interpreter's bf16 tl.dot
# returns garbage).
KERNEL_DTYPES = [torch.float32] + ([torch.bfloat16] if KERNEL_DEVICE == "cuda" else [])
# Relative error a kernel may show against the fp32 reference. fp32: fp32 products on both devices (numpy in the
# interpreter; IEEE dots on CUDA, set above), only the summation order differs. bf16: 8-bit mantissas.
KERNEL_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def interpreter_broken() -> str | None:
    """Why Triton's CPU interpreter cannot run the kernels here, or None. Triton 3.6's interpreter turns a
    one-element array into an index with int(array), which numpy 2.4 refuses ("only 0-dimensional arrays can be
    converted to Python scalars"); triton 3.7 takes the element first."""
    try:
        triton_version = Version(importlib.metadata.version("triton"))
    except importlib.metadata.PackageNotFoundError:
        return "triton is not installed"
    numpy_version = Version(importlib.metadata.version("numpy"))
    if triton_version < Version("3.7") and numpy_version >= Version("2.4"):
        return (f"the CPU interpreter of triton {triton_version} fails with numpy {numpy_version}; "
                "use triton >= 3.7 or numpy < 2.4 (or a CUDA GPU)")
    return None


@pytest.fixture
def device() -> torch.device:
    """Where a test runs the Triton kernels: CUDA (compiled) or CPU (interpreter), skipped where neither works."""
    if KERNEL_DEVICE == "cpu" and (reason := interpreter_broken()):
        pytest.skip(reason)
    return torch.device(KERNEL_DEVICE)


def pytest_generate_tests(metafunc):
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: str(d).removeprefix("torch."))


@pytest.fixture
def tol(dtype) -> float:
    return KERNEL_TOLERANCE[dtype]


@pytest.fixture(autouse=True)
def _fresh_registry():
    """Every test starts and ends with a registry built from what is on sys.path right then."""
    reset()
    yield
    reset()


@pytest.fixture(scope="session")
def example_plugin_dir(tmp_path_factory) -> Path:
    """The documented example plugin, really built and installed (dist-info + entry point) into a folder."""
    target = tmp_path_factory.mktemp("example-plugin")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(EXAMPLE_PLUGIN)], check=True)
    return target


@pytest.fixture
def make_distribution(monkeypatch):
    """make_distribution(folder, dist, version, module, source, ep_name) writes a minimal installed
    distribution: a module, its dist-info and an entry point in `hyloom.plugins`."""
    return lambda *args: _write_distribution(monkeypatch, *args)


def _write_distribution(monkeypatch, folder: Path, dist, version, module, source, ep_name) -> Path:
    monkeypatch.delitem(sys.modules, module, raising=False)  # forget it again after the test
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(source)
    info = folder / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[hyloom.plugins]\n{ep_name} = {module}\n")
    return folder


@pytest.fixture
def on_path(monkeypatch):
    """Put folders on sys.path (as if their distributions were installed) for one test."""

    def add(*folders):
        for folder in folders:
            monkeypatch.syspath_prepend(str(folder))
        importlib.invalidate_caches()
        reset()

    return add
