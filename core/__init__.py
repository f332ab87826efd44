"""hyloom: compose hybrid language models from YAML blueprints."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hyloom")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

from hyloom.blueprint import BlueprintError, load_blueprint  # noqa: E402
from hyloom.model import HybridLM, build_model  # noqa: E402
from hyloom.registry import register_plugin, unregister_plugin  # noqa: E402

__all__ = ["__version__", "BlueprintError", "load_blueprint", "build_model", "HybridLM", "register_plugin",
           "unregister_plugin"]
