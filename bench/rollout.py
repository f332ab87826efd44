"""GRPO rollout speed at long completions, dense vs hybrid (issue 15 §3): where a fixed-size Lightning state
should pay off against a growing KV cache.

    python bench/rollout.py --out DIR                 # one GPU, ~2 minutes
    python bench/rollout.py --out /tmp/r --quick      # CPU smoke run: tiny lengths

The models are the blueprints of the GRPO experiment (blueprints/experiments/grpo-dense.yaml, grpo-hybrid.yaml:
7.5M parameters each, the hybrid LLLA x 2), with max_seq_len raised to the longest context and random weights.
Each row samples `rows` completions of exactly `new_tokens` tokens after a 64-token prompt, through the GRPO
trainer's own sampler (plugins/rl/rollout.py: prefill, then one decode step per token in CUDA graphs; fp32
weights under bf16 autocast, as the trainer runs) with an EOS id that never occurs, so every row runs to the end.
A row is timed once, after a warm-up call of the same shape at 64 new tokens (kernels loaded); its time includes
what the trainer pays per rollout: cache growth by doubling and the graph captures that follow.

Writes rollout-<device>-<yyyymmdd>.json into --out: rows of model, rows, prompt_tokens, new_tokens, seconds,
tokens_per_s, peak_GB, and hybrid_over_dense (tokens/s ratio) per shape.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/experiment.py, also when loaded by path
from experiment import autocast, make_log, run_main, write_json  # noqa: E402

log = make_log("rollout")
ROOT = Path(__file__).resolve().parents[1]
BLUEPRINTS = {m: ROOT / "blueprints" / "experiments" / f"grpo-{m}.yaml" for m in ("dense", "hybrid")}
PROMPT = 64
# prompt + completion = 1K, 4K, 8K: the dense KV cache doubles up to exactly that (8K x 256 rows: 34 GB in fp32)
FULL = {"new_tokens": [1024 - PROMPT, 4096 - PROMPT, 8192 - PROMPT], "rows": [256]}
QUICK = {"new_tokens": [4, 8], "rows": [2]}


def build(name: str, max_seq_len: int, device):
    import torch

    from hyloom.blueprint import load_blueprint
    from hyloom.model import build_model

    blueprint = load_blueprint(str(BLUEPRINTS[name]), [f"model.max_seq_len={max_seq_len}"])
    torch.manual_seed(0)
    return build_model(blueprint, device=device).eval()


def time_rollout(model, rows: int, new_tokens: int, device) -> dict:
    import torch

    from hyloom.plugins.rl.rollout import sample_completions

    gen = torch.Generator(device=device).manual_seed(0)
    prompts = torch.randint(0, model.spec.vocab_size, (rows, PROMPT), generator=gen, device=device).tolist()

    def run(n: int):
        with autocast(device):
            return sample_completions(model, prompts, max_new_tokens=n, temperature=1.0, eos_id=-1, pad_id=0,
                                      generator=gen)

    run(min(64, new_tokens))  # warm-up: kernels load, autotuners settle
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    roll = run(new_tokens)
    seconds = time.perf_counter() - began  # sample_completions synchronises before it returns
    drawn = int(roll.mask_NT.sum())
    if drawn != rows * new_tokens:
        raise RuntimeError(f"expected {rows * new_tokens} sampled tokens, got {drawn}")
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return {"rows": rows, "prompt_tokens": PROMPT, "new_tokens": new_tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(drawn / seconds, 1), "peak_GB": None if peak is None else round(peak, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the JSON record")
    ap.add_argument("--quick", action="store_true", help="tiny lengths on any device (a smoke run)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu or cuda")
    ap.add_argument("--models", default="dense,hybrid", help="comma-separated subset of dense,hybrid")
    args = ap.parse_args(argv)
    models = args.models.split(",")
    if not models or any(m not in BLUEPRINTS for m in models):
        ap.error(f"--models: a comma-separated subset of {','.join(BLUEPRINTS)}, not {args.models!r}")

    import torch

    from hyloom import __version__
    from hyloom.train import pick_device

    device = pick_device(args.device, "--device")
    plan = QUICK if args.quick else FULL
    longest = PROMPT + max(plan["new_tokens"])
    record = {"bench": "rollout", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "hyloom": __version__, "python": platform.python_version(),
              "date": datetime.date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
              "rows": [], "ratios": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if device.type != "cuda" else torch.cuda.get_device_name(device).split()[-1].lower()
    path = out / f"rollout-{tag}-{datetime.date.today():%Y%m%d}{'' if len(models) == 2 else '-' + models[0]}.json"
    for name in models:
        model = build(name, longest, device)
        record.setdefault("parameters", {})[name] = model.num_parameters()
        for rows in plan["rows"]:
            for n in plan["new_tokens"]:
                row = {"model": name, **time_rollout(model, rows, n, device)}
                log(f"{name:6s} rows {rows} new {n}: {row['seconds']:.2f} s, {row['tokens_per_s']:,.0f} tok/s, "
                    f"peak {row['peak_GB']} GB")
                record["rows"].append(row)
                write_json(path, record)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    by = {(r["model"], r["rows"], r["new_tokens"]): r["tokens_per_s"] for r in record["rows"]}
    for rows in plan["rows"]:
        for n in plan["new_tokens"] if len(models) == 2 else ():
            ratio = by[("hybrid", rows, n)] / by[("dense", rows, n)]
            record["ratios"].append({"rows": rows, "new_tokens": n, "hybrid_over_dense": round(ratio, 3)})
            log(f"rows {rows} new {n}: hybrid / dense tokens/s = {ratio:.2f}")
    write_json(path, record)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_main(main, "rollout")
