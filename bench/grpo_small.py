"""GRPO reproduced small (issue 15 §3; SPEC §8): SFT, then RL with fixed hyper-parameters, dense vs hybrid.

    python bench/grpo_small.py --out DIR [--budget-seconds 520] [--device auto|cuda|cpu] [--scale full|toy]

For each of blueprints/experiments/grpo-dense.yaml and grpo-hybrid.yaml (the same 7.5M-parameter trunk; attention
everywhere vs Lightning with 1:3 attention), the blueprint's two stages run as a user would run them:

1. `sft`: next-token training on generated arithmetic problems of 1..4 operations written as prompt + worked
   solution + \\boxed{answer}. Both models get the same number of steps, set from the time budget and the slower
   model's step time (a few optimizer steps are timed first), at most sft_max_steps (900; --sft-steps fixes it).
2. Difficulty: each SFT model answers held-out problems of 1..8 operations, sampled at temperature 1 (the policy
   GRPO trains) and greedy. RL draws its problems from two levels (pick_levels): the hardest where every model
   still solves at least FLOOR_ACCURACY of them, and the next one, where some model falls below it; --levels sets
   them instead. After SFT on 1..4 that is 4..5: accuracy falls off a cliff one operation past SFT's range (the
   models write four lines whatever the prompt asks; 1-5% of 5-operation problems right), and GRPO teaches the
   fifth line from the few samples that write it (runs 14-16 in docs/results/grpo.md). The easier level keeps
   rewarded groups in every batch. Runs 4-13 SFT'd on 1..8 and RL'd inside that range, where GRPO only sharpened
   the samples toward the greedy answers (+5 points after 600 steps, flat).
3. `grpo`: the blueprint's GRPO stage (G = 8, 64 prompts a step, 4 mini-batch updates, constant LR after warmup)
   on problems of those levels (each problem's level drawn uniformly), stopped by its share of the budget
   (max_seconds; the models' shares are equal, fixed before the first one starts). Held-out accuracy is the
   share of correct completions sampled at temperature 1 (one per problem, 512 problems of the same mix:
   JustRL's avg@k with k = 1) at step 0 (= the SFT model) and every 10 steps; greedy accuracy on the same
   problems is measured before and after, and each level's accuracy after GRPO on the sweep's own problems (the
   RL levels and the one after them: did RL teach past its own levels?).

Arms (--arms SPEC): several GRPO runs from the same SFT models, so that a comparison of GRPO settings is not also
one of SFT models (runs 4-6 each trained their own, for a step count set by measured speed, and picked their own
levels). SPEC is a semicolon-separated list of arms, each a comma-separated list of overrides of the GRPO stage
(stages.1.train.*), e.g. "stages.1.train.lr=5e-6;stages.1.train.lr=1e-5,stages.1.train.seed=2". SFT and the sweep
run once; every arm trains both models on the same levels, for an equal share of the GRPO time (fixed before the
first run starts). The first arm continues the staged run in WORK/MODEL as a single run does; arm k > 1 runs the
GRPO stage alone in WORK/MODEL-armk, starting from WORK/MODEL/sft through the stage's `init`. Runs go arm by arm
(both models of an arm, then the next arm), so a timeout leaves whole arms.

Writes into --out after every phase (a timeout keeps what finished): results.json (plan, SFT, difficulty sweep,
per model: GRPO curves, before/after accuracy, rollout tokens/s, the checkpoint GRPO started from and a checksum of
its weights; with several arms `grpo` is the first arm and `arms` lists every arm: name, overrides and the same
fields), accuracy.png, dynamics.png (entropy and response length), sweep.png, summary.txt, and each GRPO run's
completions log as completions-RUN.jsonl (RUN: the model, or MODEL-armK; `--set
stages.1.train.completions_logged=64` logs more of each sampled step). Runs (checkpoints) go
to --work (default: OUT/runs).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/experiment.py, also when loaded by path
from experiment import autocast, make_log, run_main, timed_train_steps  # noqa: E402

log = make_log("grpo-small")

ROOT = Path(__file__).resolve().parents[1]
BLUEPRINTS = ROOT / "blueprints" / "experiments"
MODELS = ("dense", "hybrid")
LABELS = {"dense": "dense (attention, RoPE)", "hybrid": "hybrid (Lightning + 1:3 attention, HyPE)"}
FLOOR_ACCURACY = 0.40  # sampled held-out accuracy every SFT model keeps on the easier RL level (pick_levels)

# `overrides`: blueprint overrides as on the command line (per model where the layouts differ). Shares are of the
# whole budget; GRPO gets what is left after SFT, the sweep and the reserve, split between the models.
SCALES = {
    "full": {
        "overrides": [], "model_overrides": {"dense": [], "hybrid": []},
        # the cap keeps SFT the same on a larger GPU share: runs 14-16 (SFT on 1..4) ran 900 steps
        "sft_share": 0.12, "sft_min_steps": 200, "sft_max_steps": 900, "reserve_share": 0.04,
        "grpo_overhead": 13.0,  # seconds per model outside max_seconds: setup, checkpoint, greedy, levels after
        "sweep": [1, 2, 3, 4, 5, 6, 7, 8], "sweep_prompts": 128,
    },
    "toy": {  # a CPU smoke run of the same pipeline: a tiny model, little data, small RL batches
        "overrides": ["model.d_model=64", "model.vocab_size=320", "model.ffn.hidden=192",
                      "model.mixers.A.heads=2", "model.mixers.A.kv_heads=2", "model.mixers.A.head_dim=32",
                      "data.source.count=3000", "data.source.steps=3", "data.seq_len=128",
                      "stages.0.train.batch_size=16", "stages.0.train.warmup=10", "stages.0.train.eval_every=50",
                      "stages.0.train.eval_batches=1",
                      "stages.1.train.prompts_per_step=8", "stages.1.train.group_size=4",
                      "stages.1.train.updates_per_step=2", "stages.1.train.eval_prompts.count=32",
                      "stages.1.train.eval_every=4", "stages.1.train.lr=1.0e-4", "stages.1.train.warmup=2"],
        "model_overrides": {"dense": ["model.layout.times=4", "model.n_layers=4"],
                            "hybrid": ["model.layout.times=1", "model.n_layers=4", "model.mixers.L.heads=2", "model.mixers.L.head_dim=32"]},
        "sft_share": 0.2, "sft_min_steps": 20, "sft_max_steps": 300, "reserve_share": 0.05, "grpo_overhead": 3.0,
        "sweep": [1, 2, 3, 4], "sweep_prompts": 16,
    },
}


def load(model: str, overrides: list[str]):
    """(resolved dict, validated blueprint) of grpo-<model>.yaml with overrides."""
    from hyloom.blueprint import load as load_yaml
    from hyloom.blueprint import validate

    bp = validate(load_yaml(str(BLUEPRINTS / f"grpo-{model}.yaml"), overrides))
    return bp.model_dump(mode="json"), bp


def validated(resolved: dict):
    from hyloom.blueprint import blueprint_model

    bp = blueprint_model().model_validate(resolved)
    return bp, bp.model_dump(mode="json")


def sft_step_seconds(bp, device, steps: int = 3) -> float:
    """Seconds per SFT optimizer step: a random batch of the stage's shape, after two warm-up steps (which also
    compile the Triton kernels)."""
    import torch

    from hyloom.model import build_model

    train = bp.stages[0].train
    torch.manual_seed(0)
    model = build_model(bp, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(2, bp.model.vocab_size, (train.batch_size, bp.data.seq_len + 1), device=device)
    times = timed_train_steps(model, opt, batch, 2 + steps, device)
    del model, opt
    return sum(times[2:]) / steps


# ---- phases -------------------------------------------------------------------------------------------------

def run_sft(resolved: dict, work: Path, steps: int, device: str) -> dict:
    """The blueprint's first stage alone (its stages list cut after `sft`), into work/: it records the stage as
    finished, so the GRPO phase later continues the same run with --resume auto."""
    from hyloom.train import RunDir, train

    staged = json.loads(json.dumps(resolved))
    staged["out_dir"] = str(work)
    staged["stages"] = staged["stages"][:1]
    staged["stages"][0]["train"].update(steps=steps, device=device)
    bp, res = validated(staged)
    began = time.perf_counter()
    result = train(bp, res, progress=False)
    metrics = RunDir(work / "sft").metrics()
    return {"steps": steps, "seconds": round(time.perf_counter() - began, 1), "train_loss": result["train_loss"],
            "eval_loss": result["eval_loss"], "tokens": steps * bp.stages[0].train.batch_size * bp.data.seq_len,
            "curve": [{k: r[k] for k in ("step", "loss", "eval_loss") if k in r} for r in metrics]}


def accuracies(model, tokenizer, records: list[dict], max_new_tokens: int, device, sampled: bool = True) -> dict:
    """Held-out accuracy of one completion per record, sampled at temperature 1 (seeded; unless `sampled` is false)
    and greedy."""
    import torch

    from hyloom.plugins.rl.config import GrpoConfig
    from hyloom.plugins.rl.trainer import Scorer, score_prompts

    scorer = Scorer(GrpoConfig(verifiers=[{"verifier": {"type": "math"}}], reward_workers=1))
    template = GrpoConfig().prompt_template
    out = {}
    for key, temperature in (("accuracy", 1.0), ("greedy_accuracy", 0.0))[0 if sampled else 1:]:
        with torch.no_grad(), autocast(device):
            got = score_prompts(model, tokenizer, records, scorer, template=template, max_new_tokens=max_new_tokens,
                                temperature=temperature)
        out[key] = got["accuracy"]
        out["response_length_mean" if temperature else "greedy_length_mean"] = got["response_length_mean"]
    return out


def sweep_accuracy(work: Path, eval_prompts: dict, levels: list[int], count: int, device: str,
                   folder: str = "sft") -> dict:
    """Held-out accuracy (sampled and greedy) of the `folder` checkpoint for each number of operations, and each
    level's longest worked solution in tokens (what max_new_tokens must allow)."""
    from hyloom.plugins.rl.config import GrpoConfig
    from hyloom.plugins.rl.prompts import load_prompt_set
    from hyloom.train import open_checkpoint

    _, model, _, tokenizer, dev = open_checkpoint(work / folder, device)
    out = {}
    for k in levels:
        records = load_prompt_set({**eval_prompts, "min_steps": None, "steps": k, "count": count})
        longest = max(len(tokenizer.encode(r["solution"])) + 1 for r in records)
        prompt = max(len(tokenizer.encode(GrpoConfig().prompt_template.format(prompt=r["prompt"]))) for r in records)
        out[k] = {**accuracies(model, tokenizer, records, longest + 8, dev), "solution_tokens_max": longest,
                  "prompt_tokens_max": prompt}
        log(f"  {k} operations: accuracy {out[k]['accuracy']:.3f} sampled, {out[k]['greedy_accuracy']:.3f} greedy "
            f"(longest solution {longest} tokens)")
    del model
    return out


def pick_levels(sweep: dict, floor: float = FLOOR_ACCURACY) -> tuple[int, int]:
    """(easier, harder) levels for RL: `harder` is the first level where some model's sampled accuracy falls below
    FLOOR_ACCURACY, `easier` the level before it, where every model is still at or above it. When no level falls
    below the floor (run 2's sweep ended at 6 operations with 0.83 / 0.61), both are the hardest level measured:
    the sweep was too short. When the easiest level is already below it, both are that level.
    `sweep`: {model: {str(level): {"accuracy": ...}}}."""
    levels = sorted({int(k) for s in sweep.values() for k in s})
    below = [k for k in levels if min(s[str(k)]["accuracy"] for s in sweep.values()) < floor]
    if not below:
        return levels[-1], levels[-1]
    harder = below[0]
    easier = max((k for k in levels if k < harder), default=harder)
    return easier, harder


def parse_levels(spec: str | None, sweep: list[int]) -> tuple[int, int] | None:
    """--levels "LO,HI" (or one level "K") as a pair of levels the sweep measures; None when not given."""
    if spec is None:
        return None
    try:
        parts = [int(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(f"LO,HI as two numbers of operations, not {spec!r}") from None
    lo, hi = parts[0], parts[-1]
    if len(parts) > 2 or not sweep[0] <= lo <= hi <= sweep[-1]:
        raise ValueError(f"LO <= HI within the sweep's {sweep[0]}..{sweep[-1]} operations, not {spec!r}")
    return lo, hi


def levels_text(levels) -> str:
    return f"{levels[0]}" if levels[0] == levels[1] else f"{levels[0]}..{levels[1]}"


# ---- arms ---------------------------------------------------------------------------------------------------

ARM_PREFIX = "stages.1.train."
# what run_grpo sets itself (budget, device, levels): an arm's value would be overwritten without a word
SET_BY_SCRIPT = ("max_seconds", "device", "max_new_tokens", "out_dir", "prompts.steps", "prompts.min_steps",
                 "eval_prompts.steps", "eval_prompts.min_steps")


def parse_arms(spec: str | None) -> list[dict]:
    """[{name, overrides}] from --arms: arms separated by `;`, each a comma-separated list of GRPO-stage overrides
    (KEY=VALUE, KEY under stages.1.train.). No spec: one arm, the blueprint's GRPO stage as it is. The name is the
    overrides without their common prefix, e.g. "lr=5e-6, seed=2". Raises ValueError on a malformed spec."""
    if spec is None:
        return [{"name": "blueprint", "overrides": []}]
    arms = []
    for i, part in enumerate(spec.split(";"), 1):
        overrides = [o.strip() for o in part.split(",") if o.strip()]
        if not overrides:
            raise ValueError(f"arm {i} has no override (write each arm as KEY=VALUE[,KEY=VALUE...], arms separated "
                             "by ';', and no empty arm)")
        for o in overrides:
            key, eq, value = o.partition("=")
            if not eq or not value or not key.startswith(ARM_PREFIX):
                raise ValueError(f"arm {i}: {o!r} is not {ARM_PREFIX}KEY=VALUE (an arm changes the GRPO stage only: "
                                 "the SFT models and the sweep are shared)")
            if key[len(ARM_PREFIX):] in SET_BY_SCRIPT:
                raise ValueError(f"arm {i}: {key} is set by the script (budget, device, levels)")
        name = ", ".join(o[len(ARM_PREFIX):] for o in overrides)
        if name in [a["name"] for a in arms]:
            raise ValueError(f"arm {i} repeats an earlier arm ({name})")
        arms.append({"name": name, "overrides": overrides})
    return arms


def arm_entries(model: dict) -> list[dict]:
    """A model's GRPO runs as [{name, ...grpo fields}]: its `arms`, or its single `grpo` run."""
    if "arms" in model:
        return model["arms"]
    return [{"name": "blueprint", **model["grpo"]}] if "grpo" in model else []


def weights_checksum(checkpoint: Path) -> str:
    """SHA-256 over a checkpoint's weight files (in name order): equal for two arms started from the same weights."""
    import hashlib

    from hyloom.checkpoint import weight_files

    digest = hashlib.sha256()
    for file in sorted(weight_files(checkpoint)):
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def greedy_before_after(grpo_cfg, sft_dir: Path, grpo_dir: Path, max_new_tokens: int, device: str) -> dict:
    """Greedy accuracy of the SFT and the GRPO checkpoints on the GRPO stage's own held-out problems."""
    from hyloom.plugins.rl.trainer import GrpoTrainer
    from hyloom.train import open_checkpoint

    held = GrpoTrainer(grpo_cfg).records()[1]  # as the trainer evaluates: training prompts left out
    out = {}
    for when, folder in (("before", sft_dir), ("after", grpo_dir)):
        _, model, _, tokenizer, dev = open_checkpoint(folder, device)
        out[f"greedy_accuracy_{when}"] = accuracies(model, tokenizer, held, max_new_tokens, dev,
                                                       sampled=False)["greedy_accuracy"]
        del model
    return out


def run_grpo(resolved: dict, work: Path, sft_steps: int, levels: tuple[int, int], max_new_tokens: int,
             seconds: float, device: str, sft_run: Path | None = None) -> dict:
    """The blueprint's GRPO stage on problems of levels[0]..levels[1] operations, into work/grpo: continuing the
    SFT run in work (--resume auto), or, given `sft_run` (the first arm's sft/ run directory), as the only stage of
    a run in work that starts from that SFT checkpoint (the stage's `init`)."""
    from hyloom.train import STAGES_FILE, RunDir, checkpoint_dir, train

    staged = json.loads(json.dumps(resolved))
    staged["out_dir"] = str(work)
    if sft_run is None:
        staged["stages"][0]["train"].update(steps=sft_steps, device=device)  # as the SFT phase ran it
    else:
        staged["stages"] = [{**staged["stages"][1], "init": str(sft_run)}]
    grpo = staged["stages"][-1]["train"]
    grpo.update(device=device, max_new_tokens=max_new_tokens, max_seconds=max(seconds, 1.0))
    for prompts in (grpo["prompts"], grpo["eval_prompts"]):
        prompts["min_steps"], prompts["steps"] = levels
    bp, res = validated(staged)
    began = time.perf_counter()
    result = train(bp, res, resume="auto" if sft_run is None else None, progress=False)
    seconds = round(time.perf_counter() - began, 1)
    # the checkpoint the stage started from, as the stage runner picked it: SFT's final one (stages.json), or init
    start = work / json.loads((work / STAGES_FILE).read_text())["finished"][0]["checkpoint"] if sft_run is None \
        else checkpoint_dir(sft_run)
    greedy = greedy_before_after(bp.stages[-1].train, start, work / "grpo", max_new_tokens, device)
    metrics = RunDir(work / "grpo").metrics()
    evals = [(r["step"], r["eval/accuracy"]) for r in metrics if "eval/accuracy" in r]
    steps = [r for r in metrics if "reward_mean" in r]
    keys = ("step", "reward_mean", "accuracy", "entropy", "response_length_mean", "response_length_max", "clipped",
            "approx_kl", "clip_high", "clip_low", "grad_norm", "logp_mismatch", "rollout_seconds", "update_seconds",
            "rollout_tokens_per_s", "groups_all_same", "skipped_update")
    tok_s = [r["rollout_tokens_per_s"] for r in steps[1:]] or [r["rollout_tokens_per_s"] for r in steps]
    return {"steps": result["steps"], "seconds": seconds, "levels": list(levels), **greedy,
            "max_new_tokens": max_new_tokens, "lr": bp.stages[-1].train.lr, "seed": bp.stages[-1].train.seed,
            "start_checkpoint": str(start), "start_weights_sha256": weights_checksum(start),
            "accuracy_before": evals[0][1] if evals else None, "accuracy_after": evals[-1][1] if evals else None,
            "eval_curve": [{"step": s, "accuracy": a} for s, a in evals],
            "curve": [{k: r[k] for k in keys if k in r} for r in steps],  # a skipped step: no update metrics
            # the first step's rate includes compiling the decode path: left out when there are others
            "rollout_tokens_per_s": sum(tok_s) / max(len(tok_s), 1)}


# ---- reporting ----------------------------------------------------------------------------------------------

def figures(results: dict, out: Path) -> None:
    from hyloom.plot import line_plot

    models = results.get("models", {})
    runs = [(m, a) for m, v in models.items() for a in arm_entries(v)]
    if runs:
        several = any("arms" in v for v in models.values())
        names = list(dict.fromkeys(a["name"] for _, a in runs))

        def label(m, a):  # a single run keeps the labels of the figures before arms
            return f"{m}, {a['name']}" if several else LABELS.get(m, m)

        # colour per model, line style per arm
        colour = {m: f"C{i}" for i, m in enumerate(models)}
        dash = {n: ("-", "--", ":", "-.")[i % 4] for i, n in enumerate(names)}
        styles = {label(m, a): {"color": colour[m], "linestyle": dash[a["name"]]} for m, a in runs} if several else None
        line_plot(out / "accuracy.png", {label(m, a): [(p["step"], p["accuracy"]) for p in a["eval_curve"]]
                                         for m, a in runs},
                  markers=tuple(label(m, a) for m, a in runs), styles=styles, xlabel="GRPO step",
                  ylabel="held-out accuracy (sampled, T = 1)",
                  title=f"GRPO on {levels_text(results['levels'])}-operation problems"
                        + (" (colour: model, line: arm)" if several else ""))
        series, styles = {}, {}
        metrics = (("entropy (nats/token)", "entropy", 1), ("response length / 10", "response_length_mean", 10),
                   ("clipped share", "clipped", 1))
        for i, (m, a) in enumerate(runs):
            who = f"{m}, {a['name']}" if several else m
            for j, (what, key, scale) in enumerate(metrics):
                series[f"{who}: {what}"] = [(p["step"], p[key] / scale) for p in a["curve"]]
                # colour per model and measure, line style per arm
                styles[f"{who}: {what}"] = {"color": f"C{list(models).index(m) * len(metrics) + j}",
                                            "linestyle": dash[a["name"]]}
        line_plot(out / "dynamics.png", series, styles=styles if several else None, xlabel="GRPO step",
                  ylabel="value", title="collapse watch: entropy, response length, share cut at max_new_tokens",
                  size=(9.0, 5.6) if several else (7.0, 4.2))
    sweep = results.get("sweep")
    if sweep:
        series = {}
        for m, s in sweep.items():
            series[f"{m}: sampled (T = 1)"] = sorted((int(k), v["accuracy"]) for k, v in s.items())
            series[f"{m}: greedy"] = sorted((int(k), v["greedy_accuracy"]) for k, v in s.items())
        line_plot(out / "sweep.png", series, markers=tuple(series), xlabel="operations per problem",
                  ylabel="held-out accuracy after SFT", title="difficulty sweep of the SFT models")


def summary(results: dict) -> str:
    lines = [f"GRPO small ({results['scale']} scale, {results['device']}, budget {results['budget_seconds']} s)", ""]
    models = results.get("models", {})
    lines.append(f"{'model':<44}{'params':>10}{'SFT steps':>11}{'SFT s':>8}{'eval loss':>11}")
    for m, v in models.items():
        sft = v.get("sft", {})
        lines.append(f"{LABELS.get(m, m):<44}{v['parameters']:>10,}{sft.get('steps', '-'):>11}"
                     f"{sft.get('seconds', '-'):>8}{sft.get('eval_loss') or float('nan'):>11.3f}")
    if results.get("sweep"):
        levels = sorted({int(k) for s in results["sweep"].values() for k in s})
        lines += ["", "SFT held-out accuracy by operations per problem: " + "  ".join(f"{k:>5}" for k in levels)]
        for m, s in results["sweep"].items():
            for key, what in (("accuracy", "sampled"), ("greedy_accuracy", "greedy")):
                lines.append(f"  {m + ', ' + what:<46}" + "  ".join(f"{s[str(k)][key]:>5.2f}" for k in levels))
        if "levels" in results:
            floor = results.get("floor_accuracy", FLOOR_ACCURACY)
            why = ("set by --levels" if results.get("forced_levels") else
                   f"the hardest level with every model's sampled accuracy >= {floor}, and the next")
            lines.append(f"RL difficulty: {levels_text(results['levels'])} operations ({why}; SFT saw "
                         f"{results.get('sft_operations', '?')})")
    runs = [(m, a) for m, v in models.items() for a in arm_entries(v)]
    several = any("arms" in v for v in models.values())
    if runs:
        if several:
            lines += ["", f"GRPO arms (each from the same SFT models, on the same levels, "
                          f"{results.get('grpo_seconds_each', '?')} s of GRPO per model and arm):"]
            lines += [f"  {i}. {a['name']}: {' '.join(a['overrides'])}" for i, a in enumerate(results.get("arms", []), 1)]
        who = {(m, a["name"]): f"{m}, {a['name']}" if several else m for m, a in runs}
        width = max(10, 2 + max(map(len, who.values())))
        lines += ["", f"{'model' + (', arm' if several else ''):<{width}}{'steps':>7}{'GRPO s':>8}"
                      f"{'sampled acc before -> after':>30}"
                      f"{'greedy before -> after':>25}{'entropy first->last':>22}{'length first->last':>21}"
                      f"{'rollout tok/s':>15}"]

        def change(before, after):
            if before is None or after is None:
                return f"{'-':>28}"
            return f"{before:>9.3f} -> {after:.3f} ({100 * (after - before):+5.1f})"

        for m, g in runs:
            first, last = g["curve"][0], g["curve"][-1]
            lines.append(f"{who[m, g['name']]:<{width}}{g['steps']:>7}{g['seconds']:>8}  "
                         f"{change(g['accuracy_before'], g['accuracy_after'])}"
                         f"{change(g.get('greedy_accuracy_before'), g.get('greedy_accuracy_after'))}"
                         f"{first['entropy']:>11.3f} -> {last['entropy']:<6.3f}"
                         f"{first['response_length_mean']:>11.1f} -> {last['response_length_mean']:<6.1f}"
                         f"{g['rollout_tokens_per_s']:>15,.0f}")
        lines.append("(changes in accuracy points; entropy of the policy on its samples, nats/token; length in tokens)")
        for m, g in runs:
            for k, after in sorted(g.get("by_level", {}).items(), key=lambda kv: int(kv[0])):
                before = results["sweep"][m][k]
                lines.append(f"  {m + (' (' + g['name'] + ')' if several else '')}, {k} operations (the sweep's "
                             f"problems): sampled {change(before['accuracy'], after['accuracy']).strip()}, greedy "
                             f"{change(before['greedy_accuracy'], after['greedy_accuracy']).strip()}")
    return "\n".join(lines) + "\n"


def write(results: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    figures(results, out)
    (out / "summary.txt").write_text(summary(results))


def arm_dir(work: Path, model: str, arm: int) -> Path:
    """Run directory of a model's arm (0-based): the first arm's is the SFT run's own, WORK/MODEL."""
    return work / model if arm == 0 else work / f"{model}-arm{arm + 1}"


# ---- main ---------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=(
        "examples:\n  python bench/grpo_small.py --out bench/results/grpo --budget-seconds 520 --device cuda\n"
        "  python bench/grpo_small.py --out /tmp/grpo-toy --scale toy --device cpu --budget-seconds 200"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for results.json, the PNGs and summary.txt")
    parser.add_argument("--budget-seconds", type=float, default=520.0, help="wall-clock budget for everything")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--scale", default="full", choices=list(SCALES))
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of dense,hybrid")
    parser.add_argument("--work", default=None, help="folder for the runs (checkpoints); default OUT/runs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a blueprint override for both models, e.g. stages.1.train.lr=1e-4 (repeatable); "
                             "recorded in results.json")
    parser.add_argument("--arms", default=None, metavar="SPEC",
                        help="several GRPO runs from the same SFT models: arms separated by ';', each a comma-"
                             "separated list of GRPO-stage overrides, e.g. \"stages.1.train.lr=5e-6;"
                             "stages.1.train.lr=1e-5,stages.1.train.seed=2\" (default: one run, the blueprint's)")
    parser.add_argument("--sft-steps", type=int, default=None, metavar="N",
                        help="SFT steps for every model instead of the number the budget gives (run 11: 300 steps "
                             "left a model that had not learned the format; docs/results/grpo.md)")
    parser.add_argument("--floor", type=float, default=FLOOR_ACCURACY, metavar="ACC",
                        help="RL's easier level is the hardest whose sampled SFT accuracy is at least ACC, its harder "
                             "level the next one (pick_levels)")
    parser.add_argument("--levels", default=None, metavar="LO,HI",
                        help="RL on LO..HI operations whatever the sweep says (instead of --floor), e.g. 4,5: "
                             "one operation past SFT's 1..4")
    args = parser.parse_args(argv)
    if not 0 < args.floor <= 1:
        parser.error(f"--floor: a sampled accuracy in (0, 1], not {args.floor}")
    try:
        forced = parse_levels(args.levels, SCALES[args.scale]["sweep"])
    except ValueError as exc:
        parser.error(f"--levels: {exc}")
    try:
        arms = parse_arms(args.arms)
    except ValueError as exc:
        parser.error(f"--arms: {exc}")
    began = time.perf_counter()

    import torch

    from hyloom.data import prepare
    from hyloom.train import pick_device

    scale = SCALES[args.scale]
    models = [m for m in args.models.split(",") if m]
    if not models or any(m not in MODELS for m in models):
        parser.error(f"--models: choose from {', '.join(MODELS)}")
    if args.sft_steps is not None and args.sft_steps < 1:
        parser.error(f"--sft-steps: a positive number of steps, not {args.sft_steps}")
    device = pick_device(args.device, "--device")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else out / "runs"
    budget = args.budget_seconds

    def left() -> float:
        return budget - (time.perf_counter() - began)

    loaded = {m: load(m, scale["overrides"] + scale["model_overrides"][m] + args.set) for m in models}
    # each arm's blueprint: its overrides last; it must leave everything but the GRPO stage as the first arm has it
    arm_loaded = [{m: load(m, scale["overrides"] + scale["model_overrides"][m] + args.set + a["overrides"])[0]
                   for m in models} for a in arms]
    for a, per_model in zip(arms, arm_loaded):
        for m, resolved in per_model.items():
            base = loaded[m][0]
            if {k for k in base if k != "stages" and base[k] != resolved[k]} or base["stages"][0] != resolved["stages"][0]:
                parser.error(f"--arms: arm {a['name']!r} changes more than the GRPO stage")
    loaded = {m: (arm_loaded[0][m], loaded[m][1]) for m in models}  # the first arm's GRPO stage for a single run
    results = {"scale": args.scale, "device": str(device), "budget_seconds": budget, "torch": torch.__version__,
               "python": platform.python_version(), "floor_accuracy": args.floor, "forced_levels": forced,
               "overrides": args.set,
               "models": {}}
    if len(arms) > 1:
        results["arms"] = arms
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    for m, (resolved, bp) in loaded.items():
        from hyloom.model import build_model

        results["models"][m] = {"parameters": build_model(bp, device="meta").num_parameters(),
                                "layout": "".join(bp.model.layout)}
        for k in range(len(arms)):  # a fresh run: the GRPO phase resumes what SFT leaves
            shutil.rmtree(arm_dir(work, m, k), ignore_errors=True)
    log(f"{args.scale} scale on {device}, budget {budget:.0f} s; data ...")
    first = next(iter(loaded.values()))[1]
    prepared = prepare(first.data, progress=False)  # the models share the data section: one cache
    src = first.data.source
    results["sft_operations"] = f"{src.min_steps or src.steps}..{src.steps}"
    results["data"] = {"train_tokens": prepared.manifest["splits"]["train"]["tokens"],
                       "documents": prepared.manifest["splits"]["train"]["documents"]}
    log(f"data ready: {results['data']['train_tokens']:,} training tokens ({left():.0f} s left)")

    # the same SFT steps for every model (run 2 gave dense 1,413 and hybrid 1,088), from the slower one's step time
    step_s = {m: sft_step_seconds(bp, device) for m, (_, bp) in loaded.items()}
    fitted = 0.9 * scale["sft_share"] * budget / max(step_s.values())
    steps = args.sft_steps or int(min(scale["sft_max_steps"], max(scale["sft_min_steps"], fitted)))
    results["sft_steps"] = steps
    for m, (resolved, bp) in loaded.items():
        log(f"{m}: SFT {steps} steps ({step_s[m] * 1000:.0f} ms a step)")
        results["models"][m]["sft"] = run_sft(resolved, work / m, steps, str(device))
        log(f"{m}: SFT done in {results['models'][m]['sft']['seconds']} s, held-out loss "
            f"{results['models'][m]['sft']['eval_loss']:.3f} ({left():.0f} s left)")
        write(results, out)

    eval_prompts = next(iter(loaded.values()))[0]["stages"][1]["train"]["eval_prompts"]
    results["sweep"] = {}
    for m in models:
        log(f"{m}: difficulty sweep")
        got = sweep_accuracy(work / m, eval_prompts, scale["sweep"], scale["sweep_prompts"], str(device))
        results["sweep"][m] = {str(k): v for k, v in got.items()}
    levels = forced or pick_levels(results["sweep"], args.floor)
    if forced is None and levels[0] == levels[1]:
        log(f"warning: the sweep has no pair of levels on both sides of sampled accuracy {args.floor}; "
            f"RL on {levels[0]} operations alone")
    longest = max(s[str(levels[1])]["solution_tokens_max"] for s in results["sweep"].values())
    prompt = max(s[str(levels[1])]["prompt_tokens_max"] for s in results["sweep"].values())
    # room to ramble, and to see it; within the model's positions
    new_tokens = min(2 * longest, first.model.max_seq_len - prompt)
    results["levels"], results["max_new_tokens"] = list(levels), new_tokens
    log(f"RL difficulty: {levels_text(levels)} operations, max_new_tokens {new_tokens} ({left():.0f} s left)")
    write(results, out)

    # equal GRPO time per model and arm, fixed now: an early run's overrun cannot eat a later one's share. Arm by
    # arm, both models each, so that a timeout leaves whole arms
    runs = [(arm, m) for arm in range(len(arms)) for m in models]
    share = (left() - scale["reserve_share"] * budget) / len(runs) - scale["grpo_overhead"]
    results["grpo_seconds_each"] = round(share, 1)
    for i, (arm, m) in enumerate(runs):
        share = min(share, (left() - scale["reserve_share"] * budget) / (len(runs) - i) - scale["grpo_overhead"])
        who = m if len(arms) == 1 else f"{m}, arm {arm + 1} ({arms[arm]['name']})"
        log(f"{who}: GRPO for {share:.0f} s")
        run = arm_dir(work, m, arm)
        g = run_grpo(arm_loaded[arm][m], run, results["models"][m]["sft"]["steps"], levels, results["max_new_tokens"],
                     share, str(device), sft_run=None if arm == 0 else work / m / "sft")
        log(f"{who}: accuracy by level after GRPO")
        after = [k for k in range(levels[0], levels[1] + 2) if k in scale["sweep"]]  # and one level past them
        got = sweep_accuracy(run, eval_prompts, after, scale["sweep_prompts"], str(device), folder="grpo")
        g["by_level"] = {str(k): v for k, v in got.items()}
        log_file = run / "grpo" / "completions.jsonl"  # what the rewards were given for: with the results
        if log_file.exists():
            shutil.copyfile(log_file, out / f"completions-{run.name}.jsonl")
        if arm == 0:
            results["models"][m]["grpo"] = g
        if len(arms) > 1:
            results["models"][m].setdefault("arms", []).append({**arms[arm], "run": str(run), **g})
        log(f"{who}: GRPO {g['steps']} steps in {g['seconds']} s, held-out accuracy {g['accuracy_before']:.3f} -> "
            f"{g['accuracy_after']:.3f} sampled, {g['greedy_accuracy_before']:.3f} -> {g['greedy_accuracy_after']:.3f} "
            f"greedy, {g['rollout_tokens_per_s']:,.0f} rollout tokens/s ({left():.0f} s left)")
        write(results, out)
    results["seconds"] = round(time.perf_counter() - began, 1)
    write(results, out)
    print(summary(results), end="")
    return 0


if __name__ == "__main__":
    run_main(main, "grpo_small")
