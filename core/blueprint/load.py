"""Loading a blueprint: YAML files, `extends:` parents, `${...}` interpolation and command-line overrides.

The result is plain containers plus, for every key path, the file that last set it (so that validation
errors can name the file a bad value came from).
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hyloom.blueprint.errors import BlueprintError, Problem

BUILTIN = "builtin:"
COMMAND_LINE = "<command line>"


@dataclass
class Loaded:
    data: dict
    file: str  # the blueprint asked for
    sources: dict[tuple, str] = field(default_factory=dict)  # key path -> file that set it

    def file_of(self, loc: tuple) -> str:
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.sources:
                return self.sources[loc[:n]]
        return self.file


def builtin_names() -> list[str]:
    folder = importlib.resources.files("hyloom.blueprints")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def builtin_path(name: str) -> Path:
    path = Path(str(importlib.resources.files("hyloom.blueprints") / f"{name}.yaml"))
    if not path.is_file():
        import difflib

        known = builtin_names()
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise BlueprintError([Problem("", f"no built-in blueprint {name!r}{hint} (built-in: {', '.join(known)})", BUILTIN + name)])
    return path


def resolve(ref: str, base: Path | None = None) -> Path:
    if ref.startswith(BUILTIN):
        return builtin_path(ref[len(BUILTIN):])
    path = Path(ref).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    if not path.is_file():
        raise BlueprintError([Problem("", f"blueprint file not found: {path}", ref)])
    return path


def _read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise BlueprintError([Problem("", f"not valid YAML{where}: {getattr(exc, 'problem', exc)}", str(path))]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BlueprintError([Problem("", f"a blueprint must be a mapping of keys, got {type(raw).__name__}", str(path))])
    return raw


def _record(node, loc: tuple, file: str, sources: dict) -> None:
    sources[loc] = file
    if isinstance(node, dict):
        for key, value in node.items():
            _record(value, loc + (key,), file, sources)


def _drop_retyped(parent: DictConfig, child: dict) -> None:
    """A component whose `type` the child changes replaces the parent's mapping instead of merging into it
    (a `rope` position's `theta` means nothing to `hype`)."""
    for key, value in child.items():
        if not isinstance(value, dict) or not isinstance(parent.get(key), DictConfig):
            continue
        if "type" in value and parent[key].get("type") not in (None, value["type"]):
            del parent[key]
        else:
            _drop_retyped(parent[key], value)


def _load_tree(path: Path, stack: tuple[Path, ...], sources: dict) -> DictConfig:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in stack + (path,))
        raise BlueprintError([Problem("extends", f"blueprints extend each other in a cycle: {chain}", str(path))])
    raw = _read_yaml(path)
    parents = raw.pop("extends", [])
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise BlueprintError([Problem("extends", "expected a path or 'builtin:NAME', or a list of them", str(path))])
    merged = OmegaConf.create()
    for ref in parents:
        merged = OmegaConf.merge(merged, _load_tree(resolve(ref, path.parent), stack + (path,), sources))
    for key, value in raw.items():
        _record(value, (key,), str(path), sources)
    _drop_retyped(merged, raw)
    try:
        return OmegaConf.merge(merged, OmegaConf.create(raw))
    except OmegaConfBaseException as exc:
        raise BlueprintError([Problem("", str(exc).splitlines()[0], str(path))]) from None


def _apply_override(cfg: DictConfig, item: str, sources: dict) -> None:
    if item.startswith("~"):
        key = item[1:]
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        if not isinstance(parent, DictConfig) or leaf not in parent:
            raise BlueprintError([Problem(key, "cannot delete: no such key", COMMAND_LINE)])
        del parent[leaf]
        return
    key, eq, value = item.partition("=")
    if not eq or not key:
        raise BlueprintError([Problem("", f"override {item!r} must look like key.path=value or ~key.path", COMMAND_LINE)])
    try:
        OmegaConf.update(cfg, key, yaml.safe_load(value) if value else None, merge=False, force_add=True)
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        raise BlueprintError([Problem(key, f"cannot apply override: {exc}", COMMAND_LINE)]) from None
    sources[tuple(key.split("."))] = COMMAND_LINE


def load(ref: str, overrides: list[str] | tuple[str, ...] = ()) -> Loaded:
    """Read a blueprint (a path or 'builtin:NAME'), merge its parents, apply overrides, resolve ${...}."""
    path = resolve(ref)
    sources: dict[tuple, str] = {}
    cfg = _load_tree(path, (), sources)
    for item in overrides:
        _apply_override(cfg, item, sources)
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or ""
        loaded = Loaded({}, str(path), sources)
        msg = str(exc).splitlines()[0]
        raise BlueprintError([Problem(key, f"cannot resolve interpolation: {msg}", loaded.file_of(tuple(key.split("."))))]) from None
    return Loaded(data, ref if ref.startswith(BUILTIN) else str(path), sources)


def to_yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False)

