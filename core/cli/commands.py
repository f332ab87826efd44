"""The built-in commands. Each `add_*` adds one subparser; `func(args)` runs it."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

from hyloom.blueprint import BlueprintError, Problem, builtin_names, json_schema, load, to_yaml, validate
from hyloom.blueprint.load import builtin_path
from hyloom.cli.parser import command_parser
from hyloom.hookspecs import KINDS, hookimpl
from hyloom.registry import registry


def _blueprint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("blueprint", help="a YAML file or builtin:NAME")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides like model.n_layers=8 or ~model.overrides")


def _load_checked(args):
    """Validate a blueprint, build its model on `meta` and run one token through it (hyloom.blueprint.check)."""
    from hyloom.blueprint.check import build_checked

    loaded = load(args.blueprint, args.overrides)
    bp = validate(loaded)
    return bp, build_checked(bp, loaded)


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}"
        n /= 1000
    return f"{n:.3g}P{unit}"


# ---- plugins -----------------------------------------------------------------------------------------------

def cmd_plugins(args) -> int:
    plugins = registry().plugins
    if args.json:
        print(json.dumps([{"name": p.name, "distribution": p.dist, "version": p.version, "builtin": p.builtin,
                           "status": p.status, "error": p.error,
                           "registered": [f"{k}:{n}" for k, n in p.registered]} for p in plugins], indent=2))
        return 0
    for p in plugins:
        where = "built-in" if p.builtin else f"{p.dist} {p.version}"
        print(f"{p.status:8} {p.name:30} {where}")
        if p.error:
            print(f"         error: {p.error}")
        elif p.registered:
            print("         " + ", ".join(f"{k}:{n}" for k, n in p.registered))
    return 0


def add_plugins(sub):
    p = command_parser(sub, "plugins", "list loaded plugins, their distributions and what they register",
                       "  hyloom plugins\n  hyloom plugins --json\n  HYLOOM_DISABLE_PLUGINS=myplugin hyloom plugins\n")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plugins)


# ---- ls ----------------------------------------------------------------------------------------------------

def _kind(text: str) -> str:
    kinds = list(KINDS) + ["blueprint"]
    for kind in kinds:
        if text in (kind, kind + "s"):
            return kind
    raise BlueprintError([Problem("", f"unknown kind {text!r}; expected one of: {', '.join(kinds)}")])


def cmd_ls(args) -> int:
    kinds = [_kind(args.kind)] if args.kind else list(KINDS) + ["blueprint"]
    for kind in kinds:
        if len(kinds) > 1:
            print(f"{kind}:")
        if kind == "blueprint":
            for name in builtin_names():
                print(f"  builtin:{name}")
            continue
        for reg in registry().all(kind):
            print(f"  {reg.name:22} {reg.summary}  [{reg.dist}]")
    return 0


def add_ls(sub):
    p = command_parser(sub, "ls", "list registered components of one kind (or all), or the built-in blueprints",
                       "  hyloom ls\n  hyloom ls mixer\n  hyloom ls blueprints\n")
    p.add_argument("kind", nargs="?", help=f"one of: {', '.join(KINDS)}, blueprint")
    p.set_defaults(func=cmd_ls)


# ---- show / validate ---------------------------------------------------------------------------------------

def cmd_show(args) -> int:
    import sys

    bp, model = _load_checked(args)
    spec = bp.model
    # with --yaml, stdout holds the YAML alone (it loads back as a blueprint); the description goes to stderr
    out = sys.stderr if args.yaml else sys.stdout
    per_token, fixed = model.cache_bytes(dtype_bytes=2)
    lines = [f"blueprint: {args.blueprint}",
             f"layers: {spec.n_layers}   d_model: {spec.d_model}   vocab: {spec.vocab_size}   "
             f"position: {spec.position.type}   ffn: {spec.ffn.type}   norm: {spec.norm.type}",
             f"layout: {''.join(s if len(s) == 1 else f'[{s}]' for s in spec.layout)}"]
    for symbol, cfg in spec.mixers.items():
        lines.append(f"  {symbol}: {json.dumps({'type': cfg.type, **cfg.model_dump(exclude={'type'})})}")
    lines.append(f"parameters: {model.num_parameters():,} ({_human(model.num_parameters())})")
    lines.append(f"decode cache (bf16, one sequence): {_human(per_token, 'B')} per token + {_human(fixed, 'B')} fixed")
    if args.tree:
        for i, (block, cfg) in enumerate(zip(model.layers, spec.layers)):
            n = sum(p.numel() for p in block.parameters())
            t, f = block.mixer.cache_bytes(2)
            lines.append(f"  layers.{i:<3} {spec.layout[i]:>3} {cfg.type:14} {block.mixer.capabilities.family:8} "
                         f"{type(block.position).__name__:13} params {_human(n):>7}   "
                         f"cache {_human(t, 'B')}/token + {_human(f, 'B')}")
    print("\n".join(lines), file=out)
    if args.yaml:
        print(to_yaml(bp.model_dump(mode="json")), end="")
    return 0


def add_show(sub):
    p = command_parser(sub, "show", "describe a blueprint: layers, parameter count, cache bytes per token",
                       "  hyloom show builtin:tiny\n  hyloom show builtin:qwen3-1.7b --tree\n"
                       "  hyloom show my.yaml model.n_layers=4 --yaml\n")
    _blueprint_args(p)
    p.add_argument("--tree", action="store_true", help="one line per layer")
    p.add_argument("--yaml", action="store_true",
                   help="print the fully resolved blueprint as YAML alone on stdout (the description goes to stderr)")
    p.set_defaults(func=cmd_show)


def cmd_validate(args) -> int:
    bp, model = _load_checked(args)
    print(f"ok: {args.blueprint} ({bp.model.n_layers} layers, {_human(model.num_parameters())} parameters)")
    return 0


def add_validate(sub):
    p = command_parser(sub, "validate", "check a blueprint, build it on the meta device and run one token through "
                       "it (no memory, no GPU)",
                       "  hyloom validate builtin:llama3-8b\n  hyloom validate my.yaml model.mixers.A.heads=8\n"
                       "  hyloom validate my.yaml ~model.overrides\n")
    _blueprint_args(p)
    p.set_defaults(func=cmd_validate)


# ---- schema / cp -------------------------------------------------------------------------------------------

def cmd_schema(args) -> int:
    if args.markdown:
        from hyloom.blueprint.reference import markdown

        print(markdown(), end="")
    else:
        print(json.dumps(json_schema(), indent=2))
    return 0


def add_schema(sub):
    p = command_parser(sub, "schema", "print the JSON Schema of a blueprint as validated: after its `extends` parents "
                       "are merged and overrides applied (every registered component's config included)",
                       "  hyloom schema > blueprint.schema.json\n  hyloom schema --markdown > docs/blueprint-reference.md\n")
    p.add_argument("--markdown", action="store_true", help="the blueprint reference as Markdown")
    p.set_defaults(func=cmd_schema)


def cmd_cp(args) -> int:
    if not args.source.startswith("builtin:"):
        raise BlueprintError([Problem("", "expected builtin:NAME (see `hyloom ls blueprints`)", args.source)])
    src = builtin_path(args.source[len("builtin:"):])
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists() and not args.force:
        raise BlueprintError([Problem("", "already exists; pass --force to overwrite", str(dest))])
    shutil.copyfile(src, dest)
    print(f"copied {args.source} to {dest}")
    return 0


def add_cp(sub):
    p = command_parser(sub, "cp", "copy a built-in blueprint to a file you can edit",
                       "  hyloom cp builtin:tiny my.yaml\n  hyloom cp builtin:qwen3-1.7b blueprints/\n")
    p.add_argument("source", help="builtin:NAME")
    p.add_argument("dest", help="a file or folder")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_cp)


# ---- train / generate --------------------------------------------------------------------------------------

def cmd_train(args) -> int:
    from hyloom.train import train

    loaded = load(args.blueprint, args.overrides)
    stages = loaded.data.get("stages")
    if stages is None:
        section = loaded.data.setdefault("train", {"type": "lm"})
        if args.out:
            section["out_dir"] = args.out
        if args.device:
            section["device"] = args.device
    else:  # validation judges the stages; the options go where they fit
        if args.out:
            loaded.data["out_dir"] = args.out
        for stage in stages if args.device and isinstance(stages, list) else []:
            section = stage.get("train") if isinstance(stage, dict) else None
            trainer = section.get("type", "lm") if isinstance(section, dict) else None
            config = registry().get("trainer", trainer).config if trainer in registry().names("trainer") else None
            if config is not None and "device" in config.model_fields:
                section["device"] = args.device
    bp = validate(loaded)
    result = train(bp, bp.model_dump(mode="json"), resume=args.resume, progress=not args.no_progress,
                   overwrite=args.overwrite)
    if result.get("checkpoint") and int(os.environ.get("RANK", "0")) == 0:
        if "stage" in result:
            print(f"last stage: {result['stage']} ({result['stages']} of {result['stages']})")
        if all(isinstance(result.get(k), (int, float)) for k in ("train_loss", "eval_loss", "unigram_loss")):
            print(f"train loss {result['train_loss']:.3f}   held-out loss {result['eval_loss']:.3f}   "
                  f"unigram baseline {result['unigram_loss']:.3f}   ({result['seconds']} s)")
        print(f"checkpoint: {result['checkpoint']}")
        if "sample" in result:
            print("sample:\n" + result["sample"])
    return 0


def add_train(sub):
    p = command_parser(sub, "train", "train a blueprint's model on its data (the embedded corpus by default)",
                       "  hyloom train builtin:tiny\n  hyloom train my.yaml train.steps=1000 --out runs/mine\n"
                       "  hyloom train my.yaml --resume auto train.steps=600   continue from the newest checkpoint\n"
                       "  hyloom train my.yaml --overwrite                     start runs/... over\n"
                       "  torchrun --nproc_per_node=2 -m hyloom train my.yaml    data-parallel\n")
    _blueprint_args(p)
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", default=None, metavar="auto|PATH",
                       help="auto: continue from the newest checkpoint in out_dir (if any); PATH: from that checkpoint")
    again.add_argument("--overwrite", action="store_true",
                       help="out_dir already holds a run: delete its checkpoints, metrics and figure, start over")
    p.add_argument("--out", default=None, help="run directory (train.out_dir)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (train.device)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar: a line every train.log_every steps")
    p.set_defaults(func=cmd_train)


def _arg(kind, ok, expected: str):
    """An argparse type: a `kind` value for which `ok(value)` holds; else exit 2 saying what was `expected`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}")
        return value
    return parse


def _escapes(text: str) -> str:
    """`\\n` and `\\t` typed on a command line as newline and tab (`\\\\` for a backslash)."""
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}.get(m[1], m[0]), text)


@hookimpl
def hyloom_register_commands(register):
    from hyloom.cli.generate import add_generate

    for name, add, summary in [
        ("plugins", add_plugins, "list plugins"),
        ("ls", add_ls, "list components or built-in blueprints"),
        ("show", add_show, "describe a blueprint"),
        ("validate", add_validate, "validate a blueprint on the meta device"),
        ("schema", add_schema, "print the blueprint schema"),
        ("cp", add_cp, "copy a built-in blueprint"),
        ("train", add_train, "train a blueprint's model"),
        ("generate", add_generate, "generate text with a checkpoint"),
    ]:
        register(name, add, summary=summary)
