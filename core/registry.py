"""Plugin loading and the component registries.

Built-in plugins and third-party ones (entry-point group `hyloom.plugins`) register through the same hooks.
Each third-party plugin is loaded on its own: one that fails to import, names a hook that does not exist or
raises while registering is reported (a warning, and `failed` in `hyloom plugins`) and the rest still work,
unless HYLOOM_STRICT_PLUGINS=1. HYLOOM_DISABLE_PLUGINS=a,b (entry-point or distribution names, or `all`)
blocks plugins before they are imported. `register_plugin(obj)` adds a plugin object from Python without an
entry point (notebooks, tests); its failures always raise.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata as md
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol

import pluggy
from pydantic import BaseModel, ConfigDict

import hyloom

from hyloom.hookspecs import KINDS, PROJECT, HyloomSpec

ENTRY_POINT_GROUP = "hyloom.plugins"
# Modules of the built-in plugins. Core never imports them by name elsewhere: they register like any other.
BUILTIN_PLUGINS = (
    "hyloom.cli.commands",
    "hyloom.plugins.transformer",
    "hyloom.plugins.position",
    "hyloom.plugins.lightning",
    "hyloom.plugins.infllm_v2",
    "hyloom.plugins.train",
    "hyloom.plugins.data",
    "hyloom.plugins.hf",
    "hyloom.plugins.eval",
    "hyloom.plugins.convert",
    "hyloom.plugins.rl",
    "hyloom.plugins.mdm",
)
NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
COMMAND_RE = re.compile(r"^[a-z][a-z0-9_-]*$")  # CLI commands read better with hyphens (import-hf)


class PluginError(Exception):
    """A plugin could not be loaded, or two plugins claim one name."""


# The capability record and its error live here, not in hyloom.mixer (which re-exports both), so that registering
# a mixer and catching the error in the CLI import no torch: `hyloom ls` stays fast.
Family = Literal["softmax", "sparse", "linear"]


@dataclass(frozen=True)
class MixerCapabilities:
    """What a mixer supports; each flag is enforced outside the mixer (docs/plugins.md, "Capabilities")."""

    family: Family  # decides the position encoding a policy gives the layer (HyPE: RoPE for linear only)
    causal: bool = True  # runs with model.causal true (checked when the blueprint is validated)
    bidirectional: bool = False  # runs with model.causal false (checked when the blueprint is validated)
    decode: bool = True  # has new_cache and a cached forward (HybridLM.new_cache refuses otherwise)
    varlen: bool = False  # honours ctx.cu_seqlens (HybridLM.forward refuses packed input otherwise)


class CapabilityError(ValueError):
    """A model was asked for something one of its mixers does not declare (decoding, packed sequences)."""


class UnknownComponentError(KeyError):
    def __init__(self, kind: str, name: str, known: list[str]):
        self.kind, self.name, self.known = kind, name, known
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        super().__init__(f"{name!r} is not a registered {kind}{hint} (registered: {', '.join(known) or 'none'})")

    def __str__(self) -> str:
        return self.args[0]


@dataclass(frozen=True)
class Registration:
    kind: str
    name: str
    build: Callable[..., Any]
    config: type[BaseModel] | None  # the plugin's config model with `type: Literal[name]` added
    summary: str
    capabilities: Any
    example: dict | None  # a small valid config, used by docs and tests
    dist: str
    version: str


class Register(Protocol):
    """The callable every `hyloom_register_*` hook receives."""

    def __call__(
        self,
        name: str,
        build: Callable[..., Any],
        *,
        summary: str,
        config: type[BaseModel] | None = None,
        capabilities: Any = None,
        example: dict | None = None,
        override: bool = False,
    ) -> None: ...


@dataclass
class PluginInfo:
    name: str
    dist: str
    version: str
    builtin: bool
    status: Literal["ok", "failed", "disabled"] = "ok"
    error: str | None = None
    registered: list[tuple[str, str]] = field(default_factory=list)


def _typed_config(name: str, config: type[BaseModel]) -> type[BaseModel]:
    """Subclass the plugin's config with the `type` tag the discriminated unions select on."""
    if not (isinstance(config, type) and issubclass(config, BaseModel)):
        raise TypeError(f"config for {name!r} must be a pydantic BaseModel subclass, got {config!r}")
    namespace = {
        "__annotations__": {"type": Literal[name]},
        "type": name,
        "model_config": ConfigDict(**{**config.model_config, "extra": "forbid"}),
        "__module__": config.__module__,
        "__doc__": config.__doc__,
    }
    return type(config.__name__, (config,), namespace)


def _check_capabilities(kind: str, name: str, capabilities: Any) -> None:
    if kind == "mixer" and not isinstance(capabilities, MixerCapabilities):
        raise TypeError(f"mixer {name!r} must declare capabilities=MixerCapabilities(...), got {capabilities!r}")


class Registry:
    def __init__(self) -> None:
        self._by_kind: dict[str, dict[str, Registration]] = {kind: {} for kind in KINDS}
        self.plugins: list[PluginInfo] = []

    def add(self, reg: Registration, override: bool) -> None:
        table = self._by_kind[reg.kind]
        old = table.get(reg.name)
        if old is not None and not override:
            raise PluginError(
                f"{reg.kind} {reg.name!r} is provided by two distributions: {old.dist} {old.version} and "
                f"{reg.dist} {reg.version}. Uninstall or disable one (HYLOOM_DISABLE_PLUGINS=NAME), "
                f"or register with override=True."
            )
        table[reg.name] = reg

    def get(self, kind: str, name: str) -> Registration:
        try:
            return self._by_kind[kind][name]
        except KeyError:
            raise UnknownComponentError(kind, name, self.names(kind)) from None

    def names(self, kind: str) -> list[str]:
        return sorted(self._by_kind[kind])

    def all(self, kind: str) -> list[Registration]:
        return [self._by_kind[kind][n] for n in self.names(kind)]

    def remove_plugin(self, info: PluginInfo) -> None:
        for kind, name in info.registered:
            self._by_kind[kind].pop(name, None)
        info.registered.clear()


class _PluginManager(pluggy.PluginManager):
    def parse_hookimpl_opts(self, plugin, name):
        opts = super().parse_hookimpl_opts(plugin, name)
        # Unmarked functions that look like hooks count too, so a misspelled one is caught by check_pending
        # instead of being silently ignored.
        if opts is None and name.startswith(PROJECT + "_") and callable(getattr(plugin, name, None)):
            opts = {}
        return opts


def _env_list(var: str) -> set[str]:
    return {s.strip() for s in os.environ.get(var, "").split(",") if s.strip()}


def _make_register(registry: Registry, kind: str, info: PluginInfo) -> Register:
    def register(name, build, *, summary, config=None, capabilities=None, example=None, override=False):
        pattern = COMMAND_RE if kind == "command" else NAME_RE
        if not isinstance(name, str) or not pattern.match(name):
            raise ValueError(f"{kind} name {name!r} must match {pattern.pattern}")
        if not callable(build):
            raise TypeError(f"{kind} {name!r}: build must be callable")
        if not summary or "\n" in summary:
            raise ValueError(f"{kind} {name!r}: summary must be one non-empty line")
        _check_capabilities(kind, name, capabilities)
        typed = _typed_config(name, config) if config is not None else None
        reg = Registration(kind, name, build, typed, summary, capabilities, example, info.dist, info.version)
        registry.add(reg, override)
        info.registered.append((kind, name))

    return register


def _third_party_entry_points(disabled: set[str]) -> list[tuple[md.EntryPoint, PluginInfo]]:
    found = []
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        info = PluginInfo(ep.name, dist, version, builtin=False)
        if disabled & {"all", "*", ep.name, dist}:
            info.status = "disabled"
        found.append((ep, info))
    return found


def _fail(info: PluginInfo, exc: BaseException, strict: bool) -> None:
    info.status, info.error = "failed", f"{type(exc).__name__}: {exc}"
    if strict:
        raise PluginError(f"plugin {info.name!r} ({info.dist} {info.version}) failed: {info.error}") from exc
    warnings.warn(f"hyloom: plugin {info.name!r} ({info.dist}) failed and is skipped: {info.error}", stacklevel=3)


def load_registry(*, no_plugins: bool = False) -> Registry:
    strict = os.environ.get("HYLOOM_STRICT_PLUGINS", "") not in ("", "0")
    disabled = {"all"} if no_plugins else _env_list("HYLOOM_DISABLE_PLUGINS")
    registry = Registry()
    pm = _PluginManager(PROJECT)
    pm.add_hookspecs(HyloomSpec)

    version = hyloom.__version__
    for module in BUILTIN_PLUGINS:  # a broken built-in is a bug in hyloom: let it raise
        pm.register(importlib.import_module(module), name=module)
        registry.plugins.append(PluginInfo(module, "hyloom", version, builtin=True))
    pm.check_pending()

    for ep, info in _third_party_entry_points(disabled):
        registry.plugins.append(info)
        if info.status == "disabled":
            continue
        try:
            pm.register(ep.load(), name=info.name)
            pm.check_pending()
        except Exception as exc:
            plugin = pm.get_plugin(info.name)
            if plugin is not None:
                pm.unregister(plugin)
            _fail(info, exc, strict)

    for name, plugin in _in_process.items():  # registered from Python (a notebook): errors always raise
        info = PluginInfo(name, IN_PROCESS, "", builtin=False)
        registry.plugins.append(info)
        if disabled & {"all", "*", name}:
            info.status = "disabled"
            continue
        try:
            pm.register(plugin, name=name)
            pm.check_pending()
        except Exception as exc:
            raise PluginError(f"in-process plugin {name!r} failed: {type(exc).__name__}: {exc}") from exc

    infos = {p.name: p for p in registry.plugins}
    for kind, hook_name in KINDS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():  # in registration order: built-ins first
            info = infos[impl.plugin_name]
            if info.status != "ok":
                continue
            try:
                impl.function(register=_make_register(registry, kind, info))
            except PluginError:
                raise
            except Exception as exc:
                if info.builtin:
                    raise
                if info.dist == IN_PROCESS:
                    raise PluginError(f"in-process plugin {info.name!r} failed while registering: "
                                      f"{type(exc).__name__}: {exc}") from exc
                registry.remove_plugin(info)
                _fail(info, exc, strict)
    return registry


_options = {"no_plugins": False}
IN_PROCESS = "<in-process>"  # the `dist` of plugins given to register_plugin
_in_process: dict[str, Any] = {}  # survives reset(), like an installed distribution would


def register_plugin(plugin: Any, name: str | None = None) -> str:
    """Register a plugin object (a module, a class or any object with `hyloom_register_*` functions) in this
    process, without an entry point: for notebooks and a plugin's own tests. It is loaded at once, so a
    mistake raises PluginError here; registering the same name again replaces the earlier object (re-running
    a notebook cell). Returns the name, for unregister_plugin."""
    name = name or getattr(plugin, "__name__", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_plugin: {plugin!r} has no __name__; pass name=")
    previous = _in_process.get(name)
    _in_process[name] = plugin
    _cached.cache_clear()
    try:
        registry()
    except Exception:
        if previous is None:
            _in_process.pop(name)
        else:
            _in_process[name] = previous
        _cached.cache_clear()
        raise
    _clear_schema()
    return name


def unregister_plugin(name: str) -> None:
    """Forget a plugin given to register_plugin."""
    if _in_process.pop(name, None) is None:
        raise KeyError(f"no in-process plugin named {name!r} (registered: {', '.join(_in_process) or 'none'})")
    _cached.cache_clear()
    _clear_schema()


@functools.cache
def _cached() -> Registry:
    return load_registry(**_options)


def registry() -> Registry:
    """The registries, built on first use and cached."""
    return _cached()


def reset(*, no_plugins: bool = False) -> None:
    """Forget the cached registry (after installing a plugin, or to run with `--no-plugins`)."""
    _options["no_plugins"] = no_plugins
    _cached.cache_clear()
    _clear_schema()


def _clear_schema() -> None:
    from hyloom.blueprint import schema  # the blueprint schema is built from the registry

    schema.clear_cache()
