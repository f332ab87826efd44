"""HyPE's length generalisation, reproduced small (issue 11 §2; docs/results/hype-length.md).

    python bench/hype_length.py --out DIR [--budget-seconds 420] [--device auto] [--scale full|toy]

Trains the four blueprints of blueprints/experiments/hype-length-*.yaml (a 1:3 attention:Lightning hybrid
with HyPE, RoPE everywhere or NoPE everywhere, and a pure-attention RoPE model) on the same data, seed and
number of tokens at context 512, then evaluates each on `passkey`, `niah` (single needle) and
`loss_by_position` at 1x, 4x, 16x and 64x the training length (toy scale: 256, 512, 1024). The HyPE model is
also evaluated with HypeNet's inference-time query scaling (position.a, --query-scaling), which needs no
training of its own.

The number of training steps is set from the time budget: the data is prepared first, then a few steps of
each model and one forward at the longest evaluation length are timed, and the steps that fit (the same for
every variant) are what is left after the estimated evaluation time. Everything is offline: the corpus is the
running Python's standard library, the retrieval examples are synthetic.

Writes into --out, after every variant (a timeout keeps the finished ones): results.json (plan, data shares,
per variant: parameters, steps, tokens, seconds, losses, training curve, every task's metrics and rows),
retrieval.png (accuracy heatmaps, variants side by side), accuracy_by_length.png, loss_by_position.png,
training.png and summary.txt (the tables). Runs (checkpoints) go to --work, not to --out.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/experiment.py, also when loaded by path
from experiment import autocast, make_log, run_main, sync, timed_train_steps, write_json  # noqa: E402

log = make_log("hype-length")

ROOT = Path(__file__).resolve().parents[1]
BLUEPRINTS = ROOT / "blueprints" / "experiments"
VARIANTS = ("hype", "rope", "nope", "attn-rope")
LABELS = {"hype": "hybrid, HyPE", "rope": "hybrid, RoPE everywhere", "nope": "hybrid, NoPE everywhere",
          "attn-rope": "attention only, RoPE", "hype+a": "hybrid, HyPE + query scaling"}
COLORS = {"hype": "C0", "hype+a": "C0", "rope": "C1", "nope": "C2", "attn-rope": "C3"}  # hype+a: dashed

# What each scale evaluates and (toy only) how it shrinks the blueprints. `overrides` are blueprint overrides as
# on the command line; steps come from the budget at both scales.
SCALES = {
    "full": {
        "overrides": [],
        "lengths": [512, 2048, 8192, 32768], "depths": [0.0, 0.25, 0.5, 0.75, 1.0], "cases": 4,
        "loss_sequences": 16, "eval_batch": 8, "min_steps": 100, "max_steps": 3000,
    },
    "toy": {  # a CPU smoke run: the same pipeline on a model and data small enough for two cores
        "overrides": ["model.d_model=64", "model.mixers.A.heads=2", "model.mixers.A.kv_heads=2",
                      "model.mixers.A.head_dim=32", "model.mixers.L.heads=2", "model.mixers.L.head_dim=32",
                      "model.ffn.hidden=192", "model.vocab_size=1024", "model.max_seq_len=256", "data.seq_len=256",
                      "data.source.sources.0.source.max_bytes=1500000",
                      "data.source.sources.1.source.documents=600", "data.source.sources.2.source.documents=300",
                      "train.batch_size=8", "train.eval_batches=2"],
        "lengths": [256, 512, 1024], "depths": [0.0, 0.5, 1.0], "cases": 2,
        "loss_sequences": 2, "eval_batch": 4, "min_steps": 10, "max_steps": 60,
    },
}


def load(variant: str, overrides: list[str]):
    from hyloom.blueprint import load as load_yaml
    from hyloom.blueprint import validate

    loaded = load_yaml(str(BLUEPRINTS / f"hype-length-{variant}.yaml"), overrides)
    return validate(loaded)


def calibrate(bp, device, longest: int, eval_batch: int, steps: int = 5) -> dict:
    """Seconds per optimizer step (a random batch of the blueprint's shape, bf16 autocast on CUDA, after two warm-up
    steps that also compile the Triton kernels) and per forward of `eval_batch` sequences of the longest length."""
    import torch

    from hyloom.model import build_model

    torch.manual_seed(0)
    model = build_model(bp, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(2, bp.model.vocab_size, (bp.train.batch_size, bp.data.seq_len + 1), device=device)
    times = timed_train_steps(model, opt, batch, 2 + steps, device)
    model.eval()
    ids = torch.randint(2, bp.model.vocab_size, (eval_batch, longest), device=device)
    with torch.no_grad(), autocast(device):
        model(ids[:1, :64])  # compile the inference paths first
        sync(device)
        began = time.perf_counter()
        model(ids)
        sync(device)
    forward = time.perf_counter() - began
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"step_s": sorted(times[2:])[len(times[2:]) // 2], "first_steps_s": round(sum(times[:2]), 2),
            "forward_longest_s": forward}


def eval_estimate(cal: dict, scale: dict, with_a: bool) -> float:
    """Seconds to evaluate one variant: forwards scale linearly from the timed longest one (an upper bound for
    the shorter lengths), x1.5 for decoding and Python; two retrieval tasks and the loss."""
    lengths, longest = scale["lengths"], max(scale["lengths"])
    prompts = scale["cases"] * len(scale["depths"])
    batches = 2 * math.ceil(prompts / scale["eval_batch"]) + math.ceil(scale["loss_sequences"] / scale["eval_batch"])
    seconds = 1.5 * cal["forward_longest_s"] * batches * sum(n / longest for n in lengths) + 5
    return seconds * (1.6 if with_a else 1.0)  # the query-scaled HyPE re-runs passkey and the loss


def steps_that_fit(left: float, step_s: dict, eval_s: dict, budget: float) -> int:
    """Training steps, the same for every variant, that fit in `left` seconds after the estimated evaluations,
    a margin of 5% of the budget and a few seconds a variant (model builds, figures). x1.1 on the timed steps:
    the trainer's own work (data, clipping, logging, held-out evaluations, the checkpoint)."""
    reserve = sum(eval_s.values()) + 0.05 * budget + 3 * len(step_s)
    return int((left - reserve) / (1.1 * sum(step_s.values())))


def task_configs(scale: dict) -> list[dict]:
    grid = {"lengths": scale["lengths"], "depths": scale["depths"], "cases": scale["cases"]}
    return [{"type": "passkey", **grid},
            {"type": "niah", **grid, "variants": ["single"]},
            {"type": "loss_by_position", "lengths": scale["lengths"], "sequences": scale["loss_sequences"]}]


def evaluate(checkpoint, prepared, device, scale: dict, tasks: list[dict], overrides=()) -> dict:
    from hyloom.checkpoint import load_checkpoint
    from hyloom.data import data_spec
    from hyloom.eval import EvalContext, heldout_reader, run_tasks, validate_tasks

    model, bp = load_checkpoint(checkpoint, device=str(device), overrides=list(overrides))
    ctx = EvalContext(model=model, tokenizer=prepared.tokenizer, device=device,
                      heldout_ids=heldout_reader(prepared.dir), train_len=data_spec(bp.data).seq_len,
                      batch_size=scale["eval_batch"], seed=0)
    with autocast(device):
        report = run_tasks(validate_tasks(tasks), ctx)
    return report["tasks"]


def train_variant(variant: str, overrides: list[str], work: Path) -> tuple[dict, dict]:
    from hyloom.train import RunDir, train

    bp = load(variant, overrides + [f"train.out_dir={work / variant}"])
    result = train(bp, bp.model_dump(mode="json"), progress=False, overwrite=True)
    curve = [{k: r[k] for k in ("step", "loss", "eval_loss", "tokens_per_s") if k in r}
             for r in RunDir(work / variant).metrics()]
    return bp, {**result, "curve": curve}


# ---- figures and the text summary ------------------------------------------------------------------------------

def figures(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    done = {k: v for k, v in results["variants"].items() if "eval" in v}
    if not done:
        return
    train_len, lengths = results["train_len"], results["eval"]["lengths"]
    depths = results["eval"]["depths"]
    xticks = [f"{n}*" if n > train_len else str(n) for n in lengths]

    tasks = [t for t in ("passkey", "niah") if any(t in v["eval"] for v in done.values())]
    fig, axes = plt.subplots(len(tasks), len(done), figsize=(3.2 * len(done) + 1, 2.8 * len(tasks) + 0.6),
                             squeeze=False)
    for r, task in enumerate(tasks):
        for c, (name, v) in enumerate(done.items()):
            ax = axes[r][c]
            if task not in v["eval"]:  # the query-scaled HyPE runs passkey and the loss only
                ax.axis("off")
                continue
            rows = v["eval"][task]["rows"]
            grid = np.array([[np.mean([x["score"] for x in rows if x["length"] == n and x["depth"] == d])
                              for n in lengths] for d in depths])
            ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="upper")
            for i in range(len(depths)):
                for j in range(len(lengths)):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if grid[i, j] > 0.5 else "white")
            ax.set_xticks(range(len(lengths)), xticks, fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
            ax.set_title(f"{LABELS.get(name, name)}\n{task}", fontsize=8)
            if c == 0:
                ax.set_ylabel("needle depth")
            if r == len(tasks) - 1:
                ax.set_xlabel("context length (* = beyond training)", fontsize=7)
    fig.suptitle(f"retrieval accuracy, trained at {train_len} tokens", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "retrieval.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        prefix = "passkey" if task == "passkey" else "niah_single"
        for name, v in done.items():
            if task not in v["eval"]:
                continue
            metrics = v["eval"][task]["metrics"]
            ax.plot(lengths, [metrics.get(f"{prefix}/acc@{n}") for n in lengths], marker="o", color=COLORS.get(name),
                    linestyle="--" if name == "hype+a" else "-", label=LABELS.get(name, name))
        ax.axvline(train_len, color="0.4", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(f"{task} accuracy")
        ax.set_title(f"{task}: accuracy by length (dotted: training length)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_by_length.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(lengths), figsize=(3.6 * len(lengths), 3.4), squeeze=False)
    for ax, n in zip(axes[0], lengths):
        for name, v in done.items():
            rows = [x for x in v["eval"]["loss_by_position"]["rows"] if x["length"] == n]
            ax.plot([x["end"] for x in rows], [x["nll"] for x in rows], marker=".", color=COLORS.get(name),
                    linestyle="--" if name == "hype+a" else "-", label=LABELS.get(name, name))
        ax.axvline(train_len, color="0.4", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_title(f"sequences of {n} tokens", fontsize=9)
        ax.set_xlabel("position (bucket end)")
    axes[0][0].set_ylabel("held-out NLL (nats/token)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"held-out loss by position (dotted: training length {train_len})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "loss_by_position.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, v in done.items():
        curve = v.get("train", {}).get("curve") or []
        if not curve:
            continue
        ax.plot([r["step"] for r in curve], [r["loss"] for r in curve], linewidth=1, alpha=0.6,
                color=COLORS.get(name), label=f"{LABELS.get(name, name)}: train")
        held = [r for r in curve if r.get("eval_loss") is not None]
        ax.plot([r["step"] for r in held], [r["eval_loss"] for r in held], marker="o", linestyle="--",
                color=COLORS.get(name), label="held-out")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("next-token loss (nats/token)")
    ax.set_title("training curves (same data, seed and tokens)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=110)
    plt.close(fig)


def summary(results: dict) -> str:
    lengths, train_len = results["eval"]["lengths"], results["train_len"]
    head = "".join(f"{n:>9}{'*' if n > train_len else ' '}" for n in lengths)
    lines = [f"scale {results['scale']}, device {results['device']}, trained at {train_len} tokens "
             f"(* = extrapolated)", ""]
    for task, prefix in (("passkey", "passkey"), ("niah", "niah_single"), ("loss_by_position", "loss/nll")):
        lines.append(f"{task:34}{head}")
        for name, v in results["variants"].items():
            metrics = v.get("eval", {}).get(task, {}).get("metrics")
            if metrics is None:
                continue
            key = (lambda n: f"loss/nll@{n}") if task == "loss_by_position" else (lambda n: f"{prefix}/acc@{n}")
            cells = "".join(f"{metrics.get(key(n)) if metrics.get(key(n)) is not None else float('nan'):>10.3f}"
                            for n in lengths)
            lines.append(f"  {LABELS.get(name, name):32}{cells}")
        lines.append("")
    lines.append(f"{'variant':28}{'params':>10}{'steps':>7}{'tokens':>12}{'train s':>9}{'train':>8}"
                 f"{'held-out':>9}{'eval s':>8}")
    for name, v in results["variants"].items():
        t = v.get("train")
        if t:
            lines.append(f"  {LABELS.get(name, name):26}{v['parameters']:>10,}{t['steps']:>7}{t['tokens']:>12,}"
                         f"{t['seconds']:>9.1f}{t['train_loss']:>8.3f}{t['eval_loss']:>9.3f}"
                         f"{v.get('eval_seconds', float('nan')):>8.1f}")
    return "\n".join(lines) + "\n"


# ---- the run ----------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for results.json, the figures and summary.txt")
    p.add_argument("--work", default="runs/hype-length", help="folder for the training runs (checkpoints)")
    p.add_argument("--budget-seconds", type=float, default=420.0,
                   help="wall time for everything (data, calibration, training, evaluation); sets train.steps")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    p.add_argument("--scale", choices=sorted(SCALES), default="full", help="toy: a CPU smoke run")
    p.add_argument("--steps", type=int, default=None, help="train.steps for every variant (default: from the budget)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a blueprint override for every variant, after the scale's (e.g. data.seq_len=1024); "
                        "may repeat")
    p.add_argument("--cases", type=int, default=None,
                   help="keys per length x depth cell of passkey and niah (default: the scale's, 4 at full scale)")
    p.add_argument("--query-scaling", type=float, default=500.0,
                   help="also evaluate the HyPE model with position.a = this (HypeNet-2B: 500); 0: skip")
    args = p.parse_args(argv)
    began = time.perf_counter()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        p.error(f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    if args.cases is not None and args.cases < 1:
        p.error("--cases: must be at least 1")
    if args.query_scaling and args.query_scaling <= 1:
        p.error("--query-scaling: position.a must be above 1 (or 0 to skip)")

    import torch

    from hyloom import __version__
    from hyloom.data import prepare
    from hyloom.train import pick_device

    scale = {**SCALES[args.scale], "overrides": SCALES[args.scale]["overrides"] + args.set}
    if args.cases is not None:
        scale["cases"] = args.cases
    device = pick_device(args.device, "--device")
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    with_a = bool(args.query_scaling) and "hype" in variants
    log(f"scale {args.scale} on {device}, budget {args.budget_seconds:.0f} s, variants {', '.join(variants)}")

    bps = {v: load(v, scale["overrides"]) for v in variants}
    prepared = prepare(bps[variants[0]].data, progress=False)  # the same data section for all (tested)
    log(f"data ready ({time.perf_counter() - began:.0f} s): {prepared.dir}")
    results = {
        "command": " ".join(["python3 bench/hype_length.py", *(argv if argv is not None else sys.argv[1:])]),
        "scale": args.scale, "overrides": scale["overrides"], "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "versions": {"hyloom": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "train_len": bps[variants[0]].data.seq_len,
        "eval": {k: scale[k] for k in ("lengths", "depths", "cases", "loss_sequences", "eval_batch")},
        "data": {"dir": str(prepared.dir), "splits": prepared.manifest["splits"], "mix": prepared.manifest.get("mix"),
                 "unigram_loss": prepared.unigram_loss},
        "variants": {},
    }
    tasks = task_configs(scale)

    cal = {v: calibrate(bps[v], device, max(scale["lengths"]), scale["eval_batch"]) for v in variants}
    for v in variants:
        log(f"calibration {v}: {cal[v]['step_s'] * 1000:.0f} ms/step, first two steps {cal[v]['first_steps_s']} s, "
            f"forward {scale['eval_batch']} x {max(scale['lengths'])} tokens {cal[v]['forward_longest_s']:.2f} s")
    evals = {v: eval_estimate(cal[v], scale, with_a and v == "hype") for v in variants}
    left = args.budget_seconds - (time.perf_counter() - began)
    fit = steps_that_fit(left, {v: cal[v]["step_s"] for v in variants}, evals, args.budget_seconds)
    steps = args.steps or max(scale["min_steps"], min(scale["max_steps"], fit))
    results["plan"] = {"budget_seconds": args.budget_seconds,
                       "seconds_before_training": round(args.budget_seconds - left, 1), "calibration": cal,
                       "eval_estimate_s": evals, "steps_that_fit": fit, "steps": steps}
    log(f"plan: {steps} steps per variant (fit {fit}); estimated training "
        f"{steps * sum(c['step_s'] for c in cal.values()):.0f} s, evaluation {sum(evals.values()):.0f} s, "
        f"{left:.0f} s left")
    if fit < steps:
        log(f"warning: {steps} steps do not fit the budget ({fit} would); the run will take longer")
    b0 = bps[variants[0]]
    schedule = [f"train.device={device}", f"train.steps={steps}",
                f"train.warmup={min(b0.train.warmup, steps // 10)}", f"train.eval_every={max(1, steps // 10)}",
                f"train.log_every={max(1, steps // 100)}"]

    for v in variants:
        bp, result = train_variant(v, scale["overrides"] + schedule, work)
        entry = {"blueprint": str((BLUEPRINTS / f"hype-length-{v}.yaml").relative_to(ROOT)),
                 "layout": "".join(bp.model.layout), "position": bp.model.position.type,
                 "parameters": sum(p.numel() for p in _params(bp)),
                 "train": {"steps": steps, "batch_size": bp.train.batch_size, "seq_len": bp.data.seq_len,
                           "tokens": steps * bp.train.batch_size * bp.data.seq_len, "seconds": result["seconds"],
                           "train_loss": result["train_loss"], "eval_loss": result["eval_loss"],
                           "curve": result["curve"]}}
        log(f"{v}: trained {steps} steps in {result['seconds']} s, loss {result['train_loss']:.3f}, "
            f"held-out {result['eval_loss']:.3f}")
        results["variants"][v] = entry
        write_json(out / "results.json", results)
        t = time.perf_counter()
        entry["eval"] = evaluate(result["checkpoint"], prepared, device, scale, tasks)
        entry["eval_seconds"] = round(time.perf_counter() - t, 1)
        log(f"{v}: evaluated in {entry['eval_seconds']} s: " + ", ".join(
            f"{k} {x:.3f}" for task in entry["eval"].values() for k, x in task["metrics"].items()
            if x is not None and "@" in k and not k.startswith("niah/")))
        if v == "hype" and with_a:
            t = time.perf_counter()
            results["variants"]["hype+a"] = {
                "blueprint": entry["blueprint"], "layout": entry["layout"], "position": "hype",
                "parameters": entry["parameters"], "query_scaling_a": args.query_scaling,
                "note": "the HyPE checkpoint evaluated with position.a set (inference only, no training of its own)",
                "eval": evaluate(result["checkpoint"], prepared, device, scale, [tasks[0], tasks[2]],
                                 [f"model.position.a={args.query_scaling}"])}
            results["variants"]["hype+a"]["eval_seconds"] = round(time.perf_counter() - t, 1)
        results["seconds"] = round(time.perf_counter() - began, 1)
        write_json(out / "results.json", results)
        figures(results, out)
        (out / "summary.txt").write_text(summary(results))
    print(summary(results), end="")
    log(f"done in {time.perf_counter() - began:.0f} s (budget {args.budget_seconds:.0f} s); wrote {out}")
    return 0


def _params(bp):
    """The model's parameters, built on the meta device (no memory): the count without a checkpoint to load."""
    from hyloom.model import build_model

    return build_model(bp, device="meta").parameters()


if __name__ == "__main__":
    run_main(main, "hype_length")
