"""Where one GRPO step's time goes: rollout, the old log-probs' forward and the updates, timed apart on the GRPO
experiment's models (issue 15 §3), with the top operators of one update from torch.profiler.

    python bench/grpo_step.py --out DIR                # one GPU, ~1 minute
    python bench/grpo_step.py --out /tmp/s --quick     # CPU smoke run: a few rows
    python bench/grpo_step.py --out DIR --compile      # the updates through compiled blocks (GRPO's compile: true)

The models are blueprints/experiments/grpo-dense.yaml and grpo-hybrid.yaml (7.5M parameters, random weights, fp32
weights under bf16 autocast as the trainer runs on a GPU). A step is the trainer's own pieces on the experiment's
shapes: 64 prompts x G = 8 of 36 tokens, completions of `--new-tokens` tokens (EOS never drawn), the old log-probs
(`_old_logprobs`) and `updates_per_step` = 4 mini-batch updates (`_update`) with random advantages. Each phase is
timed `--repeats` times after a warm-up; medians go to grpo-step-<device>-<yyyymmdd>.json with the profiler's
operator table of one update (self CUDA time on a GPU, self CPU time otherwise). A second rollout of half the
tokens splits the rollout into a cost per decode step and a fixed cost (prefill, the new cache, its first eager
step and the graph capture).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/experiment.py, also when loaded by path
from experiment import autocast, make_log, run_main, sync, write_json  # noqa: E402

log = make_log("grpo-step")
ROOT = Path(__file__).resolve().parents[1]
BLUEPRINTS = {m: ROOT / "blueprints" / "experiments" / f"grpo-{m}.yaml" for m in ("dense", "hybrid")}
PROMPT = 36  # the arithmetic prompts of runs 9-10 are 34-37 tokens


def timed(fn, device, repeats: int) -> tuple[float, object]:
    fn()  # warm-up: kernels compile and load
    times, result = [], None
    for _ in range(repeats):
        sync(device)
        began = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times), result


def profile_table(fn, device, rows: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def one_model(name: str, args, device) -> dict:
    import torch

    from hyloom.blueprint import load_blueprint
    from hyloom.model import build_model
    from hyloom.plugins.rl import grpo
    from hyloom.plugins.rl.rollout import sample_completions
    from hyloom.plugins.rl.trainer import GrpoTrainer
    from hyloom.plugins.train.lm import compile_blocks
    from hyloom.train import make_optimizer

    blueprint = load_blueprint(str(BLUEPRINTS[name]))
    cfg = blueprint.stages[1].train
    torch.manual_seed(0)
    model = build_model(blueprint, device=device)
    if args.compile:  # as the trainer's `compile: true`: the updates run compiled blocks, the rollout does not
        compile_blocks(model, dynamic=True)
    trainer = GrpoTrainer(cfg)
    G, prompts_n = cfg.group_size, args.prompts
    gen = torch.Generator(device=device).manual_seed(0)
    prompts = torch.randint(1, model.spec.vocab_size, (prompts_n, PROMPT), generator=gen, device=device).tolist()
    ctx = (lambda: autocast(device)) if device.type == "cuda" else contextlib.nullcontext
    opt = make_optimizer(model, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, device=device)
    env = SimpleNamespace(world=1, rank=0)

    def rollout(new_tokens: int):
        model.eval()
        with ctx():
            return sample_completions(model, [p for p in prompts for _ in range(G)], max_new_tokens=new_tokens,
                                      temperature=1.0, eos_id=-1, pad_id=0, generator=gen)

    # a rollout of half the tokens splits the time into a cost per decode step and a fixed one (prefill, a new
    # cache, its first eager step and the CUDA graph capture)
    half_s, _ = timed(lambda: rollout(max(1, args.new_tokens // 2)), device, args.repeats)
    rollout_s, roll = timed(lambda: rollout(args.new_tokens), device, args.repeats)
    per_step_s = (rollout_s - half_s) / (args.new_tokens - max(1, args.new_tokens // 2))
    adv_BG = grpo.group_advantages(torch.randn(prompts_n, G, generator=torch.Generator().manual_seed(1)))
    adv_NT = grpo.token_advantages(adv_BG.to(device), roll.mask_NT)
    model.train()
    old_s, (old, _, _) = timed(lambda: trainer._old_logprobs(model, roll, None, ctx), device, args.repeats)
    update_s, _ = timed(lambda: trainer._update(model, opt, roll, old, None, adv_NT, 0, env, ctx), device,
                        args.repeats)
    table = profile_table(lambda: trainer._update(model, opt, roll, old, None, adv_NT, 0, env, ctx), device)
    tokens = int(roll.mask_NT.sum())
    return {"model": name, "compiled": args.compile, "parameters": model.num_parameters(), "rows": len(roll.finished_N),
            "prompt_tokens": PROMPT, "new_tokens": args.new_tokens, "updates_per_step": cfg.updates_per_step,
            "rollout_s": round(rollout_s, 4), "rollout_step_ms": round(1000 * per_step_s, 3),
            "rollout_fixed_s": round(rollout_s - args.new_tokens * per_step_s, 4),
            "old_logprobs_s": round(old_s, 4), "update_s": round(update_s, 4),
            "rollout_tokens_per_s": round(tokens / rollout_s, 1), "update_profile": table}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the JSON record")
    ap.add_argument("--quick", action="store_true", help="a few rows and tokens on any device (a smoke run)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu or cuda")
    ap.add_argument("--models", default="dense,hybrid", help="comma-separated subset of dense,hybrid")
    ap.add_argument("--new-tokens", type=int, default=40, help="completion tokens (runs 9-10: 35-52)")
    ap.add_argument("--prompts", type=int, default=64, help="prompts per step (each sampled G = 8 times)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each phase (the median is kept)")
    ap.add_argument("--compile", action="store_true", help="compile each block for the updates (the trainer's "
                    "`compile: true`); the warm-up pays the compilation")
    args = ap.parse_args(argv)
    models = args.models.split(",")
    if not models or any(m not in BLUEPRINTS for m in models):
        ap.error(f"--models: a comma-separated subset of {','.join(BLUEPRINTS)}, not {args.models!r}")
    if args.quick:
        args.new_tokens, args.prompts, args.repeats = 4, 1, 1

    import torch

    from hyloom import __version__
    from hyloom.train import pick_device

    device = pick_device(args.device, "--device")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    record = {"bench": "grpo-step", "device": name, "torch": torch.__version__, "hyloom": __version__,
              "python": platform.python_version(), "date": datetime.date.today().isoformat(),
              "command": " ".join(["python", *sys.argv]), "rows": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if device.type != "cuda" else name.split()[-1].lower()
    path = out / f"grpo-step-{tag}-{datetime.date.today():%Y%m%d}{'-compiled' if args.compile else ''}.json"
    for m in models:
        row = one_model(m, args, device)
        log(f"{m:6s} rows {row['rows']} new {row['new_tokens']}: rollout {row['rollout_s'] * 1000:.0f} ms ("
            f"{row['rollout_step_ms']:.2f} ms a step + {row['rollout_fixed_s'] * 1000:.0f} ms fixed), old "
            f"log-probs {row['old_logprobs_s'] * 1000:.0f} ms, {row['updates_per_step']} updates "
            f"{row['update_s'] * 1000:.0f} ms")
        print(row["update_profile"], flush=True)
        record["rows"].append(row)
        write_json(path, record)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_main(main, "grpo_step")
