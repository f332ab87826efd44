"""The layer-selector contract (torch-free): what a selector is given (SelectionContext), what it returns
(Selection), and the pure rules the built-in selectors share (pins, even spacing, HALO's score, choosing the
top layers). The selectors that measure a model are in `hyloom.plugins.convert.selectors`.

A registered `selector` builds an object with

    check(n_layers, budget, *, heldout=True)  -> None   # refuses bad input before any work (SelectionError)
    select(ctx: SelectionContext)             -> Selection
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hyloom.errors import SetupError


class SelectionError(SetupError, ValueError):
    """A selection that cannot run as asked (budget, pins, indices, missing teacher or eval data); raised before
    anything is measured. The CLI reports it without a traceback and exits with 2."""


@dataclass
class SelectionContext:
    """What a selector is given.

    n_layers: layers of the model being converted.
    budget:   how many layers stay attention (pinned ones included), in [0, n_layers].
    teacher:  the teacher `HybridLM`, in eval mode on its device (measuring selectors only).
    twin:     `twin(i)` → the linear twin of layer i (a `hyloom.mixer.Mixer`, on the teacher's device): the
              aligned student's `layers[i].mixer` (measuring selectors only).
    eval:     a `hyloom.eval.EvalContext` giving the tokenizer, the held-out ids, the device, train_len,
              batch_size and seed that eval tasks run with; its `model` is ignored (the teacher is measured,
              with one layer swapped at a time) (measuring selectors only).
    """

    n_layers: int
    budget: int
    teacher: Any = None
    twin: Callable[[int], Any] | None = None
    eval: Any = None


@dataclass
class Selection:
    """A selector's answer: the layers kept as attention (sorted) and a row per layer (`layer`, `kept`,
    `pinned`, `score` and whatever the selector measured, e.g. HALO's `R` and `C`); `score` is None for
    selectors that measure nothing. `info` holds the rest worth keeping (the teacher's own metrics...)."""

    selector: str
    n_layers: int
    budget: int
    kept: list[int]
    layers: list[dict]
    pinned: list[int] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def layout(self, attention: str, linear: str) -> list[str]:
        """The blueprint layout: `attention` at the kept layers, `linear` at the others."""
        kept = set(self.kept)
        return [attention if i in kept else linear for i in range(self.n_layers)]

    def to_json(self) -> dict:
        return {"selector": self.selector, "n_layers": self.n_layers, "budget": self.budget, "kept": self.kept,
                "pinned": self.pinned, "config": self.config, **self.info, "layers": self.layers}

    def write(self, out_dir: str | Path) -> None:
        """`selection.json` (this selection) and `selection.png` (score per layer, kept ones marked)."""
        from hyloom.plot import bar_plot

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "selection.json").write_text(json.dumps(self.to_json(), indent=2) + "\n")
        scored = any(row["score"] is not None for row in self.layers)
        title = (f"{self.selector}: {len(self.kept)} of {self.n_layers} layers kept"
                 + (f" (pinned: {', '.join(map(str, self.pinned))})" if self.pinned else ""))
        if all("R" in row and "C" in row for row in self.layers):
            halo_figure(out / "selection.png", self, title)
            return
        heights = [row["score"] if scored else float(row["kept"]) for row in self.layers]
        bar_plot(out / "selection.png", heights, marked=self.kept, marked_label="kept as attention",
                 other_label="becomes linear", xlabel="layer", ylabel="score" if scored else "kept", title=title)


def halo_figure(path: Path, selection: Selection, title: str) -> None:
    """HALO's three panels: the score per layer (kept ones marked), and its numerator and denominator, the recall
    drop max_j R_j - R_i and the quality drop max_j C_j - C_i, each with +-2 standard errors of the paired drop
    (where the task gave per-case values): a drop whose bar crosses zero cannot be told from noise."""
    from hyloom.plot import _figure

    rows = selection.layers
    x = [row["layer"] for row in rows]
    fig = _figure((15.0, 4.2))
    axes = fig.subplots(1, 3)
    colors = ["C3" if row["kept"] else "0.65" for row in rows]
    axes[0].bar(x, [row["score"] or 0.0 for row in rows], color=colors)
    axes[0].set(xlabel="layer (red: kept as attention)", ylabel="score s_i", title=title)
    for ax, key, what in ((axes[1], "R", "recall drop max R - R_i"), (axes[2], "C", "quality drop max C - C_i")):
        best = max(row[key] for row in rows)
        errors = [row.get(f"d{key}_se") for row in rows]
        ax.bar(x, [best - row[key] for row in rows], color=colors,
               yerr=None if None in errors else [2 * e for e in errors], capsize=3)
        ax.set(xlabel="layer swapped for its twin", ylabel=what,
               title=what + (" (+-2 s.e., paired)" if None not in errors else ""))
    eps = selection.config.get("eps")
    if eps:
        axes[2].axhline(eps, color="0.3", linestyle=":", linewidth=1, label=f"eps = {eps:g}")
        axes[2].legend()
    for ax in axes:
        ax.set_xticks(x)
        ax.grid(alpha=0.3, axis="y")
    fig.savefig(path)


# ---- the shared rules ---------------------------------------------------------------------------------------

def resolve_pins(pin: list[int], n_layers: int) -> list[int]:
    """Pinned layers as sorted indices in [0, n_layers) (negative ones count from the end)."""
    bad = [p for p in pin if not -n_layers <= p < n_layers]
    if bad:
        raise SelectionError(f"selector.pin: layer {bad[0]} does not exist in a model of {n_layers} layers "
                             f"(indices run 0..{n_layers - 1}, or -{n_layers}..-1 from the end)")
    resolved = [p % n_layers for p in pin]
    if len(set(resolved)) != len(resolved):
        raise SelectionError(f"selector.pin {pin} names one layer twice (in a model of {n_layers} layers)")
    return sorted(resolved)


def check_budget(budget: int, n_layers: int, pinned: list[int]) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int) or not 0 <= budget <= n_layers:
        raise SelectionError(f"budget {budget!r} is outside [0, {n_layers}]: it counts the layers kept as "
                             f"attention in a model of {n_layers} layers")
    if budget < len(pinned):
        raise SelectionError(f"budget {budget} is smaller than the {len(pinned)} pinned layers {pinned}: pinned "
                             f"layers count toward the budget")


def even_layers(n_layers: int, budget: int, pinned: list[int]) -> list[int]:
    """The pinned layers plus `budget - len(pinned)` of the others, evenly spaced: with m free layers and r to
    place, the j-th (j = 0..r-1) is free layer floor((j + 1) * m / r) - 1 — every (m/r)-th, ending at the last
    free layer, as HypeNet's every-n-th layouts end on attention."""
    free = [i for i in range(n_layers) if i not in set(pinned)]
    r = budget - len(pinned)
    return sorted([*pinned, *(free[(j + 1) * len(free) // r - 1] for j in range(r))])


def halo_scores(recall: list[float], quality: list[float], eps: float, cap: float, *, noise_sigmas: float = 0.0,
                recall_drop_se: list[float] | None = None, quality_drop_se: list[float] | None = None) -> list[float]:
    """SPEC §5: s_i = (max_j R_j - R_i) / (max_j C_j - C_i + eps), capped at `cap`. Both differences are >= 0,
    so scores lie in [0, cap]: a layer whose swap loses much recall for little quality scores high.

    With `noise_sigmas` k > 0 (an option, not SPEC's formula), each drop is read against its standard error (the
    `*_drop_se` lists, from `drop_errors`): a recall drop of at most k standard errors counts as none, and a quality
    drop counts as at least k standard errors, so neither noise in R nor a quality drop too small to be told from
    zero can make a score."""
    for what, values in (("recall", recall), ("quality", quality)):
        bad = [i for i, v in enumerate(values) if v is None or not math.isfinite(v)]
        if bad:
            raise SelectionError(f"halo: {what} of layer {bad[0]} is {values[bad[0]]!r}, not a finite number")
    best_r, best_c = max(recall), max(quality)
    drop_r, drop_c = [best_r - r for r in recall], [best_c - c for c in quality]
    if noise_sigmas > 0:
        for what, errors in (("recall", recall_drop_se), ("quality", quality_drop_se)):
            if errors is None or any(e is None for e in errors):
                raise SelectionError(f"halo: noise_sigmas {noise_sigmas} needs the standard error of every {what} "
                                     f"drop, and its task gives no per-case values (or only one case)")
        drop_r = [d if d > noise_sigmas * e else 0.0 for d, e in zip(drop_r, recall_drop_se)]
        drop_c = [max(d, noise_sigmas * e) for d, e in zip(drop_c, quality_drop_se)]
    return [min(cap, r / (c + eps)) for r, c in zip(drop_r, drop_c)]


def standard_error(values: list[float] | None) -> float | None:
    """The standard error of the mean of per-case values (sample standard deviation / sqrt(n)); None for fewer
    than two cases."""
    if values is None or len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def drop_errors(cases: list[list[float]] | None) -> list[float | None]:
    """For each layer i, the standard error of max_j X_j - X_i, where X_j is the mean of layer j's per-case values:
    the cases are the same for every layer, so the difference is taken case by case (paired), which removes what
    the layers share (how hard each case is). 0 for the best layer itself; None without per-case values."""
    if cases is None or any(c is None for c in cases):
        return [None] * (len(cases) if cases is not None else 0)
    if len({len(c) for c in cases}) != 1:
        raise SelectionError("halo: the layers were measured on different numbers of cases; they cannot be paired")
    means = [sum(c) / len(c) if c else -math.inf for c in cases]
    best = cases[max(range(len(cases)), key=means.__getitem__)]
    return [standard_error([b - v for b, v in zip(best, c)]) for c in cases]


def top_layers(scores: list[float], budget: int, pinned: list[int]) -> list[int]:
    """The pinned layers plus the `budget - len(pinned)` highest-scored others, sorted. Equal scores go to the
    lower index, so the same scores always give the same layout."""
    bad = [i for i, s in enumerate(scores) if s is None or not math.isfinite(s)]
    if bad:
        raise SelectionError(f"score of layer {bad[0]} is {scores[bad[0]]!r}, not a finite number")
    pinned_set = set(pinned)
    ranked = sorted((i for i in range(len(scores)) if i not in pinned_set), key=lambda i: (-scores[i], i))
    return sorted([*pinned, *ranked[:budget - len(pinned)]])


def table(n_layers: int, kept: list[int], pinned: list[int], scores: list[float] | None = None,
          **measured: list[float]) -> list[dict]:
    """A row per layer: layer, kept, pinned, score, then each measured column (e.g. R=..., C=...)."""
    return [{"layer": i, "kept": i in kept, "pinned": i in pinned,
             "score": None if scores is None else scores[i], **{k: v[i] for k, v in measured.items()}}
            for i in range(n_layers)]
