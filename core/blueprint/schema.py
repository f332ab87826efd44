"""Validating a loaded blueprint with pydantic models whose component unions come from the registries."""

from __future__ import annotations

import copy
import difflib
import functools
import importlib.metadata as md
import re
import types
from typing import Annotated, Any, Literal, Union, get_origin

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt,
                      PrivateAttr, StringConstraints, ValidationError, WithJsonSchema, create_model, model_validator)

from hyloom.blueprint.errors import BlueprintError, Problem, dotted
from hyloom.blueprint.load import Loaded
from hyloom.registry import registry

Symbol = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")]
STAGE_NAME = r"^[a-z][a-z0-9_-]*$"

# Where component configs sit in a blueprint, and which registry they come from ("*": any key).
SLOTS = {
    ("model", "position"): "position",
    ("model", "mixers", "*"): "mixer",
    ("model", "ffn"): "ffn",
    ("model", "norm"): "norm",
    ("data", "source"): "data_source",
    ("data", "tiers", "*"): "data_tier",
    ("data", "tokenizer"): "tokenizer",
    ("train",): "trainer",
    ("train", "eval_tasks", "*"): "eval_task",
    ("stages", "*", "train"): "trainer",
    ("stages", "*", "train", "eval_tasks", "*"): "eval_task",
    ("train", "selector"): "selector",  # the select trainer's selector (validated by its config)
    ("stages", "*", "train", "selector"): "selector",
    ("stages", "*", "data", "source"): "data_source",
    ("stages", "*", "data", "tiers", "*"): "data_tier",
    ("stages", "*", "data", "tokenizer"): "tokenizer",
}


class SpecProblem(Exception):
    """Raised from inside validation with a key path relative to `model` (pydantic would hide a ValueError's path)."""

    def __init__(self, items: list[tuple[tuple, str]]):
        self.items = items
        super().__init__(items)


def _expand_layout(value: Any) -> list[str]:
    """'SLLL' (one letter a layer, spaces ignored), [S, L, ...], or {repeat: 'SLLL' | [..], times: N}."""
    if isinstance(value, dict) and set(value) == {"repeat", "times"}:
        times = value["times"]
        if not isinstance(times, int) or isinstance(times, bool) or times < 1:
            raise ValueError(f"layout.times must be a positive integer, got {times!r}")
        return _expand_layout(value["repeat"]) * times
    if isinstance(value, str):
        return [c for c in value if not c.isspace()]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return list(value)
    raise ValueError("expected a string of one-letter symbols ('SLLL'), a list of symbols, "
                     "or {repeat: 'SLLL', times: N}")


LAYOUT_SCHEMA = {"anyOf": [
    {"type": "string", "description": "one symbol per character"},
    {"type": "array", "items": {"type": "string"}},
    {"type": "object", "properties": {"repeat": {"anyOf": [{"type": "string"}, {"type": "array"}]},
                                      "times": {"type": "integer", "minimum": 1}},
     "required": ["repeat", "times"], "additionalProperties": False},
]}
Layout = Annotated[list[str], BeforeValidator(_expand_layout), WithJsonSchema(LAYOUT_SCHEMA)]


class _ModelSpecChecks(BaseModel):
    """Cross-field checks of `model`; the fields themselves are declared in `blueprint_model`."""

    _layers: list = PrivateAttr(default_factory=list)

    @property
    def layers(self) -> list:
        """One mixer config per layer: the symbol's config with that layer's overrides applied."""
        return self._layers

    @model_validator(mode="after")
    def _expand(self):
        n = self.n_layers
        if len(self.layout) != n:
            raise SpecProblem([(("layout",), f"expands to {len(self.layout)} layers, but n_layers is {n}")])
        for i, symbol in enumerate(self.layout):
            if symbol not in self.mixers:
                raise SpecProblem([(("layout",), f"layer {i} uses symbol {symbol!r}, which model.mixers does not "
                                                f"define (defined: {', '.join(self.mixers) or 'none'})")])
        layers = [self.mixers[s] for s in self.layout]
        for i, patch in self.overrides.items():
            if i >= n:
                raise SpecProblem([(("overrides", i), f"layer index out of range: expected 0..{n - 1}")])
            if "type" in patch:
                raise SpecProblem([(("overrides", i, "type"), "an override cannot change a layer's mixer type; "
                                                              "give the layer its own symbol in layout")])
            base = layers[i]
            try:
                layers[i] = type(base).model_validate({**base.model_dump(), **patch})
            except ValidationError as exc:
                fields = list(type(base).model_fields)
                raise SpecProblem([(("overrides", i) + e["loc"], _message(e, e["loc"], None, fields))
                                   for e in exc.errors()]) from None
        for symbol, cfg in self.mixers.items():
            caps = registry().get("mixer", cfg.type).capabilities
            if not self.causal and not caps.bidirectional:
                raise SpecProblem([(("mixers", symbol, "type"), f"mixer {cfg.type!r} cannot run bidirectionally, "
                                                               "but model.causal is false")])
            if self.causal and not caps.causal:
                raise SpecProblem([(("mixers", symbol, "type"), f"mixer {cfg.type!r} is bidirectional only, "
                                                               "but model.causal is true")])
        self._layers = layers
        return self


class _NoneRegistered(BaseModel):
    """Stands in for a kind with no registered configs, so that any use of it is reported as unknown."""

    type: Literal["(none registered)"]


def component_union(kind: str):
    """The discriminated union (on `type`) of every registered config of `kind`: what a blueprint field holding
    such a component validates against. Plugin configs that hold components of other kinds call it from a
    validator, since the registry is complete only once every plugin has registered."""
    configs = tuple(r.config for r in registry().all(kind) if r.config is not None) or (_NoneRegistered,)
    return Annotated[Union[configs], Field(discriminator="type")]


# The component a section gets when the blueprint leaves it out, and the `type` of a section written without
# one (so that `data.source.max_bytes=1000` or `train.steps=600` alone changes one key of the default).
DEFAULT_TYPES = {
    ("model", "position"): "rope",
    ("model", "norm"): "rmsnorm",
    ("data", "source"): "stdlib",
    ("data", "tokenizer"): "bpe",
    ("train",): "lm",
}


def _default(loc: tuple, description: str):
    kind, name = SLOTS[loc], DEFAULT_TYPES[loc]
    return Field(default_factory=lambda: registry().get(kind, name).config(), description=description)


def _fill_default_types(data: dict) -> None:
    """Also inside each stage, which holds `train` and `data` sections of its own."""
    for node in [data] + [s for s in data.get("stages") or [] if isinstance(s, dict)]:
        for loc, name in DEFAULT_TYPES.items():
            parent = _node(node, loc[:-1])
            if isinstance(parent, dict) and isinstance(parent.get(loc[-1]), dict):
                parent[loc[-1]].setdefault("type", name)


def _merge_section(base: dict, over: dict) -> dict:
    """`over` laid on `base` key by key, as a child blueprint on its parent: mappings merge, a component whose
    `type` changes is replaced whole, anything else (a value, a list) replaces."""
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        same_type = not isinstance(value, dict) or "type" not in value or \
            not isinstance(old, dict) or old.get("type") in (None, value["type"])
        out[key] = _merge_section(old, value) if isinstance(old, dict) and isinstance(value, dict) and same_type \
            else value
    return out


def _merge_stage_data(data: dict) -> None:
    """A stage's `data` changes the blueprint's `data` for that stage (seq_len: 1024 alone keeps the source
    and tokenizer, so a stage cannot switch tokenizers by leaving them out)."""
    base = data.get("data") if isinstance(data.get("data"), dict) else {}
    for stage in data.get("stages") if isinstance(data.get("stages"), list) else []:
        if isinstance(stage, dict) and isinstance(stage.get("data"), dict):
            stage["data"] = _merge_section(base, stage["data"])


@functools.cache
def blueprint_model() -> type[BaseModel]:
    """The `Blueprint` pydantic model for the plugins registered now."""
    spec = create_model(
        "ModelSpec",
        __base__=_ModelSpecChecks,
        d_model=(PositiveInt, Field(description="width of the residual stream")),
        n_layers=(PositiveInt, Field(description="number of blocks; layout must expand to this many")),
        vocab_size=(PositiveInt, Field(description="rows of the embedding and the output head")),
        max_seq_len=(PositiveInt, Field(4096, description="longest sequence the model is meant for")),
        position=(component_union("position"), _default(("model", "position"), "position policy (default: rope)")),
        mixers=(dict[Symbol, component_union("mixer")], Field(description="mixer configs by symbol, used by layout")),
        layout=(Layout, Field(description="one symbol per layer: 'SLLL', [S, L, ...] or {repeat: SLLL, times: 8}")),
        overrides=(dict[NonNegativeInt, dict[str, Any]], Field({}, description="per-layer changes: {31: {topk: 32}}")),
        ffn=(component_union("ffn"), Field(description="feed-forward block")),
        norm=(component_union("norm"), _default(("model", "norm"), "normalisation layer (default: rmsnorm)")),
        causal=(bool, Field(True, description="false: bidirectional, every position sees the whole sequence "
                                              "(every mixer must support it; no trainer takes such a model yet)")),
        tie_embeddings=(bool, Field(False, description="output head shares the embedding matrix")),
        scale_emb=(PositiveFloat, Field(1.0, description="embeddings are multiplied by this (MiniCPM: 12)")),
        scale_depth=(PositiveFloat | None, Field(None, description="residual branches × scale_depth/√n_layers (MiniCPM: 1.4)")),
        dim_model_base=(PositiveInt | None, Field(None, description="logits ÷ (d_model/dim_model_base) (MiniCPM: 256)")),
        init_std=(PositiveFloat, Field(0.02, description="std of the normal init of linear and embedding weights")),
    )
    spec.model_config["extra"] = "forbid"
    spec.model_rebuild(force=True)
    data = create_model(
        "DataSpec",
        __config__=ConfigDict(extra="forbid"),
        source=(component_union("data_source"), _default(("data", "source"), "where documents come from (default: stdlib)")),
        tiers=(list[component_union("data_tier")], Field([], description="tier steps (filters, dedup) applied in order")),
        tokenizer=(component_union("tokenizer"), _default(("data", "tokenizer"), "tokenizer (default: bpe trained on the data)")),
        seq_len=(PositiveInt, Field(256, description="tokens per training sequence")),
        eval_fraction=(float, Field(0.02, gt=0, le=0.5, description="share of the text (whole documents) held out for eval")),
        cache_dir=(str, Field("~/.cache/hyloom", description="where tokenizers and token shards are cached")),
        seed=(int, Field(0, description="seed of the train/eval split and the data order")),
    )
    stage = create_model(
        "Stage",
        __config__=ConfigDict(extra="forbid"),
        name=(Annotated[str, StringConstraints(pattern=STAGE_NAME)],
              Field(description="unique, [a-z][a-z0-9_-]*; the stage's outputs go to out_dir/<name>/")),
        train=(component_union("trainer"), Field(description="this stage's trainer (any registered one, as `train`; "
                                                    "its out_dir is set by the runner)")),
        data=(data | None, Field(None, description="changes to the blueprint's `data` for this stage (keys as in "
                                                   "`data` above), merged key by key, e.g. {seq_len: 1024}")),
        init=(str | None, Field(None, description="checkpoint (or run directory) whose model and weights the "
                                                  "stage starts from (default: the previous stage's final "
                                                  "checkpoint; for the first stage, a fresh model)")),
    )
    return create_model(
        "Blueprint",
        __config__=ConfigDict(extra="forbid"),
        model=(spec, Field(description="the architecture")),
        data=(data | None, Field(None, description="training data: source, tiers, tokenizer, sequence length")),
        train=(component_union("trainer") | None, Field(None, description="trainer and its options (type: lm by default)")),
        requires=(list[str], Field([], description="distributions this blueprint needs, e.g. 'hyloom-myplugin>=0.3'")),
        stages=(list[stage] | None, Field(None, description="training in stages, run in order, each starting from the "
                                                            "previous one's weights (instead of `train`)")),
        out_dir=(str | None, Field(None, description="run directory of a blueprint with stages (default runs/train): "
                                                     "stage NAME writes to out_dir/NAME/")),
    )


def _check_stages(bp: BaseModel, data: dict) -> list[tuple[tuple, str]]:
    """What the field types cannot say about `stages`: (key path, message) for each problem."""
    if bp.stages is None:
        if bp.out_dir is not None:
            return [(("out_dir",), "is the run directory of a blueprint with stages; a blueprint with train: sets "
                                   "train.out_dir")]
        return []
    problems = []
    if not bp.stages:
        problems.append((("stages",), "is empty: give at least one stage, or leave stages out and use train:"))
    if data.get("train") is not None:
        problems.append((("train",), "a blueprint with stages has no top-level train: each stage has its own. "
                                     "Move it into a stage (in a file that extends one with train:, write "
                                     "train: null)"))
    first: dict[str, int] = {}
    for i, stage in enumerate(bp.stages):
        if stage.name in first:
            problems.append((("stages", i, "name"), f"{stage.name!r} is also the name of stages.{first[stage.name]}; "
                                                    "each stage needs its own (it names its folder)"))
        first.setdefault(stage.name, i)
        if "out_dir" in stage.train.model_fields_set:
            problems.append((("stages", i, "train", "out_dir"), "is set by the runner (out_dir/<name>); set the "
                                                                "blueprint's top-level out_dir instead"))
    return problems


def clear_cache() -> None:
    blueprint_model.cache_clear()


EXTENDS_SCHEMA = {
    "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
    "description": "parent blueprints merged first, in order: a path relative to this file or builtin:NAME",
}


def json_schema() -> dict:
    """The JSON Schema of a blueprint after its `extends` parents are merged and overrides applied (a file
    that extends another may leave out keys its parents set, which this schema calls missing)."""
    schema = blueprint_model().model_json_schema()
    schema["description"] = ("A hyloom blueprint, as validated after `extends` parents are merged and command-line "
                             "overrides applied; a file with `extends` may leave out keys its parents set.")
    schema["properties"] = {"extends": EXTENDS_SCHEMA, **schema["properties"]}
    return schema


# ---- turning pydantic's errors into messages a user can act on ------------------------------------------

def _node(data: Any, loc: tuple) -> Any:
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, dict) and str(part) in data:
            data = data[str(part)]
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return None
    return data


def _strip_tags(loc: tuple, data: Any) -> tuple:
    """Drop the union tags pydantic puts into error paths (model.mixers.S.attention.heads → model.mixers.S.heads)."""
    out, node = [], data
    for part in loc:
        if isinstance(node, dict) and part not in node and str(part) not in node and node.get("type") == part:
            continue
        out.append(part)
        node = _node(node, (part,))
    return tuple(out)


def _slot_kind(loc: tuple) -> str | None:
    for pattern, kind in SLOTS.items():
        if len(pattern) == len(loc) and all(p in ("*", str(q)) for p, q in zip(pattern, loc)):
            return kind
    return None


def _fields_at(loc: tuple, data: Any) -> list[str] | None:
    """The keys valid at `loc`: a registered component's config fields, or a section of the blueprint."""
    kind, node = _slot_kind(loc), _node(data, loc)
    if kind:
        if isinstance(node, dict) and node.get("type") in registry().names(kind):
            return list(registry().get(kind, node["type"]).config.model_fields)
        return None
    model = blueprint_model()
    for part in loc:
        if get_origin(model) is list:  # stages.0: an item of the list
            model = _section(model.__args__[0]) if str(part).isdigit() else None
            continue
        field = model.model_fields.get(str(part)) if isinstance(model, type) else None
        if field is None:
            return None
        model = _section(field.annotation)
    return list(model.model_fields) if isinstance(model, type) else None


def _section(annotation):
    """The mapping (a pydantic model) or list of them that an optional field holds, else None."""
    options = annotation.__args__ if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    return next((a for a in options if get_origin(a) is list
                 or (isinstance(a, type) and issubclass(a, BaseModel))), None)


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(str(word), options, n=2, cutoff=0.5)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _message(err: dict, loc: tuple, data: Any, fields: list[str] | None = None) -> str:
    kind = _slot_kind(loc)
    if err["type"] == "union_tag_invalid":
        tag = err["ctx"]["tag"]
        known = registry().names(kind) if kind else []
        return f"{tag!r} is not a registered {kind or 'component'}{_suggest(tag, known)} (registered: {', '.join(known)})"
    if err["type"] == "union_tag_not_found":
        known = ", ".join(registry().names(kind)) if kind else "?"
        return f"expected a mapping with a 'type' key naming a registered {kind or 'component'} (one of: {known})"
    if err["type"] == "extra_forbidden":
        fields = fields or _fields_at(loc[:-1], data) or []
        key = loc[-1]
        return f"unknown key {key!r}{_suggest(key, fields)} (expected one of: {', '.join(fields)})"
    if err["type"] == "missing":
        return "required key is missing"
    if err["type"] in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected a mapping (key: value, ...), got {_describe(err['input'])}"
    if err["type"] == "list_type":
        return f"expected a list, got {_describe(err['input'])}"
    message = err["msg"].removeprefix("Value error, ")
    return message + _got(message, err["input"])


def _got(message: str, value: Any) -> str:
    """The offending value; for a component-wide check, the values of the keys its message names but does not
    quote as `key (value)`, rather than the whole mapping."""
    if not isinstance(value, dict):
        return f" (got {_short(value)})"
    named = [f"{k}: {_short(v)}" for k, v in value.items()
             if re.search(rf"\b{re.escape(str(k))}\b(?! \()", message)]
    return f" ({', '.join(named)})" if named else ""


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _describe(value: Any) -> str:
    kind = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
    return kind if value is None else f"{kind} {_short(value)}"


def _check_requires(requires: Any, loaded: Loaded) -> list[Problem]:
    if not isinstance(requires, list):
        return [Problem("requires", "expected a list of requirements like 'hyloom-myplugin>=0.3'", loaded.file_of(("requires",)))]
    problems = []
    plugins = {canonicalize_name(p.dist): p for p in registry().plugins}
    for i, text in enumerate(requires):
        where = ("requires", i)
        try:
            req = Requirement(str(text))
        except InvalidRequirement as exc:
            problems.append(Problem(dotted(where), f"not a valid requirement: {exc}", loaded.file_of(where)))
            continue
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            problems.append(Problem(dotted(where), f"needs {text!r}, but {req.name} is not installed", loaded.file_of(where)))
            continue
        if not req.specifier.contains(version, prereleases=True):
            problems.append(Problem(dotted(where), f"needs {text!r}, but {req.name} {version} is installed", loaded.file_of(where)))
        plugin = plugins.get(canonicalize_name(req.name))
        if plugin is not None and plugin.status != "ok":
            problems.append(Problem(dotted(where), f"needs {req.name}, whose plugin is {plugin.status}"
                                    + (f": {plugin.error}" if plugin.error else ""), loaded.file_of(where)))
    return problems


def validate(loaded: Loaded) -> BaseModel:
    """Validate loaded blueprint data; raise BlueprintError naming file, key path and expectation."""
    data = copy.deepcopy(loaded.data)
    _merge_stage_data(data)  # before the defaults: a stage's tokenizer without `type` keeps the blueprint's
    _fill_default_types(data)
    problems = _check_requires(data.get("requires", []), loaded)
    if problems:
        raise BlueprintError(problems)
    try:
        bp = blueprint_model().model_validate(data)
        problems = _check_stages(bp, data)
        if problems:
            raise BlueprintError([Problem(dotted(loc), msg, loaded.file_of(loc)) for loc, msg in problems])
        return bp
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = _strip_tags(err["loc"], data)
            message = _message(err, loc, data)
            if err["type"] == "union_tag_invalid":
                loc += ("type",)
            problems.append(Problem(dotted(loc), message, loaded.file_of(loc)))
        raise BlueprintError(problems) from None
    except SpecProblem as exc:
        problems = [Problem(dotted(("model",) + loc), msg, loaded.file_of(("model",) + loc)) for loc, msg in exc.items]
        raise BlueprintError(problems) from None
