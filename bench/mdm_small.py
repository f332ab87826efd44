"""AR vs masked diffusion (MDM), reproduced small (issue 14 §4; docs/mdm.md).

    python bench/mdm_small.py --out DIR [--budget-seconds 480] [--device auto] [--scale full|toy]

Trains the two blueprints of blueprints/experiments/mdm-{ar,mdm}.yaml (one hybrid body, 4 attention + 4
Lightning layers; only model.causal and train.objective differ) on the same data, seed and number of tokens,
then compares them on held-out text:

- likelihood: the AR model's NLL per token against the MDM's ELBO bound per token, on the same windows of
  seq_len + 1 held-out tokens, both scoring tokens 1..seq_len given token 0. The bound is estimated by
  Monte-Carlo over t, stratified: for each window, K draws t_k = (k + u_k)/K (k = 0..K-1, u_k ~ U(0, 1)),
  p_k = (1 - eps) t_k + eps, each token but the first masked with probability p_k, and
  bound = mean_k Σ_masked CE / p_k / seq_len. The spread is the standard error over windows (each window's
  mean over its K draws); the gap bound - NLL has a paired standard error (both on the same windows), and the
  integrand's mean by stratum is kept (the loss as a function of t);
- samples: greedy continuations of a few held-out prompts, by the ar sampler and by the mdm sampler
  (low-confidence remasking, blocks), with their forward passes (NFE);
- the attention-floating probe (hyloom probe attention) on the same prompts: per step and layer, the anchors
  (incoming attention > mean + 3 std). Quantified per model and layer kind: the Jaccard overlap of the anchor
  set with the previous step's (over pairs where either is non-empty), the Jaccard overlap between the anchor
  sets of two layers at the same step, the share of attention on position 0, how often position 0 is an anchor
  and how many distinct positions ever are.

The number of training steps is set from the time budget, as in bench/hype_length.py: data first, then a few
timed steps of each model and timed evaluation forwards; the steps that fit (the same for both) are what is
left after the estimated evaluation. Everything is offline (the corpus is the running Python's standard library).

Writes into --out after every phase (a timeout keeps the finished ones): results.json, summary.txt,
likelihood.png (NLL vs bound, the bound's integrand by t), training.png, probe.png (per model and layer: anchor
positions by step for the first prompt), probe_metrics.png (the measures above per layer) and, per model,
probe-<model>/ (the probe's own probe.json and PNGs for the first prompt). Runs go to --work (default: a
temporary folder).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/experiment.py, also when loaded by path
from experiment import autocast, make_log, run_main, sync, timed_train_steps, write_json  # noqa: E402

log = make_log("mdm-small")

ROOT = Path(__file__).resolve().parents[1]
BLUEPRINTS = ROOT / "blueprints" / "experiments"
MODELS = ("ar", "mdm")
LABELS = {"ar": "AR (causal, next-token)", "mdm": "MDM (bidirectional, masked diffusion)"}
COLORS = {"ar": "C0", "mdm": "C3"}

# `overrides` shrink the blueprints (toy only); steps come from the budget at both scales. windows x draws is the
# ELBO's Monte-Carlo size; prompts (prompt_len tokens each) feed the samples and the probe.
SCALES = {
    "full": {
        "overrides": [], "min_steps": 100, "max_steps": 20000, "eval_batch": 32,
        "windows": 128, "draws": 32, "prompts": 4, "prompt_len": 32, "new_tokens": 64, "block_length": 16,
        "probe_steps": 16,
    },
    "toy": {  # a CPU smoke run: the same pipeline on a model and data small enough for two cores
        "overrides": ["model.d_model=64", "model.mixers.A.heads=2", "model.mixers.A.kv_heads=2",
                      "model.mixers.A.head_dim=32", "model.mixers.L.heads=2", "model.mixers.L.head_dim=32",
                      "model.ffn.hidden=192", "model.vocab_size=1024", "model.max_seq_len=128", "data.seq_len=128",
                      "data.source.max_bytes=1500000", "train.batch_size=8", "train.eval_batches=2"],
        "min_steps": 10, "max_steps": 60, "eval_batch": 8,
        "windows": 8, "draws": 4, "prompts": 2, "prompt_len": 16, "new_tokens": 16, "block_length": 8,
        "probe_steps": 6,
    },
}


def load(name: str, overrides: list[str]):
    from hyloom.blueprint import load as load_yaml
    from hyloom.blueprint import validate

    return validate(load_yaml(str(BLUEPRINTS / f"mdm-{name}.yaml"), overrides))


def objective_of(bp, mask_id: int):
    """The blueprint's training objective, bound to `mask_id` without a tokenizer (for timing)."""
    from hyloom.plugins.mdm.config import MdmObjectiveConfig
    from hyloom.plugins.mdm.objective import MdmObjective
    from hyloom.plugins.train.lm import NextTokenObjective

    if bp.train.objective.type == "mdm":
        return MdmObjective(MdmObjectiveConfig(eps=bp.train.objective.eps, mask_id=mask_id))
    return NextTokenObjective()


def calibrate(bp, device, eval_batch: int, steps: int = 5) -> dict:
    """Seconds per optimizer step with the blueprint's own objective (random tokens, bf16 autocast on CUDA, after
    two warm-up steps that also compile the Triton kernels) and per evaluation forward of `eval_batch` windows
    (after compiling the inference kernels too, so that the evaluation's estimate need not include them)."""
    import torch

    from hyloom.model import build_model

    torch.manual_seed(0)
    model = build_model(bp, device=device)
    objective = objective_of(bp, mask_id=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(2, bp.model.vocab_size, (bp.train.batch_size, bp.data.seq_len + 1), device=device)
    times = timed_train_steps(model, opt, batch, 2 + steps, device, objective)
    model.eval()
    with torch.no_grad(), autocast(device):
        model(batch[:1, :16])  # compile the inference paths first
        if bp.model.causal:  # and the ar sampler's prefill and decode steps
            from hyloom.generate import run_sampler

            run_sampler(model, [batch[0, :8].tolist()], sampler="ar", max_new_tokens=2)
        sync(device)
        began = time.perf_counter()
        model(batch[:eval_batch])
        sync(device)
    forward = time.perf_counter() - began
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"step_s": sorted(times[2:])[len(times[2:]) // 2], "first_steps_s": round(sum(times[:2]), 2),
            "forward_s": forward}


def eval_estimate(cal: dict, scale: dict) -> float:
    """Seconds to evaluate one model: the likelihood forwards (the AR model needs one per batch of windows, the
    MDM K), the samplers (one forward a new token, prompts batched) and the probe (a forward a step plus the maps
    recomputed per layer: x4), all at the timed forward's cost (an upper bound for the short prompts), x1.5 for
    Python and the figures, plus a few seconds to load the checkpoint."""
    batches = math.ceil(scale["windows"] / scale["eval_batch"]) * scale["draws"]
    forwards = batches + 2 * scale["new_tokens"] + 4 * scale["prompts"] * scale["probe_steps"]
    return 1.5 * cal["forward_s"] * forwards + 5


def steps_that_fit(left: float, step_s: dict, eval_s: dict, budget: float) -> int:
    """Training steps, the same for both models, that fit in `left` seconds after the estimated evaluations, a
    margin of 5% of the budget and a few seconds a model. x1.1 on the timed steps: the trainer's own work (data,
    clipping, logging, held-out evaluations, the checkpoint)."""
    reserve = sum(eval_s.values()) + 0.05 * budget + 3 * len(step_s)
    return int((left - reserve) / (1.1 * sum(step_s.values())))


# ---- measurements ------------------------------------------------------------------------------------------------

def held_out_windows(ids, n: int, length: int):
    """`n` non-overlapping windows of `length` tokens from the start of the held-out split, [n, length] long."""
    import torch

    have = len(ids) // length
    if have < 1:
        raise ValueError(f"the held-out split has {len(ids)} tokens, fewer than one window of {length}")
    n = min(n, have)
    return torch.as_tensor(ids[:n * length].astype("int64")).view(n, length)


def mean_se(values) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    return mean, math.sqrt(var / n)


@contextlib.contextmanager
def _no_grad_eval(model, device):
    import torch

    model.eval()
    with torch.no_grad(), autocast(device):
        yield


def ar_nll(model, windows_NL, device, batch: int) -> dict:
    """Next-token NLL per token of tokens 1..L-1 of each window (nats): mean and standard error over windows."""
    import torch.nn.functional as F

    per_window = []
    with _no_grad_eval(model, device):
        for lo in range(0, len(windows_NL), batch):
            x = windows_NL[lo:lo + batch].to(device)
            logits = model(x[:, :-1]).float()
            ce = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
            per_window += ce.mean(1).tolist()
    mean, se = mean_se(per_window)
    return {"nll": mean, "se": se, "windows": len(per_window), "tokens_per_window": windows_NL.shape[1] - 1,
            "per_window": per_window}


def mdm_bound(model, windows_NL, device, batch: int, *, mask_id: int, eps: float, draws: int, seed: int = 0) -> dict:
    """The MDM's ELBO bound per token on tokens 1..L-1 given token 0 (never masked), stratified Monte-Carlo over
    t with `draws` strata per window (see the module doc): mean and standard error over windows, and the
    integrand's mean per stratum."""
    import torch
    import torch.nn.functional as F

    from hyloom.plugins.mdm.objective import mask_tokens

    gen = torch.Generator(device).manual_seed(seed)
    per_window, by_stratum = [], [0.0] * draws
    with _no_grad_eval(model, device):
        for lo in range(0, len(windows_NL), batch):
            x = windows_NL[lo:lo + batch].to(device)
            B, L = x.shape
            first = torch.ones(B, dtype=torch.long, device=device)  # the conditioning token, as the AR model's
            total_B = torch.zeros(B, dtype=torch.float64, device=device)
            for k in range(draws):
                t_B = (k + torch.rand(B, device=device, generator=gen)) / draws
                noisy, masked, p_B = mask_tokens(x, mask_id=mask_id, eps=eps, t_B=t_B, prompt_len_B=first,
                                                 generator=gen)
                ce = F.cross_entropy(model(noisy).float().transpose(1, 2), x, reduction="none")
                term_B = ((ce * masked) / p_B[:, None]).sum(1).double() / (L - 1)
                total_B += term_B
                by_stratum[k] += term_B.sum().item()
            per_window += (total_B / draws).tolist()
    mean, se = mean_se(per_window)
    n = len(per_window)
    return {"bound": mean, "se": se, "windows": n, "draws": draws, "tokens_per_window": windows_NL.shape[1] - 1,
            "eps": eps, "per_window": per_window, "by_t": [{"t_lo": k / draws, "t_hi": (k + 1) / draws, "integrand": s / n}
                                 for k, s in enumerate(by_stratum)]}


def samples(model, name: str, prompts, tokenizer, scale: dict) -> list[dict]:
    """Greedy continuations of each prompt with the model's own sampler: ar, or mdm with low-confidence
    remasking in blocks of block_length (one token a step)."""
    from hyloom.generate import run_sampler

    if name == "ar":
        options = {"sampler": "ar", "max_new_tokens": scale["new_tokens"], "temperature": 0.0}
    else:
        options = {"sampler": "mdm", "max_new_tokens": scale["new_tokens"], "block_length": scale["block_length"],
                   "steps": scale["block_length"], "remasking": "low_confidence", "temperature": 0.0}
    got = run_sampler(model.eval(), prompts, tokenizer=tokenizer, seed=0, **options)
    return [{"prompt": tokenizer.decode(p), "continuation": tokenizer.decode(ids), "nfe": got.nfe,
             "tokens_per_s": round(got.tokens_per_s, 1), "options": options} for p, ids in zip(prompts, got.tokens)]


def _jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b)


def probe_measures(reports: list[dict]) -> dict:
    """The anchor measures of the module doc, per layer and per layer kind (attention / lightning), over the
    probe reports of several prompts. Jaccard pairs where both sets are empty are skipped (not counted as
    agreement); `anchored` is the share of (step, layer) cells with any anchor."""
    kinds = {layer: ("lightning" if how.startswith("lightning") else "attention")
             for layer, how in reports[0]["layers"].items() if "no attention map" not in how}
    per_layer = {layer: {"over_steps": [], "pos0_share": [], "pos0_anchor": [], "anchored": [], "positions": set()}
                 for layer in kinds}
    across = {"attention": [], "lightning": []}
    for report in reports:
        for s, step in enumerate(report["steps"]):
            for layer, v in step["layers"].items():
                m = per_layer[layer]
                incoming = v["incoming"]
                m["pos0_share"].append(incoming[0] / max(sum(incoming), 1e-30))
                m["pos0_anchor"].append(float(0 in v["anchors"]))
                m["anchored"].append(float(bool(v["anchors"])))
                m["positions"].update(v["anchors"])
                before = report["steps"][s - 1]["layers"][layer]["anchors"] if s else None
                if before is not None and (before or v["anchors"]):
                    m["over_steps"].append(_jaccard(before, v["anchors"]))
            for kind in across:
                same = [step["layers"][layer]["anchors"] for layer in kinds if kinds[layer] == kind]
                across[kind] += [_jaccard(a, b) for i, a in enumerate(same) for b in same[i + 1:] if a or b]

    def avg(values):
        return sum(values) / len(values) if values else None

    layers = {layer: {"kind": kinds[layer], "jaccard_over_steps": avg(m["over_steps"]),
                      "pos0_share": avg(m["pos0_share"]), "pos0_anchor": avg(m["pos0_anchor"]),
                      "anchored": avg(m["anchored"]), "distinct_anchor_positions": len(m["positions"])}
              for layer, m in per_layer.items()}
    by_kind = {}
    for kind in ("attention", "lightning"):
        mine = [per_layer[layer] for layer in kinds if kinds[layer] == kind]
        if mine:
            by_kind[kind] = {"jaccard_over_steps": avg([x for m in mine for x in m["over_steps"]]),
                             "jaccard_across_layers": avg(across[kind]),
                             "pos0_share": avg([x for m in mine for x in m["pos0_share"]]),
                             "pos0_anchor": avg([x for m in mine for x in m["pos0_anchor"]]),
                             "anchored": avg([x for m in mine for x in m["anchored"]]),
                             "distinct_anchor_positions": len(set().union(*(m["positions"] for m in mine)))}
    return {"layers": layers, "by_kind": by_kind}


def probe(model, name: str, prompts, scale: dict, mask_id: int) -> list[dict]:
    from hyloom.plugins.mdm.probe import probe_attention

    steps = scale["probe_steps"]
    return [probe_attention(model, p, steps=steps, new_tokens=steps if name == "mdm" else None,
                            mask_id=mask_id if name == "mdm" else None) for p in prompts]


# ---- figures and the text summary ----------------------------------------------------------------------------------

def figures(results: dict, out: Path, reports: dict | None = None) -> None:
    """The figures from results.json (and, for probe.png, the first prompt's probe report of each model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = results["models"]
    trained = {k: v for k, v in models.items() if v.get("train")}
    if trained:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for name, v in trained.items():
            curve = v["train"]["curve"]
            ax.plot([r["step"] for r in curve], [r["loss"] for r in curve], linewidth=1, alpha=0.6,
                    color=COLORS[name], label=f"{LABELS[name]}: train")
            held = [r for r in curve if r.get("eval_loss") is not None]
            ax.plot([r["step"] for r in held], [r["eval_loss"] for r in held], marker="o", linestyle="--",
                    color=COLORS[name], label="held-out (MDM: fixed masks)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token; MDM: the bound's estimate)")
        ax.set_title("training curves (same data, seed and tokens)", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "training.png", dpi=110)
        plt.close(fig)

    ar, mdm = models.get("ar", {}).get("likelihood"), models.get("mdm", {}).get("likelihood")
    if ar or mdm:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
        names, values, errors = [], [], []
        if ar:
            names, values, errors = ["AR: NLL"], [ar["nll"]], [ar["se"]]
        if mdm:
            names, values, errors = names + ["MDM: ELBO bound"], values + [mdm["bound"]], errors + [mdm["se"]]
        left.bar(names, values, yerr=errors, capsize=6, color=[COLORS["ar"] if "AR" in n else COLORS["mdm"]
                                                                for n in names])
        for i, value in enumerate(values):
            left.text(i, value / 2, f"{value:.3f}", ha="center", color="white", fontsize=9)
        left.set_ylabel("held-out nats/token (± standard error)")
        left.set_title("AR likelihood vs the MDM's upper bound", fontsize=9)
        if mdm:
            mid = [(r["t_lo"] + r["t_hi"]) / 2 for r in mdm["by_t"]]
            right.plot(mid, [r["integrand"] for r in mdm["by_t"]], marker=".", color=COLORS["mdm"],
                       label="MDM: Σ masked CE / p per token")
            right.axhline(mdm["bound"], color=COLORS["mdm"], linestyle="--", linewidth=1, label="its mean (bound)")
            if ar:
                right.axhline(ar["nll"], color=COLORS["ar"], linestyle=":", label="AR NLL")
            right.set_xlabel("t (mask ratio ≈ t)")
            right.set_ylabel("nats/token")
            right.set_title("the bound's integrand by t (stratum means)", fontsize=9)
            right.legend(fontsize=7)
        else:
            right.axis("off")
        fig.tight_layout()
        fig.savefig(out / "likelihood.png", dpi=110)
        plt.close(fig)

    probed = {k: v for k, v in models.items() if v.get("probe")}
    if reports:  # a row per model and layer kind, a panel per layer: which positions are anchors at each step
        rows = []
        for name, report in reports.items():
            for kind in ("attention", "lightning"):
                layers = [layer for layer, how in report["layers"].items() if layer in report["steps"][0]["layers"]
                          and how.startswith("lightning") == (kind == "lightning")]
                if layers:
                    rows.append((name, kind, report, layers))
        cols = max(len(r[3]) for r in rows)
        fig, axes = plt.subplots(len(rows), cols, figsize=(2.6 * cols + 0.5, 2.1 * len(rows) + 0.6), squeeze=False)
        for r, (name, kind, report, layers) in enumerate(rows):
            T = len(report["steps"][-1]["ids"])
            for c in range(cols):
                ax = axes[r][c]
                if c >= len(layers):
                    ax.axis("off")
                    continue
                grid = np.zeros((len(report["steps"]), T))
                for s, step in enumerate(report["steps"]):
                    grid[s, step["layers"][layers[c]]["anchors"]] = 1
                ax.imshow(grid, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
                ax.axvline(report["prompt_length"] - 0.5, color="C2", linewidth=0.8)
                ax.set_title(f"{name.upper()} layer {layers[c]} ({kind})", fontsize=7)
                ax.tick_params(labelsize=6)
                if r == len(rows) - 1:
                    ax.set_xlabel("position", fontsize=7)
                if c == 0:
                    ax.set_ylabel("step", fontsize=7)
        fig.suptitle("anchor positions (black) per step, first prompt; green: end of prompt", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "probe.png", dpi=110)
        plt.close(fig)
    if probed:
        keys = [("jaccard_over_steps", "anchor Jaccard, step to step"), ("pos0_share", "attention share on pos 0"),
                ("pos0_anchor", "pos 0 is an anchor (share of steps)"),
                ("anchored", "any anchor at all (share of steps)")]
        fig, axes = plt.subplots(1, len(keys), figsize=(3.8 * len(keys), 3.4))
        width = 0.8 / len(probed)
        for ax, (key, title) in zip(axes, keys):
            for i, (name, v) in enumerate(probed.items()):
                layers = list(v["probe"]["layers"])
                ys = [v["probe"]["layers"][layer][key] for layer in layers]
                xs = np.arange(len(layers)) + (i - (len(probed) - 1) / 2) * width
                ax.bar(xs, [np.nan if y is None else y for y in ys], width, color=COLORS[name], label=name.upper())
                ax.set_xticks(range(len(layers)),
                              [f"{layer}{v['probe']['layers'][layer]['kind'][0].upper()}" for layer in layers])
            ax.set_ylim(0, 1.05)
            ax.set_xlabel("layer (A attention, L lightning)", fontsize=8)
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "probe_metrics.png", dpi=110)
        plt.close(fig)


def summary(results: dict) -> str:
    models = results["models"]
    lines = [f"scale {results['scale']}, device {results['device']}, seq_len {results['seq_len']}", ""]
    lines.append(f"{'model':40}{'params':>10}{'steps':>7}{'tokens':>12}{'train s':>9}{'train':>8}{'held-out':>9}")
    for name, v in models.items():
        t = v.get("train")
        if t:
            lines.append(f"  {LABELS[name]:38}{v['parameters']:>10,}{t['steps']:>7}{t['tokens']:>12,}"
                         f"{t['seconds']:>9.1f}{t['train_loss']:>8.3f}{t['eval_loss']:>9.3f}")
    ar, mdm = models.get("ar", {}).get("likelihood"), models.get("mdm", {}).get("likelihood")
    if ar or mdm:
        lines += ["", "held-out likelihood (nats/token, tokens 1..L of each window given token 0; ± standard error)"]
        if ar:
            lines.append(f"  AR NLL           {ar['nll']:.4f} ± {ar['se']:.4f}   ({ar['windows']} windows)")
        if mdm:
            lines.append(f"  MDM ELBO bound   {mdm['bound']:.4f} ± {mdm['se']:.4f}   ({mdm['windows']} windows x "
                         f"{mdm['draws']} stratified t draws)")
        if results.get("gap"):
            lines.append(f"  bound - NLL      {results['gap']['bound_minus_nll']:.4f} ± {results['gap']['se']:.4f}   "
                         "(paired over windows)")
    if any(v.get("probe") for v in models.values()):
        lines += ["", "attention-floating probe (mean over prompts, steps and layers of a kind)",
                  f"  {'model / layers':22}{'J steps':>9}{'J layers':>9}{'pos0 share':>11}{'pos0 anchor':>12}"
                  f"{'anchored':>9}{'distinct':>9}"]
        for name, v in models.items():
            for kind, m in v.get("probe", {}).get("by_kind", {}).items():
                cells = [m["jaccard_over_steps"], m["jaccard_across_layers"], m["pos0_share"], m["pos0_anchor"],
                         m["anchored"]]
                text = "".join(f"{'-' if c is None else f'{c:.3f}':>{w}}" for c, w in zip(cells, (9, 9, 11, 12, 9)))
                lines.append(f"  {name.upper() + ' ' + kind:22}{text}{m['distinct_anchor_positions']:>9}")
    for name, v in models.items():
        for s in v.get("samples", [])[:2]:
            lines += ["", f"{name.upper()} sample (NFE {s['nfe']}): {s['prompt']!r} -> {s['continuation']!r}"]
    return "\n".join(lines) + "\n"


# ---- the run -----------------------------------------------------------------------------------------------------

def train_model(name: str, overrides: list[str], work: Path) -> tuple:
    from hyloom.train import RunDir, train

    bp = load(name, overrides + [f"train.out_dir={work / name}"])
    result = train(bp, bp.model_dump(mode="json"), progress=False, overwrite=True)
    curve = [{k: r[k] for k in ("step", "loss", "eval_loss", "tokens_per_s") if k in r}
             for r in RunDir(work / name).metrics()]
    return bp, {**result, "curve": curve}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for results.json, the figures and summary.txt")
    p.add_argument("--work", default=None, help="folder for the training runs (default: a temporary folder)")
    p.add_argument("--budget-seconds", type=float, default=480.0,
                   help="wall time for everything (data, calibration, training, evaluation); sets train.steps")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    p.add_argument("--scale", choices=sorted(SCALES), default="full", help="toy: a CPU smoke run")
    p.add_argument("--steps", type=int, default=None, help="train.steps for both models (default: from the budget)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a blueprint override for both models, after the scale's; may repeat")
    args = p.parse_args(argv)
    if args.budget_seconds <= 0:
        p.error("--budget-seconds must be positive")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")
    began = time.perf_counter()

    import torch

    from hyloom import __version__
    from hyloom.checkpoint import load_checkpoint
    from hyloom.data import prepare
    from hyloom.eval import heldout_reader
    from hyloom.train import pick_device

    scale = {**SCALES[args.scale], "overrides": SCALES[args.scale]["overrides"] + args.set}
    device = pick_device(args.device, "--device")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="mdm-small-")))
        log(f"scale {args.scale} on {device}, budget {args.budget_seconds:.0f} s, runs in {work}")
        bps = {m: load(m, scale["overrides"]) for m in MODELS}
        prepared = prepare(bps["ar"].data, progress=False)  # the same data section for both (tested)
        tokenizer = prepared.tokenizer
        if tokenizer.mask_id is None:
            raise SystemExit("mdm_small: the tokenizer has no <|mask|> token")
        seq_len = bps["ar"].data.seq_len
        log(f"data ready ({time.perf_counter() - began:.0f} s): {prepared.dir}, mask id {tokenizer.mask_id}")
        results = {
            "command": " ".join(["python3 bench/mdm_small.py", *(argv if argv is not None else sys.argv[1:])]),
            "scale": args.scale, "overrides": scale["overrides"], "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "versions": {"hyloom": __version__, "torch": torch.__version__, "python": platform.python_version()},
            "seq_len": seq_len, "mask_id": tokenizer.mask_id,
            "eval": {k: scale[k] for k in ("windows", "draws", "prompts", "prompt_len", "new_tokens", "block_length",
                                           "probe_steps", "eval_batch")},
            "data": {"dir": str(prepared.dir), "splits": prepared.manifest["splits"],
                     "unigram_loss": prepared.unigram_loss},
            "models": {},
        }

        cal = {m: calibrate(bps[m], device, scale["eval_batch"]) for m in MODELS}
        for m in MODELS:
            log(f"calibration {m}: {cal[m]['step_s'] * 1000:.0f} ms/step, first two steps {cal[m]['first_steps_s']} "
                f"s, forward of {scale['eval_batch']} windows {cal[m]['forward_s'] * 1000:.0f} ms")
        evals = {m: eval_estimate(cal[m], scale) for m in MODELS}
        left = args.budget_seconds - (time.perf_counter() - began)
        fit = steps_that_fit(left, {m: cal[m]["step_s"] for m in MODELS}, evals, args.budget_seconds)
        steps = args.steps or max(scale["min_steps"], min(scale["max_steps"], fit))
        results["plan"] = {"budget_seconds": args.budget_seconds,
                           "seconds_before_training": round(args.budget_seconds - left, 1), "calibration": cal,
                           "eval_estimate_s": evals, "steps_that_fit": fit, "steps": steps}
        log(f"plan: {steps} steps per model (fit {fit}); estimated training "
            f"{steps * sum(c['step_s'] for c in cal.values()):.0f} s, evaluation {sum(evals.values()):.0f} s, "
            f"{left:.0f} s left")
        if fit < steps:
            log(f"warning: {steps} steps do not fit the budget ({fit} would); the run will take longer")
        b0 = bps["ar"]
        schedule = [f"train.device={device}", f"train.steps={steps}",
                    f"train.warmup={min(b0.train.warmup, steps // 10)}", f"train.eval_every={max(1, steps // 10)}",
                    f"train.log_every={max(1, steps // 100)}"]

        # phase 1: training, both models before any evaluation (a timeout then still leaves both curves)
        checkpoints = {}
        for m in MODELS:
            bp, result = train_model(m, scale["overrides"] + schedule, work)
            checkpoints[m] = result["checkpoint"]
            results["models"][m] = {
                "blueprint": str((BLUEPRINTS / f"mdm-{m}.yaml").relative_to(ROOT)), "causal": bp.model.causal,
                "objective": bp.train.objective.type, "layout": "".join(bp.model.layout),
                "parameters": sum(q.numel() for q in _params(bp)),
                "train": {"steps": steps, "batch_size": bp.train.batch_size, "seq_len": seq_len,
                          "tokens": steps * bp.train.batch_size * seq_len, "seconds": result["seconds"],
                          "train_loss": result["train_loss"], "eval_loss": result["eval_loss"],
                          "curve": result["curve"]}}
            log(f"{m}: trained {steps} steps in {result['seconds']} s, loss {result['train_loss']:.3f}, "
                f"held-out {result['eval_loss']:.3f}")
            _write(results, out, began)

        # phase 2: the likelihood on the same held-out windows
        heldout = heldout_reader(prepared.dir)()
        # windows from the first three quarters of the held-out split at most: the rest gives the prompts
        windows = held_out_windows(heldout[:len(heldout) * 3 // 4], scale["windows"], seq_len + 1)
        models = {m: load_checkpoint(checkpoints[m], device=str(device))[0].eval() for m in MODELS}
        t = time.perf_counter()
        results["models"]["ar"]["likelihood"] = ar_nll(models["ar"], windows, device, scale["eval_batch"])
        eps = bps["mdm"].train.objective.eps
        results["models"]["mdm"]["likelihood"] = mdm_bound(models["mdm"], windows, device, scale["eval_batch"],
                                                           mask_id=tokenizer.mask_id, eps=eps, draws=scale["draws"])
        ar, mdm = results["models"]["ar"]["likelihood"], results["models"]["mdm"]["likelihood"]
        gap, gap_se = mean_se([b - a for a, b in zip(ar["per_window"], mdm["per_window"])])
        results["gap"] = {"bound_minus_nll": gap, "se": gap_se, "note": "per window, paired: the same windows"}
        log(f"likelihood ({time.perf_counter() - t:.1f} s): AR NLL {ar['nll']:.4f} ± {ar['se']:.4f}, MDM bound "
            f"{mdm['bound']:.4f} ± {mdm['se']:.4f} ({mdm['windows']} windows x {mdm['draws']} draws), gap {gap:.4f} "
            f"± {gap_se:.4f}")
        _write(results, out, began)

        # phase 3: samples and the probe on held-out prompts (after the likelihood windows, one per stretch)
        rest = heldout[windows.numel():]
        stride = max(scale["prompt_len"], len(rest) // max(scale["prompts"], 1))
        prompts = [rest[i * stride:i * stride + scale["prompt_len"]].astype("int64").tolist()
                   for i in range(scale["prompts"])]
        prompts = [q for q in prompts if len(q) == scale["prompt_len"]]
        if not prompts:
            raise SystemExit("mdm_small: the held-out split is too short for a probe prompt")
        reports = {}
        for m in MODELS:
            t = time.perf_counter()
            results["models"][m]["samples"] = samples(models[m], m, prompts, tokenizer, scale)
            runs = probe(models[m], m, prompts, scale, tokenizer.mask_id)
            results["models"][m]["probe"] = probe_measures(runs)
            reports[m] = runs[0]
            from hyloom.plugins.mdm.probe import write_report

            write_report(runs[0], out / f"probe-{m}")
            log(f"{m}: samples and probe in {time.perf_counter() - t:.1f} s: " + "; ".join(
                f"{kind}: J steps {_f(v['jaccard_over_steps'])}, pos0 share {_f(v['pos0_share'])}"
                for kind, v in results["models"][m]["probe"]["by_kind"].items()))
            _write(results, out, began, reports)
    print(summary(results), end="")
    log(f"done in {time.perf_counter() - began:.0f} s (budget {args.budget_seconds:.0f} s); wrote {out}")
    return 0


def _f(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _write(results: dict, out: Path, began: float, reports: dict | None = None) -> None:
    results["seconds"] = round(time.perf_counter() - began, 1)
    write_json(out / "results.json", results)
    figures(results, out, reports)
    (out / "summary.txt").write_text(summary(results))


def _params(bp):
    """The model's parameters, built on the meta device (no memory): the count without a checkpoint to load."""
    from hyloom.model import build_model

    return build_model(bp, device="meta").parameters()


if __name__ == "__main__":
    run_main(main, "mdm_small")
