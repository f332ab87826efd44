"""The loop the conversion trainers share: it keeps the `lm` trainer's conventions (run directory, AdamW on the
lm schedule, checkpoints every save_every with optimizer, loader and RNG state, exact resume, metrics.jsonl,
loss.png) and leaves the loss to the trainer: `train_step(net, batch)` and `evaluate(batch)` each return
(loss, {metric: value}), the loss a tensor to step on or a float.

Under torchrun it runs as the `lm` trainer does: `batch_size` is global (each process takes its 1/world share
of every micro-batch), the module that trains is wrapped in DistributedDataParallel (`net`; the teacher is not),
losses and metrics are averaged over the processes, and only rank 0 writes metrics and checkpoints, the others
waiting at a barrier."""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from hyloom.plugins.train.schedule import learning_rate
from hyloom.train import (RunDir, SetupError, TrainingError, make_optimizer, resume_point, resume_training,
                          rng_state)


def autocast_for(cfg, device: torch.device):
    """bf16 autocast on CUDA (precision auto or bf16), else none."""
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext


def mean_over_ranks(env, values: dict[str, float]) -> dict[str, float]:
    """Each value's mean over the processes, in one all-reduce (every rank gets them)."""
    if env.world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return {k: v / env.world for k, v in zip(keys, t.tolist())}


def fit_loop(cfg, *, name: str, model, trains, data, run, resolved: dict, train_step, evaluate,
             summary: list[str]) -> dict:
    """Train the parameters of `model` that require a gradient; save `model` with `resolved` as its blueprint.
    `trains` is the module the training loss flows through (`model` itself, or a part of it holding every
    trained parameter): under torchrun it is the one wrapped in DDP, and `train_step` gets it as `net`."""
    from hyloom.data import TokenLoader, data_spec
    from hyloom.plot import line_plot

    env = run.env
    out = RunDir(cfg.out_dir)
    if env.main:
        out.path.mkdir(parents=True, exist_ok=True)
    seq_len = data_spec(run.blueprint.data).seq_len
    micro = cfg.batch_size // cfg.grad_accum
    if micro % env.world:
        raise SetupError(f"batch_size / grad_accum = {micro} must be divisible by the {env.world} processes "
                         "(batch_size is the global batch, shared among them)")
    loader = TokenLoader(data.dir, "train", seq_len=seq_len, batch_size=micro, rank=env.rank, world_size=env.world,
                         seed=cfg.seed)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(model, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, device=env.device)
    start, point = 0, resume_point(out, run.resume)
    state = resume_training(point, model, resolved, opt, cfg.steps, steps_setting="steps")
    if state is not None:
        start = state["step"]
        loader.load_state_dict(state["loader"])
    if env.main:
        out.forget_after(start)
        processes = f" ({env.world} processes)" if env.world > 1 else ""
        for line in summary + [
                f"trains   {sum(p.numel() for p in trained):,} of {model.num_parameters():,} parameters on "
                f"{env.device}{processes}",
                f"steps    {cfg.steps} x {cfg.batch_size} sequences of {seq_len} tokens, lr {cfg.lr:g}, "
                f"warmup {cfg.warmup}, {cfg.schedule} to {cfg.lr * cfg.min_lr_ratio:g}",
                f"run      {cfg.out_dir}: " + (f"resuming from {point.name} at step {start}" if point else
                                               "from step 0")]:
            print(line, flush=True)
    autocast = autocast_for(cfg, env.device)
    # the frozen rest (and the teacher) stays out of DDP: it holds no gradient to average
    net = torch.nn.parallel.DistributedDataParallel(trains) if env.world > 1 else trains

    def held_out() -> dict:
        model.eval()
        batches = TokenLoader(data.dir, "eval", seq_len=seq_len, batch_size=micro, rank=env.rank,
                              world_size=env.world, seed=cfg.seed)
        sums: dict[str, float] = {}
        with torch.no_grad(), autocast():
            for _ in range(cfg.eval_batches):
                loss, metrics = evaluate(batches.next_batch().to(env.device))
                for k, v in {"loss": float(loss), **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + v / cfg.eval_batches
        model.train()
        return {"eval_" + k: v for k, v in mean_over_ranks(env, sums).items()}

    tokens_per_step = cfg.batch_size * seq_len
    bar = tqdm(total=cfg.steps, initial=start, unit="step", disable=not (env.main and run.progress),
               dynamic_ncols=True)
    began, loss, evaluated = time.perf_counter(), float("nan"), {}
    model.train()
    for step in range(start, cfg.steps):
        lr = learning_rate(step, lr=cfg.lr, steps=cfg.steps, warmup=cfg.warmup, schedule=cfg.schedule,
                           min_lr_ratio=cfg.min_lr_ratio, decay_fraction=cfg.decay_fraction)
        for group in opt.param_groups:
            group["lr"] = lr
        loss, sums = 0.0, {}
        for i in range(cfg.grad_accum):
            batch = loader.next_batch().to(env.device)
            syncs = env.world == 1 or i == cfg.grad_accum - 1  # DDP averages the gradients once, at the last
            with (contextlib.nullcontext() if syncs else net.no_sync()), autocast():
                micro_loss, metrics = train_step(net, batch)
            (micro_loss / cfg.grad_accum).backward()
            loss += micro_loss.item() / cfg.grad_accum
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
        sums = mean_over_ranks(env, {"loss": loss, **sums})
        loss = sums.pop("loss")
        if not math.isfinite(loss):
            raise TrainingError(f"{name} step {step + 1}: the loss is {loss}; stopping without saving. "
                                f"The last good checkpoint is {out.latest() or 'none (no checkpoint yet)'}.")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trained, cfg.clip or float("inf")))
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        record = {"step": done, "loss": loss, **sums, "lr": lr, "grad_norm": grad_norm,
                  "tokens": done * tokens_per_step}
        if done % cfg.eval_every == 0 or done == cfg.steps:
            evaluated = held_out()
            record.update(evaluated)
        if env.main and (done % cfg.log_every == 0 or "eval_loss" in record or done == cfg.steps):
            out.log(record)
            if not run.progress:
                held = f"   held-out {record['eval_loss']:.4g}" if "eval_loss" in record else ""
                print(f"{name} step {done}/{cfg.steps}   loss {loss:.4g}{held}   lr {lr:.2e}   "
                      f"grad norm {grad_norm:.3g}", flush=True)
        if done % cfg.save_every == 0 or done == cfg.steps:
            if env.main:  # the loader's state is the global position, the same on every rank
                state = {"step": done, "optimizer": opt.state_dict(), "loader": loader.state_dict(),
                         "rng": rng_state()}
                out.save(done, model, resolved, state, cfg.keep,
                         extra_files={"tokenizer.json": (data.dir / "tokenizer.json").read_text()})
            env.barrier()
        bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        bar.update(1)
    bar.close()
    if env.main:
        metrics = out.metrics()
        line_plot(out.path / "loss.png", {
            "train": [(r["step"], r["loss"]) for r in metrics],
            "held-out": [(r["step"], r["eval_loss"]) for r in metrics if "eval_loss" in r]},
            markers=("held-out",), xlabel="optimizer step", ylabel=f"{name} loss", title=f"{out.path}: {name} loss")
    return {"steps": cfg.steps, "train_loss": loss, "eval_loss": evaluated.get("eval_loss"),
            "seconds": round(time.perf_counter() - began, 1), "checkpoint": str(out.latest()), **evaluated}
