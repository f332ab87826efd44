"""The evaluation contract: a registered `eval_task` builds an object whose `run(ctx)` measures a model.

`hyloom eval CHECKPOINT --task NAME` and a trainer's `train.eval_tasks` both go through these types, so a task
written once (built-in or third-party) runs in both places.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from hyloom.errors import SetupError


@dataclass
class EvalContext:
    """What a task runs on.

    model:        the model in eval mode, on `device` (a `HybridLM`: `model(ids)`, `model.generate(...)`).
    tokenizer:    `encode(text) -> list[int]`, `decode(ids) -> str`, `eos_id`, `vocab_size`.
    device:       a `torch.device`.
    heldout_ids:  returns the held-out split of the blueprint's data as one 1-D numpy array of token ids
                  (documents joined by EOS), prepared on first call; the source of filler text and of
                  held-out loss. Raises `DataError` when the blueprint has no data to hold out.
    train_len:    the context length the model was trained at (the blueprint's `data.seq_len`, the length of
                  its training sequences); a task that evaluates longer sequences reports it (length
                  extrapolation is the point), e.g. `extrapolated: length > train_len` in its rows.
    batch_size:   how many sequences a task may run at once.
    seed:         for anything random (keys, needles, depths): same seed, same cases.
    progress:     whether a task may show a progress bar.
    """

    model: Any
    tokenizer: Any
    device: Any
    heldout_ids: Callable[[], Any]
    train_len: int
    batch_size: int = 8
    seed: int = 0
    progress: bool = False


@dataclass
class EvalResult:
    """Named metrics (floats; what `metrics.jsonl` and the printed table show), optional per-case rows
    (JSON-able dicts, written to `eval.json`), and an optional `plot(path)` that draws the task's figure."""

    metrics: dict[str, float]
    rows: list[dict] = field(default_factory=list)
    plot: Callable[[Path], None] | None = None


class EvalTask(Protocol):
    def run(self, ctx: EvalContext) -> EvalResult: ...


# ---- running tasks: shared by `hyloom eval` and the trainer's `train.eval_tasks` ----------------------------

class EvalError(SetupError):
    """A task that cannot run on this model or data, or that returned something other than an EvalResult.
    The CLI reports it without a traceback and exits with 2."""


def validate_tasks(entries: list, where: Callable[[int, tuple], str] | None = None) -> list:
    """Task configs (mappings with a `type` naming a registered eval_task) validated by their pydantic models.
    A problem is reported at `where(index, loc)` (default `task.N.KEY`); an unknown type names close ones.
    The same task type twice is refused: metric names come from the type, so the second would overwrite."""
    from pydantic import TypeAdapter, ValidationError

    from hyloom.blueprint import BlueprintError, Problem
    from hyloom.blueprint.errors import dotted
    from hyloom.registry import registry

    where = where or (lambda i, loc: dotted(("task", i, *loc)))
    configs, problems = [], []
    for i, entry in enumerate(entries):
        reg = registry().get("eval_task", entry.get("type") if isinstance(entry, dict) else entry.type)
        if reg.config is None:
            raise EvalError(f"eval_task {reg.name!r} ({reg.dist}) registers no config; a task needs one")
        try:
            data = entry if isinstance(entry, dict) else entry.model_dump()
            configs.append(TypeAdapter(reg.config).validate_python(data))
        except ValidationError as exc:
            for err in exc.errors():
                message = err["msg"].removeprefix("Value error, ")
                if err["type"] == "extra_forbidden":
                    fields = [f for f in reg.config.model_fields if f != "type"]
                    message = f"unknown key for task {reg.name!r} (its keys: {', '.join(fields) or 'none'})"
                elif err["type"] != "missing":
                    message += f" (got {err['input']!r})"
                problems.append(Problem(where(i, err["loc"]), message))
    seen = [c.type for c in configs]
    problems += [Problem(where(i, ()), f"task {t!r} is listed twice; give each task once")
                 for i, t in enumerate(seen) if t in seen[:i]]
    if problems:
        raise BlueprintError(problems)
    return configs


def heldout_reader(prepared_dir: str | Path) -> Callable[[], Any]:
    """`ctx.heldout_ids` for a prepared data folder: its eval split as one array (memory-mapped shards joined
    once, on the first call)."""
    import functools
    import json

    @functools.cache
    def read():
        import numpy as np

        from hyloom.data.shards import open_shards

        manifest = json.loads((Path(prepared_dir) / "manifest.json").read_text())
        info = manifest["splits"]["eval"]
        return np.concatenate(open_shards(Path(prepared_dir), info["shards"], manifest["dtype"]))

    return read


def run_tasks(configs: list, ctx: EvalContext, *, out_dir: str | Path | None = None,
              header: dict | None = None) -> dict:
    """Build each task from its validated config, run it on `ctx` and return
    `{**header, "train_len", "tasks": {name: {config, metrics, rows, seconds, figure}}}`. With `out_dir`, also
    write `eval.json` there and each task's figure as `<name>.png`. The model runs in eval mode without
    gradients; its training mode and the global random state are restored afterwards, so a trainer can
    call this mid-run and still resume exactly."""
    import time

    import torch

    from hyloom.blueprint import BlueprintError
    from hyloom.registry import CapabilityError, registry

    out = Path(out_dir) if out_dir is not None else None
    report, plots = {**(header or {}), "train_len": ctx.train_len, "tasks": {}}, {}
    was_training = ctx.model.training
    ctx.model.eval()
    cuda = [ctx.device] if torch.device(ctx.device).type == "cuda" else []
    try:
        for cfg in configs:
            name = cfg.type
            began = time.perf_counter()
            with torch.random.fork_rng(devices=cuda), torch.no_grad():
                torch.manual_seed(ctx.seed)
                try:
                    result = registry().get("eval_task", name).build(cfg).run(ctx)
                except (BlueprintError, CapabilityError, ValueError) as exc:
                    raise EvalError(f"task {name!r} cannot run: {exc}") from exc
            report["tasks"][name] = {"config": cfg.model_dump(mode="json"), **_checked(name, result),
                                     "seconds": round(time.perf_counter() - began, 2)}
            plots[name] = result.plot
    finally:
        ctx.model.train(was_training)
    if out is not None:  # only once every task has run: a refused task leaves no half-written results
        import json

        out.mkdir(parents=True, exist_ok=True)
        for name, plot in plots.items():
            if plot is not None:
                plot(out / f"{name}.png")
                report["tasks"][name]["figure"] = f"{name}.png"

        (out / "eval.json").write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    return report


def _checked(name: str, result: Any) -> dict:
    """A task's result as JSON-able metrics and rows, or EvalError naming what is wrong with it."""
    import math

    if not isinstance(result, EvalResult):
        raise EvalError(f"task {name!r} returned {type(result).__name__}, expected hyloom.eval.EvalResult")
    metrics = {}
    for key, value in result.metrics.items():
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise EvalError(f"task {name!r}: metric {key!r} is {value!r}, not a number") from None
        metrics[str(key)] = value if math.isfinite(value) else None  # JSON has no NaN
    if not all(isinstance(r, dict) for r in result.rows):
        raise EvalError(f"task {name!r}: rows must be dicts")
    return {"metrics": metrics, "rows": result.rows}


def _jsonable(value: Any):
    """Rows may hold numpy or torch scalars: written as plain numbers."""
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    raise TypeError(f"{type(value).__name__} is not JSON-able")


_AT_LENGTH = re.compile(r"@(\d+)$")


def headline(entry: dict) -> tuple[str, float | None]:
    """A task's headline metric: the first it reports (tasks put their overall score first)."""
    return next(iter(entry["metrics"].items()), ("-", None))


def format_table(report: dict) -> str:
    """The printed table: a line per metric; a metric at a length above the training length (`name@LENGTH`)
    is marked `extrapolated`."""
    train_len = report["train_len"]
    lines = [f"{'task':16} {'metric':32} {'value':>10}"]
    for name, entry in report["tasks"].items():
        for i, (metric, value) in enumerate(entry["metrics"].items()):
            at = _AT_LENGTH.search(metric)
            note = "  extrapolated" if at and int(at[1]) > train_len else ""
            shown = "nan" if value is None else f"{value:.4g}"
            lines.append(f"{name if i == 0 else '':16} {metric:32} {shown:>10}{note}")
        lines.append(f"{'':16} ({entry['seconds']} s)")
    if any("extrapolated" in line for line in lines):
        lines.append(f"extrapolated: longer than the {train_len} tokens the model was trained on")
    return "\n".join(lines)
