import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from hyloom.registry import reset

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PLUGIN = ROOT / "docs" / "examples" / "hyloom-example-plugin"


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
