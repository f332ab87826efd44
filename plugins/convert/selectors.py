"""The built-in layer selectors (`even`, `fixed`, `halo`, `kl`) and the swap harness the measuring ones use.
Contract and shared rules: `hyloom.plugins.convert.selection`."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from hyloom.plugins.convert.selection import (Selection, SelectionContext, SelectionError, check_budget,
                                              drop_errors, even_layers, halo_scores, resolve_pins, standard_error,
                                              table, top_layers)


@contextlib.contextmanager
def swapped(model, layer: int, twin):
    """`model` with only `layers[layer]`'s mixer replaced by `twin`, and that layer's position encoding the one the
    model's position policy gives the twin's family (HyPE: RoPE for a linear twin); everything is put back on
    exit, also when the body raises. The twin runs in eval mode inside and gets its own mode back."""
    from hyloom.registry import registry

    block = model.layers[layer]
    spec = model.spec.position
    policy = registry().get("position", spec.type).build(spec)
    saved = block.mixer, block.position, block.capabilities
    twin_was_training = twin.training
    block.mixer, block.capabilities = twin.eval(), twin.capabilities
    try:
        block.position = policy.for_layer(twin.capabilities.family, layer)
        yield model
    finally:
        block.mixer, block.position, block.capabilities = saved
        twin.train(twin_was_training)


class _Selector:
    """What every selector shares: the pins, the budget checks and the Selection it returns."""

    measures = False  # needs a teacher, its twins and held-out data

    def __init__(self, cfg):
        self.cfg = cfg

    def check(self, n_layers: int, budget: int, *, heldout: bool = True) -> None:
        """Refuse, before any work, what this selector cannot do: a budget outside [0, n_layers] or below the
        pins, pins outside the model, and (for measuring selectors) a run without held-out data."""
        check_budget(budget, n_layers, resolve_pins(self.cfg.pin, n_layers))
        if self.measures and not heldout:
            raise SelectionError(f"selector {self.cfg.type!r} measures the teacher on held-out data, and none is "
                                 f"given: add a data: section (its held-out split), or use selector even or fixed")

    def select(self, ctx: SelectionContext) -> Selection:
        self.check(ctx.n_layers, ctx.budget, heldout=ctx.eval is not None)
        pinned = resolve_pins(self.cfg.pin, ctx.n_layers)
        kept, rows, info = self.choose(ctx, pinned)
        return Selection(self.cfg.type, ctx.n_layers, ctx.budget, kept, rows, pinned,
                         self.cfg.model_dump(mode="json"), info)


class Even(_Selector):
    def choose(self, ctx, pinned):
        kept = even_layers(ctx.n_layers, ctx.budget, pinned)
        return kept, table(ctx.n_layers, kept, pinned), {}


class Fixed(_Selector):
    def layers(self, n_layers: int) -> list[int]:
        bad = [i for i in self.cfg.layers if not -n_layers <= i < n_layers]
        if bad:
            raise SelectionError(f"selector.layers: layer {bad[0]} does not exist in a model of {n_layers} layers "
                                 f"(indices run 0..{n_layers - 1}, or -{n_layers}..-1 from the end)")
        resolved = [i % n_layers for i in self.cfg.layers]
        if len(set(resolved)) != len(resolved):
            raise SelectionError(f"selector.layers {self.cfg.layers} names one layer twice")
        return resolved

    def check(self, n_layers, budget, *, heldout=True):
        super().check(n_layers, budget, heldout=heldout)
        kept = set(self.layers(n_layers)) | set(resolve_pins(self.cfg.pin, n_layers))
        if len(kept) != budget:
            raise SelectionError(f"selector.layers {self.cfg.layers} with pin {self.cfg.pin} keep {len(kept)} "
                                 f"layers, but the budget is {budget}")

    def choose(self, ctx, pinned):
        kept = sorted(set(self.layers(ctx.n_layers)) | set(pinned))
        return kept, table(ctx.n_layers, kept, pinned), {}


class _Measuring(_Selector):
    measures = True

    def select(self, ctx: SelectionContext) -> Selection:
        if ctx.teacher is None or ctx.twin is None:
            raise SelectionError(f"selector {self.cfg.type!r} measures the teacher with one layer at a time swapped "
                                 f"for its linear twin: it needs the teacher and the twins (an align stage first)")
        if len(ctx.teacher.layers) != ctx.n_layers:
            raise SelectionError(f"the teacher has {len(ctx.teacher.layers)} layers, the selection is asked for "
                                 f"{ctx.n_layers}")
        return super().select(ctx)

    def choose(self, ctx, pinned):
        free = ctx.n_layers - len(pinned)
        if ctx.budget - len(pinned) in (0, free):  # nothing to choose: every free layer goes, or none does
            kept = list(range(ctx.n_layers)) if ctx.budget == ctx.n_layers else pinned
            return kept, table(ctx.n_layers, kept, pinned), {"measured": False}
        twins = [self._twin(ctx, i) for i in range(ctx.n_layers)]  # all checked before the first measurement
        scores, measured, info = self.measure(ctx, twins)
        kept = top_layers(scores, ctx.budget, pinned)
        return kept, table(ctx.n_layers, kept, pinned, scores, **measured), {"measured": True, **info}

    @staticmethod
    def _twin(ctx, i):
        from hyloom.mixer import Mixer

        twin = ctx.twin(i)
        if not isinstance(twin, Mixer):
            raise SelectionError(f"twin({i}) returned {type(twin).__name__}, not a hyloom.mixer.Mixer")
        weight = next(ctx.teacher.parameters())
        bad = next((p for p in twin.parameters() if p.device != weight.device), None)
        if bad is not None:
            raise SelectionError(f"the twin of layer {i} is on {bad.device}, the teacher on {weight.device}: put "
                                 f"both on one device")
        return twin


class Halo(_Measuring):
    """SPEC §5: R_i and C_i are eval tasks' metrics on the teacher with only layer i swapped for its twin. Where a
    task gives per-case values (its `metric_cases`, or held-out sequences for loss_by_position), each R_i and C_i
    gets its standard error, and each drop max_j X_j - X_i the standard error of the paired difference."""

    def __init__(self, cfg):
        super().__init__(cfg)
        from hyloom.blueprint.errors import dotted
        from hyloom.eval import validate_tasks
        from hyloom.registry import registry

        # task configs are checked when the selector is built, before any teacher is loaded
        self.tasks = {role: validate_tasks([getattr(cfg, role)], lambda i, loc, role=role: dotted(("selector", role,
                                                                                                  *loc)))[0]
                      for role in ("recall", "quality")}
        self.task_objects = {role: registry().get("eval_task", t.type).build(t) for role, t in self.tasks.items()}
        lacking = [f"selector.{role}: {t.type}" for role, t in self.tasks.items() if not self._gives_cases(role)]
        if cfg.noise_sigmas > 0 and lacking:
            raise SelectionError(f"selector.noise_sigmas {cfg.noise_sigmas} reads each drop against its standard "
                                 f"error, which needs per-case values; these tasks give none: {', '.join(lacking)} "
                                 f"(use passkey, niah, mqar or loss_by_position, or noise_sigmas 0)")

    def _gives_cases(self, role: str) -> bool:
        if self.tasks[role].type == "loss_by_position":  # per sequence only for loss/nll@N (sequence_losses)
            metric = getattr(self.cfg, f"{role}_metric")
            return metric is None or (metric.startswith("loss/nll@") and metric[len("loss/nll@"):].isdigit())
        return hasattr(self.task_objects[role], "metric_cases")

    def _metric(self, role: str, report: dict) -> tuple[str, float, float]:
        """(metric name, its value, the sign that makes higher better: -1 for a loss as C_i)."""
        task = self.tasks[role].type
        metrics = report["tasks"][task]["metrics"]
        name = getattr(self.cfg, f"{role}_metric") or next(iter(metrics))
        if name not in metrics:
            raise SelectionError(f"selector.{role}_metric {name!r} is not a metric of task {task!r} (its metrics: "
                                 f"{', '.join(metrics)})")
        value = metrics[name]
        if value is None:
            raise SelectionError(f"task {task!r} gave no number for {name!r} (not finite)")
        sign = -1.0 if role == "quality" and name.startswith("loss") else 1.0  # C_i: higher is better
        return name, value, sign

    def _cases(self, role: str, report: dict, name: str, ectx) -> list[float] | None:
        """The metric's per-case values (their mean is the metric), or None where the task gives none."""
        task, cfg = self.task_objects[role], self.tasks[role]
        if hasattr(task, "metric_cases"):
            return task.metric_cases(report["tasks"][cfg.type]["rows"]).get(name)
        if cfg.type == "loss_by_position":
            return sequence_losses(ectx, cfg, name)
        return None

    def _measure_once(self, ectx) -> dict[str, tuple[float, list[float] | None]]:
        """Each role's (value, per-case values or None), both oriented so that higher is better."""
        from hyloom.eval import run_tasks

        out = {}
        for role, cfg in self.tasks.items():
            report = run_tasks([cfg], ectx)
            name, value, sign = self._metric(role, report)
            cases = self._cases(role, report, name, ectx)
            out[role] = (sign * value, None if cases is None else [sign * v for v in cases])
        return out

    def measure(self, ctx, twins):
        ectx = dataclasses.replace(ctx.eval, model=ctx.teacher)
        teacher = self._measure_once(ectx)
        runs = []
        for i, twin in enumerate(twins):
            with swapped(ctx.teacher, i, twin):
                runs.append(self._measure_once(ectx))
        measured, errors = {}, {}
        for role, key in (("recall", "R"), ("quality", "C")):
            cases = [run[role][1] for run in runs]
            measured[key] = [run[role][0] for run in runs]
            measured[f"{key}_se"] = [standard_error(c) for c in cases]
            measured[f"d{key}_se"] = errors[key] = drop_errors(cases)
        scores = halo_scores(measured["R"], measured["C"], self.cfg.eps, self.cfg.cap,
                             noise_sigmas=self.cfg.noise_sigmas, recall_drop_se=errors["R"],
                             quality_drop_se=errors["C"])
        info = {"teacher": {"R": teacher["recall"][0], "C": teacher["quality"][0],
                            "R_se": standard_error(teacher["recall"][1]),
                            "C_se": standard_error(teacher["quality"][1])},
                "cases": {key: None if runs[0][role][1] is None else len(runs[0][role][1])
                          for role, key in (("recall", "R"), ("quality", "C"))}}
        return scores, measured, info


def sequence_losses(ectx, cfg, metric: str) -> list[float] | None:
    """Per-sequence values of loss_by_position's `loss/nll@T`: that task reports position buckets, not sequences,
    so its sequences (held-out tokens [k*T, k*T + T + 1) for k < min(sequences, what the split holds)) are read
    again here, each one's mean next-token NLL; their mean is the task's metric. None for another metric."""
    from hyloom.plugins.eval.loss import LOGITS_BUDGET

    if not metric.startswith("loss/nll@") or not metric[len("loss/nll@"):].isdigit():
        return None
    length = int(metric[len("loss/nll@"):])
    heldout = np.asarray(ectx.heldout_ids())
    n = min(cfg.sequences, (len(heldout) - 1) // length)
    vocab = getattr(getattr(ectx.model, "spec", None), "vocab_size", 1)
    per_forward = max(1, min(ectx.batch_size, LOGITS_BUDGET // (length * vocab)))
    losses = []
    with torch.no_grad():
        for start in range(0, n, per_forward):
            rows = [heldout[k * length:k * length + length + 1] for k in range(start, min(n, start + per_forward))]
            ids_BT = torch.from_numpy(np.stack(rows).astype(np.int64)).to(ectx.device)
            logits_BTV = ectx.model(ids_BT[:, :-1]).float()
            nll_BT = F.cross_entropy(logits_BTV.transpose(1, 2), ids_BT[:, 1:], reduction="none")
            losses += nll_BT.mean(1).double().cpu().tolist()
    return losses


class Kl(_Measuring):
    """KL(teacher ‖ teacher with layer i swapped), mean per held-out token; the layers whose swap moves the output
    distribution most stay attention."""

    def measure(self, ctx, twins):
        ectx, cfg = ctx.eval, self.cfg
        heldout = np.asarray(ectx.heldout_ids())
        n = (len(heldout) - 1) // cfg.seq_len
        if n < cfg.sequences:
            raise SelectionError(f"kl: the held-out split has {len(heldout):,} tokens, fewer than {cfg.sequences} "
                                 f"sequences of {cfg.seq_len} + 1; lower selector.sequences or seq_len, or hold out "
                                 f"more (data.eval_fraction)")
        rows = np.stack([heldout[k * cfg.seq_len:(k + 1) * cfg.seq_len] for k in range(cfg.sequences)])
        model, kl_sum = ctx.teacher, torch.zeros(len(twins), dtype=torch.float64)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for start in range(0, cfg.sequences, ectx.batch_size):
                    batch = torch.from_numpy(rows[start:start + ectx.batch_size].astype(np.int64)).to(ectx.device)
                    teacher = F.log_softmax(model(batch).float(), -1).flatten(0, 1)
                    for i, twin in enumerate(twins):
                        with swapped(model, i, twin):
                            student = F.log_softmax(model(batch).float(), -1).flatten(0, 1)
                        kl_sum[i] += F.kl_div(student, teacher, log_target=True, reduction="sum").double().cpu()
        finally:
            model.train(was_training)
        kl = (kl_sum / (cfg.sequences * cfg.seq_len)).tolist()
        return kl, {"kl": kl}, {"tokens": cfg.sequences * cfg.seq_len}


SELECTORS = {"even": Even, "fixed": Fixed, "halo": Halo, "kl": Kl}
