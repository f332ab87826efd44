"""Load a bench/ script as a module (bench/ is not a package; its scripts put bench/ on sys.path themselves, so
their `experiment` import works). Each call executes the script afresh. Used by the tests of the bench scripts
(tests/ is on sys.path: pytest's rootdir conftest)."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
