"""The evaluation contract: a registered `eval_task` builds an object whose `run(ctx)` measures a model.

`hyloom eval CHECKPOINT --task NAME` and a trainer's `train.eval_tasks` both go through these types, so a task
written once (built-in or third-party) runs in both places.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol


@dataclass
class EvalContext:
    """What a task runs on.

    model:        the model in eval mode, on `device` (a `HybridLM`: `model(ids)`, `model.generate(...)`).
    tokenizer:    `encode(text) -> list[int]`, `decode(ids) -> str`, `eos_id`, `vocab_size`.
    device:       a `torch.device`.
    heldout_ids:  returns the held-out split of the blueprint's data as one 1-D numpy array of token ids
                  (documents joined by EOS), prepared on first call; the source of filler text and of
                  held-out loss. Raises `DataError` when the blueprint has no data to hold out.
    train_len:    the context length the model was trained at (the blueprint's `max_seq_len`); a task
                  that evaluates longer sequences reports it (length extrapolation is the point).
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
