"""The attention-floating probe (SPEC §7): per step and per layer, the head-averaged attention matrix, its anchors
and their share of the attention.

A step is one forward pass over the whole sequence: for a causal model, greedy decoding (step s sees the prompt
and the s tokens generated so far); for a bidirectional one, a denoising step of the mdm sampler. Each layer's
input is captured by a forward hook and its attention recomputed from the layer's own projections, so the fast
path is untouched:

- softmax attention: softmax(q kᵀ / √D) with the layer's position encoding, GQA, window and causal mask;
- InfLLM-V2: the dense causal softmax it approximates (its block selection is not reconstructed; below
  `dense_len` tokens the layer is dense and the map is exact);
- Lightning: the implicit attention a_ij = scale · (q_i·k_j) · λ^(i−j) (causal), λ^|i−j| (bidirectional
  `symmetric`) or no decay (bidirectional `none`); the map is |a_ij| normalised so each query row sums to 1.

Anchors of a layer at a step: positions whose incoming attention (the column mean of the head-averaged map over
query rows) exceeds mean + 3·std over positions (population std); their share is their incoming attention over
the total."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hyloom.plugins.infllm_v2.mixer import InfLLMv2
from hyloom.plugins.lightning.mixer import Lightning
from hyloom.plugins.mdm.config import MdmSamplerConfig
from hyloom.plugins.mdm.sampler import denoise
from hyloom.plugins.transformer.attention import Attention, GroupedQKV


def softmax_weights(mixer: GroupedQKV, x_BTD, ctx):
    """(probabilities [B, H, T, T], values [B, H, T, D]) of a softmax layer (GQA keys repeated per head):
    probabilities @ values is the layer's output before its gate and o_proj."""
    q, k, v = (t.transpose(1, 2).float() for t in mixer.project(x_BTD, ctx))
    rep = mixer.heads // mixer.kv_heads
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    T = x_BTD.shape[1]
    scores = q @ k.transpose(-1, -2) * mixer.head_dim ** -0.5
    if isinstance(mixer, Attention):
        allowed = mixer._mask(ctx, T, T, x_BTD.device)
    else:
        allowed = None
    if allowed is None and (ctx.causal or not isinstance(mixer, Attention)):
        allowed = torch.ones(T, T, dtype=torch.bool, device=x_BTD.device).tril()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1), v


def lightning_weights(mixer: Lightning, x_BTD, ctx):
    """(signed implicit attention [B, H, T, T], values [B, H, T, D]) of a Lightning layer: weights @ values is
    its recurrence's output before the output norm and gate."""
    B, T, _ = x_BTD.shape
    H, D = mixer.heads, mixer.head_dim
    q = mixer.q_proj(x_BTD).view(B, T, H, D)
    k = mixer.k_proj(x_BTD).view(B, T, H, D)
    v = mixer.v_proj(x_BTD).view(B, T, H, D)
    if mixer.q_norm is not None:
        q, k = mixer.q_norm(q), mixer.k_norm(k)
    q, k = ctx.position.apply(q, k, ctx.pos_BT)
    q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))
    g = mixer.g_H.to(x_BTD.device)  # log λ per head, <= 0
    i = torch.arange(T, device=x_BTD.device)
    diff = i[:, None] - i[None, :]
    if ctx.causal:
        decay = torch.where(diff >= 0, g[:, None, None] * diff, float("-inf")).exp()
    elif mixer.bidirectional_decay == "symmetric":
        decay = (g[:, None, None] * diff.abs()).exp()
    else:  # bidirectional without decay: the forward pass zeroes g
        decay = torch.ones(H, T, T, device=x_BTD.device)
    return D ** -0.5 * (q @ k.transpose(-1, -2)) * decay, v


def layer_map(mixer, x_BTD, ctx) -> tuple[torch.Tensor, str] | None:
    """The head-averaged attention map [B, T, T] (rows sum to 1) and how it was obtained; None for a mixer the
    probe cannot read."""
    if isinstance(mixer, Lightning):
        a = lightning_weights(mixer, x_BTD, ctx)[0].abs()
        a = a / a.sum(-1, keepdim=True).clamp_min(1e-30)
        return a.mean(1), "lightning: |implicit decayed attention|, rows normalised"
    if isinstance(mixer, InfLLMv2):
        exact = x_BTD.shape[1] < mixer.sparse.dense_len
        return softmax_weights(mixer, x_BTD, ctx)[0].mean(1), "infllm_v2: dense softmax" + (
            " (exact: below dense_len)" if exact else " it approximates (block selection not reconstructed)")
    if isinstance(mixer, Attention):
        return softmax_weights(mixer, x_BTD, ctx)[0].mean(1), "softmax attention"
    return None


def anchors(map_TT: torch.Tensor) -> tuple[list[int], float, list[float]]:
    """(anchor positions, their share of the incoming attention, incoming attention per position)."""
    incoming = map_TT.double().mean(0)
    cut = incoming.mean() + 3 * incoming.std(unbiased=False)
    found = (incoming > cut).nonzero().flatten().tolist()
    share = float(incoming[found].sum() / incoming.sum()) if found else 0.0
    return found, share, incoming.tolist()


class _Recorder:
    """The model, recording every layer's attention map each time it is called (one call = one step)."""

    def __init__(self, model):
        self.model, self.steps, self.kinds, self._seen = model, [], {}, {}
        self.hooks = [block.mixer.register_forward_hook(self._hook(i)) for i, block in enumerate(model.layers)]

    def _hook(self, layer):
        def hook(mixer, args, output):
            self._seen[layer] = args[:2]
        return hook

    def __call__(self, ids_BT):
        self._seen = {}
        logits = self.model(ids_BT)
        step = {}
        for layer, (x, ctx) in sorted(self._seen.items()):
            got = layer_map(self.model.layers[layer].mixer, x, ctx)
            if got is not None:
                step[layer], self.kinds[layer] = got[0][0], got[1]
            else:
                self.kinds[layer] = f"{type(self.model.layers[layer].mixer).__name__}: no attention map"
        self.steps.append((ids_BT[0].tolist(), step))
        return logits

    def close(self):
        for h in self.hooks:
            h.remove()


@torch.no_grad()
def probe_attention(model, prompt: list[int], *, steps: int = 8, new_tokens: int | None = None,
                    mask_id: int | None = None) -> dict:
    """Run the probe on one prompt (token ids). Causal model: `steps` greedy decoding steps (one token each).
    Bidirectional model: the mdm sampler (low-confidence remasking, one block of `new_tokens` masks, default
    `steps`) over `steps` denoising steps; needs `mask_id`. Returns the report written to probe.json."""
    if not prompt:
        raise ValueError("the prompt has no tokens")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if new_tokens is not None and new_tokens < steps:
        raise ValueError(f"new_tokens ({new_tokens}) is fewer than steps ({steps}): a step would commit nothing")
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    rec = _Recorder(model)
    try:
        if model.spec.causal:
            mode = "ar"
            for _ in range(steps):
                ids = torch.cat([ids, rec(ids)[:, -1:].argmax(-1)], 1)
        else:
            mode = "mdm"
            if mask_id is None:
                raise ValueError("a bidirectional model needs the mask id")
            cfg = MdmSamplerConfig(max_new_tokens=new_tokens or steps, steps=steps)
            ids, _, _ = denoise(rec, ids, mask_id=mask_id, cfg=cfg)
    finally:
        rec.close()
    layers = sorted({layer for _, step in rec.steps for layer in step})
    report = {"mode": mode, "prompt_length": len(prompt), "final_ids": ids[0].tolist(), "mask_id": mask_id,
              "layers": {str(layer): rec.kinds[layer] for layer in sorted(rec.kinds)}, "steps": []}
    previous = {}
    for s, (seen, step) in enumerate(rec.steps):
        row = {"step": s, "ids": seen, "layers": {}}
        for layer in layers:
            found, share, incoming = anchors(step[layer])
            before = previous.get(layer)
            row["layers"][str(layer)] = {"anchors": found, "share": share, "incoming": incoming,
                                         "jaccard_prev": None if before is None else _jaccard(before, found)}
            previous[layer] = found
        report["steps"].append(row)
    return report


def _jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return 1.0 if not a | b else len(a & b) / len(a | b)


def write_report(report: dict, out: str | Path) -> list[Path]:
    """probe.json, anchors.png (layer × step: the mean anchor position, blank where none), anchors-layerN.png
    (per layer, step × position: which positions are anchors) and share.png (anchors' share per step, one line
    per layer)."""
    import numpy as np

    from hyloom.plot import heatmap, line_plot

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(report, indent=1))
    layers = list(report["steps"][0]["layers"]) if report["steps"] else []
    written = [out / "probe.json"]
    if not layers:
        return written
    T = len(report["steps"][-1]["ids"])
    for layer in layers:  # anchor positions (columns) at each step (rows): 1 anchor, 0 not
        grid = np.zeros((len(report["steps"]), T))
        for s, step in enumerate(report["steps"]):
            grid[s, step["layers"][layer]["anchors"]] = 1
        path = out / f"anchors-layer{layer}.png"
        heatmap(path, grid, xlabel="position", ylabel="step", title=f"layer {layer}: anchor positions",
                colorbar="anchor", vmin=0, vmax=1)
        written.append(path)
    # where each layer's anchors sit at each step: their mean position (blank: no anchor)
    where = np.array([[np.mean(step["layers"][layer]["anchors"]) if step["layers"][layer]["anchors"] else np.nan
                       for step in report["steps"]] for layer in layers])
    heatmap(out / "anchors.png", where, xlabel="step", ylabel="layer", title="mean anchor position (blank: none)",
            colorbar="position", yticklabels=layers, vmin=0, vmax=T - 1)
    line_plot(out / "share.png", {f"layer {layer}": [(s, step["layers"][layer]["share"])
                                                   for s, step in enumerate(report["steps"])] for layer in layers},
              xlabel="step", ylabel="anchors' share of attention", title=f"attention share ({report['mode']})")
    return written + [out / "anchors.png", out / "share.png"]


def cmd_probe(args) -> int:
    from hyloom.blueprint import BlueprintError, Problem
    from hyloom.errors import SetupError
    from hyloom.train import open_checkpoint

    if args.what != "attention":
        raise SetupError(f"probe {args.what}: unknown probe (known: attention)")
    if not args.prompt:
        raise SetupError("--prompt: empty; the probe needs at least one token of prompt")
    if args.steps < 1:
        raise SetupError(f"--steps: {args.steps}; must be at least 1")
    _, model, bp, tokenizer, _ = open_checkpoint(args.checkpoint, args.device)
    mask_id = None
    if not bp.model.causal:
        mask_id = getattr(getattr(bp.train, "objective", None), "mask_id", None)
        mask_id = mask_id if mask_id is not None else tokenizer.mask_id
        if mask_id is None:
            raise BlueprintError([Problem("train.objective.mask_id", "a bidirectional checkpoint without a mask id "
                                                                     "(and its tokenizer has no <|mask|>)")])
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise SetupError("--prompt: encodes to no tokens")
    try:
        report = probe_attention(model, ids, steps=args.steps, new_tokens=args.new_tokens, mask_id=mask_id)
    except ValueError as exc:
        raise SetupError(str(exc).replace("new_tokens", "--new-tokens").replace("steps (", "--steps (")) from None
    for path in write_report(report, args.out):
        print(path)
    for step in report["steps"]:
        print(f"step {step['step']}: " + "  ".join(f"L{layer} {v['anchors']} {v['share']:.2f}"
                                                  for layer, v in step["layers"].items()))
    return 0
