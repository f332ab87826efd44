"""What the reproduction scripts of bench/ (hype_length, mdm_small, convert_small, grpo_small) share: logging,
bf16 autocast on CUDA, timing of training steps, and results written atomically (a run cut short by its time
limit keeps the last complete file). Each script puts this folder on sys.path, so that it also imports when a
test loads the script by its path."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path


def make_log(tag: str):
    def log(message: str) -> None:
        print(f"[{tag} {time.strftime('%H:%M:%S')}] {message}", flush=True)
    return log


def autocast(device):
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def timed_train_steps(model, opt, batch, n: int, device, loss_fn=None) -> list[float]:
    """Seconds of each of `n` optimizer steps of `loss_fn(model, batch)` (default: next-token loss) under bf16
    autocast on CUDA, the device synchronised after each; the caller drops the first ones (they compile)."""
    from hyloom.plugins.train.lm import lm_loss

    loss_fn = loss_fn or lm_loss
    times = []
    for _ in range(n):
        began = time.perf_counter()
        with autocast(device):
            loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - began)
    return times


def run_main(main, name: str) -> None:
    """A reproduction script's entry point: bad input (a blueprint override, the device, the data) prints its
    message and exits 2, a training failure exits 1, both without a traceback."""
    from hyloom.blueprint import BlueprintError
    from hyloom.data import DataError
    from hyloom.errors import SetupError, TrainingError

    try:
        sys.exit(main())
    except (BlueprintError, DataError, TrainingError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        sys.exit(1 if isinstance(exc, TrainingError) and not isinstance(exc, SetupError) else 2)
