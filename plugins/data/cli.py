"""`hyloom data prepare|stats`: run the data pipeline of a blueprint, or report on a prepared folder."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

EXAMPLES = """examples:
  hyloom data prepare builtin:tiny                       the default data: the Python stdlib, bpe tokenizer
  hyloom data prepare my.yaml data.source.max_bytes=2000000 --no-progress
  hyloom data stats my.yaml                              counts per tier, drop reasons, tokens and mix shares
  hyloom data stats ~/.cache/hyloom/data-0123456789abcdef --json
"""


def _spec(blueprint: str, overrides: list[str]):
    from hyloom.blueprint import load_blueprint
    from hyloom.data import data_spec

    return data_spec(load_blueprint(blueprint, overrides).data)


def describe(manifest: dict, folder: Path) -> str:
    """The human-readable stats of a prepared folder."""
    spec, tok, tiers = manifest["spec"], manifest["tokenizer"], manifest["tiers"]
    lines = [f"data: {folder}  (prepared {manifest['created']})",
             f"source: {spec['source']['type']}   tokenizer: {tok['type']}, vocab {tok['vocab_size']:,} "
             f"(eos {tok['eos_id']}, mask {tok['mask_id']})   dtype: {manifest['dtype']}"
             + (f"\npre-tokenized ids above the tokenizer's: the model needs vocab_size >= {manifest['vocab_size']:,}"
                if manifest.get("vocab_size", tok["vocab_size"]) > tok["vocab_size"] else ""),
             f"L0 documents: {tiers['L0']:,}"]
    for step in manifest["steps"]:
        reasons = ", ".join(f"{r} ({n:,})" for r, n in list(step["reasons"].items())[:3])
        lines.append(f"  {step['name']:16} saw {step['seen']:>8,}  dropped {step['dropped']:>7,}"
                     + (f"  {reasons}" if reasons else ""))
    if not manifest["steps"]:
        lines.append("  (no tier steps: every document is L1)")
    lines.append(f"L1 documents: {tiers['L1']:,}")
    for name, split in manifest["splits"].items():
        lines.append(f"tokens {name}: {split['tokens']:,} ({split['documents']:,} documents, "
                     f"{len(split['shards'])} shard{'s' * (len(split['shards']) != 1)})")
    if "mix" in manifest:  # realised shares of a mix: tokens of each part in each split
        lines.append("mix (share of each split's tokens; weight = the asked share of train):")
        for part in manifest["mix"]["parts"]:
            train, held = part["splits"]["train"], part["splits"]["eval"]
            lines.append(f"  {part['name']:16} weight {part['weight']:.3f}  train {train['share']:.3f} "
                         f"({train['tokens']:,} of {train['available_tokens']:,} tokens)  eval {held['share']:.3f}"
                         + ("" if part["held_out"] else " (not held out)"))
        lines.append(f"  limited by: {manifest['mix']['limited_by']['train']} (taken whole in train)")
    lines.append(f"unigram baseline: {manifest['unigram_loss']:.3f} nats/token (eval under train frequencies)")
    return "\n".join(lines)


def cmd_prepare(args) -> int:
    from hyloom.data import prepare

    prepared = prepare(_spec(args.blueprint, args.overrides), progress=not args.no_progress)
    print(describe(prepared.manifest, prepared.dir))
    return 0


def cmd_stats(args) -> int:
    from hyloom.data import DataError, prepared_path

    target = Path(args.target).expanduser()
    if (target / "manifest.json").is_file():
        folder = target
    else:
        folder = prepared_path(_spec(args.target, args.overrides))
        if not (folder / "manifest.json").is_file():
            raise DataError(f"the data of {args.target} is not prepared yet (expected {folder}); "
                            f"run `hyloom data prepare {shlex.join([args.target, *args.overrides])}` first")
    manifest = json.loads((folder / "manifest.json").read_text())
    print(json.dumps(manifest, indent=2) if args.json else describe(manifest, folder))
    return 0


def add_data(sub) -> None:
    text = "prepare a blueprint's training data (source → tiers → tokenizer → token shards) or report on it"
    p = sub.add_parser("data", help=text, description=text, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="data_action", metavar="ACTION")

    prep = actions.add_parser("prepare", help="run the data pipeline (cached: the same inputs do no work)",
                              description="run the data pipeline of a blueprint's data section (cached)",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    prep.add_argument("blueprint", help="a YAML file or builtin:NAME")
    prep.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides like data.seq_len=512")
    prep.add_argument("--no-progress", action="store_true", help="no progress bars")
    prep.set_defaults(func=cmd_prepare)

    stats = actions.add_parser("stats", help="documents per tier, drops per step, tokens per split",
                               description="counts of a prepared data folder, or of a blueprint's prepared data",
                               epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    stats.add_argument("target", help="a blueprint (YAML file or builtin:NAME) or a prepared data folder")
    stats.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="blueprint overrides")
    stats.add_argument("--json", action="store_true", help="print the whole manifest")
    stats.set_defaults(func=cmd_stats)

    p.set_defaults(func=lambda args: p.print_help() or 0)
