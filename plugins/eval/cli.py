"""`hyloom eval CHECKPOINT --task NAME [KEY=VALUE ...]`: run evaluation tasks on a trained checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from hyloom.cli.parser import command_parser

EXAMPLES = """\
  hyloom eval runs/tiny --task passkey                           the run's newest checkpoint
  hyloom eval runs/tiny --task passkey 'task.lengths=[256,1024]' --out results/tiny
  hyloom eval runs/tiny --task passkey --task loss_by_position 'passkey.depths=[0.5]'
  hyloom ls eval_task                                            the tasks there are

KEY=VALUE: task.KEY sets KEY of every task given, NAME.KEY only of task NAME (it wins over task.KEY);
nested keys with dots (task.a.b=1); values are read as YAML (lengths=[512,2048], depth=0.5, name=text).
"""


def _overrides(tasks: list[str], items: list[str]) -> tuple[dict[str, dict], dict[str, dict]]:
    """{task: {key: value}} from `task.KEY=VALUE` (every task) and `NAME.KEY=VALUE` (one task), the latter
    applied last; also {task: {key: prefix}} so that an error names the prefix the user typed."""
    import yaml

    from hyloom.blueprint import BlueprintError, Problem

    configs = {t: {"type": t} for t in tasks}
    origin = {t: {} for t in tasks}
    problems = []
    ordered = sorted(items, key=lambda item: not item.startswith("task."))  # task.KEY first: NAME.KEY wins
    for item in ordered:
        key, eq, text = item.partition("=")
        prefix, dot, path = key.partition(".")
        if not eq or not dot or not path or "" in path.split("."):
            problems.append(Problem("", "expected task.KEY=VALUE or NAME.KEY=VALUE (NAME one of the --task "
                                        f"names: {', '.join(tasks)})", item))
            continue
        if prefix != "task" and prefix not in configs:
            problems.append(Problem(key, f"{prefix!r} is not one of the tasks given with --task "
                                         f"({', '.join(tasks)}); use task.{path} for all of them"))
            continue
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as exc:
            problems.append(Problem(key, f"not a YAML value: {str(exc).splitlines()[0]}", text))
            continue
        for name in tasks if prefix == "task" else [prefix]:
            *parents, last = path.split(".")
            node = configs[name]
            for part in parents:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    problems.append(Problem(key, f"{part} is not a mapping"))
                    break
            else:
                node[last] = value
                origin[name][path.split(".")[0]] = prefix
    if problems:
        raise BlueprintError(problems)
    return configs, origin


def cmd_eval(args) -> int:
    from hyloom.blueprint import BlueprintError, Problem
    from hyloom.blueprint.errors import dotted
    from hyloom.eval import validate_tasks

    tasks = list(dict.fromkeys(args.task))  # a task given twice runs once
    configs, origin = _overrides(tasks, args.overrides)

    def where(i, loc):
        name = tasks[i]
        return dotted((origin[name].get(loc[0], name) if loc else name, *loc))

    try:
        validated = validate_tasks(list(configs.values()), where)
    except BlueprintError as exc:  # these are task configs, not a blueprint: say so
        raise BlueprintError([Problem(p.path, p.message, "task config") for p in exc.problems]) from None
    return _run(args, validated)


def _run(args, configs) -> int:
    import platform

    import torch

    from hyloom import __version__
    from hyloom.checkpoint import BLUEPRINT
    from hyloom.data import data_spec, prepare
    from hyloom.eval import EvalContext, format_table, heldout_reader, run_tasks
    from hyloom.train import open_checkpoint

    path, model, bp, tokenizer, device = open_checkpoint(args.checkpoint, args.device)
    progress = not args.no_progress
    held_out = {}

    def heldout_ids():  # the run's own held-out split: `prepare` finds its cache, or rebuilds it identically
        if "read" not in held_out:
            held_out["read"] = heldout_reader(prepare(bp.data, progress=progress).dir)
        return held_out["read"]()

    ctx = EvalContext(model=model, tokenizer=tokenizer, device=device, heldout_ids=heldout_ids,
                      train_len=data_spec(bp.data).seq_len, batch_size=args.batch_size, seed=args.seed,
                      progress=progress)
    out = Path(args.out) if args.out else path / "eval"
    header = {"checkpoint": str(path), "blueprint": str(path / BLUEPRINT),
              "model": {"layout": "".join(bp.model.layout), "position": bp.model.position.type,
                        "parameters": model.num_parameters()},
              "device": str(device), "batch_size": args.batch_size, "seed": args.seed,
              "versions": {"hyloom": __version__, "torch": torch.__version__, "python": platform.python_version()}}
    report = run_tasks(configs, ctx, out_dir=out, header=header)
    print(format_table(report))
    figures = [e["figure"] for e in report["tasks"].values() if "figure" in e]
    print(f"wrote {out / 'eval.json'}" + "".join(f", {f}" for f in figures))
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return value


def add_eval(sub):
    p = command_parser(sub, "eval", "run evaluation tasks (hyloom ls eval_task) on a checkpoint: prints a table, "
                       "writes eval.json and a figure per task", EXAMPLES)
    p.add_argument("checkpoint", help="a checkpoint directory, or a run directory: its newest checkpoint")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="task.KEY=VALUE or NAME.KEY=VALUE (below)")
    p.add_argument("--task", action="append", required=True, metavar="NAME", help="may repeat: a registered eval_task")
    p.add_argument("--out", default=None, help="folder for eval.json and figures (default: CHECKPOINT/eval)")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=_positive, default=8, help="sequences a task runs at once")
    p.add_argument("--seed", type=int, default=0, help="seed of the cases (keys, needles, depths)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)
