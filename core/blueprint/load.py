"""Loading a blueprint: YAML files, `extends:` parents, `${...}` interpolation and command-line overrides.

The result is plain containers plus, for every key path, the file that last set it (so that validation
errors can name the file a bad value came from).
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hyloom.blueprint.errors import BlueprintError, Problem, dotted

BUILTIN = "builtin:"
COMMAND_LINE = "<command line>"
SCALARS = (str, int, float, bool, type(None))


def _key(loc) -> tuple[str, ...]:
    """Key paths are compared as strings: YAML reads `overrides: {3: ...}` with an int key, pydantic's error
    paths and command-line keys may spell the same place either way."""
    return tuple(str(part) for part in loc)


@dataclass
class Loaded:
    data: dict
    file: str  # the blueprint asked for
    sources: dict[tuple, str] = field(default_factory=dict)  # key path (strings) -> file that set it

    def file_of(self, loc: tuple) -> str:
        """The file that set `loc` (or the nearest key above it), followed by any other file that set a key
        below it: a problem with a whole mapping may come from any of its keys."""
        loc = _key(loc)
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.sources:
                files = {self.sources[loc[:n]]: None}  # ordered, without repeats
                if n == len(loc):
                    files.update((f, None) for k, f in self.sources.items() if k[:n] == loc)
                return " and ".join(files)
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
    if path.is_dir():
        raise BlueprintError([Problem("", "is a folder, not a blueprint file", str(path))])
    if not path.is_file():
        raise BlueprintError([Problem("", f"blueprint file not found: {path}", ref)])
    return path


# ---- reading one file ------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """safe_load that refuses a key written twice in one mapping (YAML forbids it; PyYAML keeps the last)."""


def _unique_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False):
    seen = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden by the keys after it
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})",
                                                        key_node.start_mark)
            seen[key] = key_node.start_mark.line
        except TypeError:
            continue  # an unhashable key: construct_mapping reports it
    return loader.construct_mapping(node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def _check_values(node, loc: tuple, file: str) -> list[Problem]:
    """Keys must be names or layer indices and values plain YAML (no dates, no `? [a, b]` keys)."""
    problems = []
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                problems.append(Problem(dotted(loc), f"key {key!r} is a {type(key).__name__}; a key must be a name "
                                        f"(quote it: '{key}') or a layer index", file))
                continue
            problems += _check_values(value, loc + (key,), file)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            problems += _check_values(item, loc + (i,), file)
    elif not isinstance(node, SCALARS):
        problems.append(Problem(dotted(loc), f"a {type(node).__name__} value is not supported; quote it: '{node}'", file))
    return problems


def _read_yaml(path: Path) -> dict:
    file = str(path)
    try:
        raw_bytes = path.read_bytes()
    except OSError as exc:
        raise BlueprintError([Problem("", f"cannot read: {exc.strerror or exc}", file)]) from None
    if b"\0" in raw_bytes:
        raise BlueprintError([Problem("", "a binary file, not a YAML blueprint", file)])
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw_bytes[:exc.start].count(b"\n") + 1
        raise BlueprintError([Problem("", f"not UTF-8 text: byte 0x{raw_bytes[exc.start]:02x} on line {line} "
                                          "(save the file as UTF-8)", file)]) from None
    try:
        raw = _parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise BlueprintError([Problem("", f"not valid YAML{where}: {getattr(exc, 'problem', None) or exc}", file)]) from None
    if raw is None:
        raise BlueprintError([Problem("", "the file is empty; a blueprint is a mapping with `model:` "
                                          "(or `extends:`)", file)])
    if not isinstance(raw, dict):
        raise BlueprintError([Problem("", f"a blueprint must be a mapping of keys (model: ..., extends: ...), "
                                          f"got a {_kind(raw)}", file)])
    problems = _check_values(raw, (), file)
    if problems:
        raise BlueprintError(problems)
    return raw


def _kind(value) -> str:
    return {dict: "mapping", list: "list", str: "string", type(None): "null"}.get(type(value), type(value).__name__)


# ---- sources: which file set which key ------------------------------------------------------------------

def _forget(sources: dict, loc: tuple) -> None:
    loc = _key(loc)
    for key in [k for k in sources if k[:len(loc)] == loc]:
        del sources[key]


def _record(node, loc: tuple, file: str, sources: dict) -> None:
    sources[_key(loc)] = file
    if isinstance(node, dict):
        for key, value in node.items():
            _record(value, loc + (key,), file, sources)


# ---- merging files -----------------------------------------------------------------------------------------

def _drop_replaced(parent: DictConfig, child: dict, loc: tuple, sources: dict) -> None:
    """Delete the keys of the parent that the child replaces instead of merging into (and forget who set
    them): a component whose `type` the child changes (a `rope` position's `theta` means nothing to `hype`),
    and any value of another kind (a list or a string where the parent has a mapping, or the reverse): the
    child's value wins, and validation judges it."""
    for key, value in child.items():
        if key not in parent:
            continue
        old = parent._get_node(key)
        if isinstance(value, dict) and isinstance(old, DictConfig) and not old._is_none():
            if "type" not in value or old.get("type") in (None, value["type"]):
                _drop_replaced(old, value, loc + (key,), sources)
                continue
        elif not isinstance(value, (dict, list)) and not isinstance(old, (DictConfig, ListConfig)):
            continue  # a value replacing a value: the merge does that
        del parent[key]
        _forget(sources, loc + (key,))


def _load_tree(path: Path, stack: tuple[Path, ...]) -> tuple[DictConfig, dict]:
    """The merged config of a file and its parents, and which file set each key of it."""
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in stack + (path,))
        raise BlueprintError([Problem("extends", f"blueprints extend each other in a cycle: {chain}", str(path))])
    raw = _read_yaml(path)
    parents = raw.pop("extends", [])
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise BlueprintError([Problem("extends", f"expected a path or 'builtin:NAME', or a list of them "
                                                 f"(got {_kind(parents)} {parents!r})", str(path))])
    merged, sources = OmegaConf.create(), {}
    layers = [_load_tree(resolve(ref, path.parent), stack + (path,)) for ref in parents]
    own: dict = {}
    _record(raw, (), str(path), own)
    del own[()]
    for cfg, cfg_sources in layers + [(OmegaConf.create(raw), own)]:
        _drop_replaced(merged, OmegaConf.to_container(cfg), (), sources)
        try:
            merged = OmegaConf.merge(merged, cfg)
        except (OmegaConfBaseException, TypeError, ValueError) as exc:
            raise BlueprintError([Problem("", f"cannot merge with its parents: {str(exc).splitlines()[0]}", str(path))]) from None
        sources.update(cfg_sources)
    return merged, sources


# ---- command-line overrides ---------------------------------------------------------------------------------

def _existing_depth(cfg: DictConfig, parts: list[str], key: str) -> int:
    """How many leading parts of `key` name existing mappings or lists (the override creates or replaces what
    follows); a path that runs through a list needs an index that is in it."""
    node = cfg
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, ListConfig):
            if not (part.isdigit() and int(part) < len(node)):
                raise BlueprintError([Problem(key, f"{'.'.join(parts[:depth])} is a list, so it has no item {part!r}",
                                              COMMAND_LINE)])
            node = node._get_node(int(part))
        else:
            found = _child_key(node, part)
            if found is None:
                return depth
            node = node._get_node(found)
        if not isinstance(node, (DictConfig, ListConfig)) or node._is_none():
            return depth  # a value (or null) that the override turns into a mapping
    return len(parts) - 1


def _set(cfg: DictConfig, key: str, text: str, sources: dict) -> None:
    parts = key.split(".")
    if not all(parts):
        raise BlueprintError([Problem("", f"override key {key!r} has an empty part", COMMAND_LINE)])
    try:
        value = _parse_yaml(text) if text else None
    except yaml.YAMLError as exc:
        raise BlueprintError([Problem(key, f"the value is not valid YAML: {getattr(exc, 'problem', None) or exc}",
                                      COMMAND_LINE)]) from None
    problems = _check_values(value, tuple(parts), COMMAND_LINE)
    if problems:
        raise BlueprintError(problems)
    depth = _existing_depth(cfg, parts, key)
    try:
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    except (OmegaConfBaseException, TypeError, ValueError, IndexError) as exc:
        raise BlueprintError([Problem(key, f"cannot apply override: {str(exc).splitlines()[0]}", COMMAND_LINE)]) from None
    _forget(sources, tuple(parts[:depth + 1]))  # what the override replaced
    for n in range(depth + 1, len(parts)):  # mappings it created on the way
        sources[tuple(parts[:n])] = COMMAND_LINE
    _record(value, tuple(parts), COMMAND_LINE, sources)


def _child_key(node, part: str):
    """The key of a mapping (config or plain dict) spelled `part` on the command line (`3` finds the int 3)."""
    if isinstance(node, (dict, DictConfig)) and not (isinstance(node, DictConfig) and node._is_none()):
        return next((k for k in node.keys() if str(k) == part), None)
    return None


def _delete(node, parts: list[str]) -> None:
    for part in parts[:-1]:
        node = node[_child_key(node, part)]
    del node[_child_key(node, parts[-1])]


def _exists(node, parts: list[str]) -> bool:
    for part in parts:
        key = _child_key(node, part)
        if key is None:
            return False
        node = node._get_node(key) if isinstance(node, DictConfig) else node[key]
    return True


def _apply_overrides(cfg: DictConfig, overrides, sources: dict) -> list[list[str]]:
    """Apply `key=value` overrides in order; return the `~key` deletions still to do. A deletion waits until
    interpolations are resolved, so that a helper key can feed `${...}` and then go (`~width`); setting the
    deleted key (or a key below it) again later on the command line makes the deletion happen first."""
    pending: list[list[str]] = []
    for item in overrides:
        if item.startswith("~"):
            key = item[1:]
            if not key or not _exists(cfg, key.split(".")):
                raise BlueprintError([Problem(key, "cannot delete: no such key", COMMAND_LINE)])
            if key.split(".") not in pending:
                pending.append(key.split("."))
            continue
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise BlueprintError([Problem("", f"override {item!r} must look like key.path=value or ~key.path", COMMAND_LINE)])
        parts = key.split(".")
        for gone in list(pending):
            if parts[:len(gone)] == gone:  # ~model.overrides model.overrides.3.window=8: start from nothing
                if _exists(cfg, gone):
                    _delete(cfg, gone)
                    _forget(sources, tuple(gone))
                pending.remove(gone)
            elif gone[:len(parts)] == parts:  # ~model.overrides.3 model.overrides={...}: replaced anyway
                pending.remove(gone)
        _set(cfg, key, text, sources)
    return pending


def load(ref: str, overrides: list[str] | tuple[str, ...] = ()) -> Loaded:
    """Read a blueprint (a path or 'builtin:NAME'), merge its parents, apply overrides, resolve ${...}, then
    delete the `~key`s."""
    path = resolve(ref)
    cfg, sources = _load_tree(path, ())
    deletions = _apply_overrides(cfg, overrides, sources)
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or ""
        loaded = Loaded({}, str(path), sources)
        msg = str(exc).splitlines()[0]
        raise BlueprintError([Problem(key, f"cannot resolve interpolation: {msg}", loaded.file_of(tuple(key.split("."))))]) from None
    for parts in deletions:
        _delete(data, parts)
        _forget(sources, tuple(parts))
    return Loaded(data, ref if ref.startswith(BUILTIN) else str(path), sources)


def to_yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False)
