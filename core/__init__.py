"""hyloom: compose hybrid language models from YAML blueprints."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hyloom")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

from hyloom.blueprint import BlueprintError, load_blueprint  # noqa: E402
from hyloom.registry import register_plugin, unregister_plugin  # noqa: E402


def __getattr__(name):
    # The model imports torch (2 s): only on first use, so that `hyloom ls` and `--help` do not wait for it.
    if name in ("HybridLM", "build_model"):
        from hyloom import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["__version__", "BlueprintError", "load_blueprint", "build_model", "HybridLM", "register_plugin",
           "unregister_plugin"]
