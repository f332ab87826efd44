"""The `lm` trainer: a language-modelling objective (next-token by default, or masked diffusion) with AdamW,
resumable to the step."""

from __future__ import annotations

import contextlib
import math
import sys
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hyloom.blueprint import BlueprintError, Problem
from hyloom.plugins.train.config import LMTrainerConfig
from hyloom.plugins.train.schedule import SCHEDULE_KEYS, learning_rate
from hyloom.train import (RunDir, TrainingError, TrainRun, make_optimizer, resume_point, resume_training, rng_state,
                          saved_blueprint)


# Past this many logits per micro-batch (B·T·V; 2^30: 4.3 GB in fp32) the loss is taken chunk by chunk of
# tokens, LOSS_CHUNK_LOGITS logits a chunk, and the full [B, T, V] logits never exist (at 64K tokens and a 32K
# vocabulary they are 8.4 GB in fp32, their log-softmax and gradient as much again). Below it the full logits
# are cheaper: the chunked backward makes every chunk's logits again (one more head product).
CHUNKED_LOSS_LOGITS = 2 ** 30
LOSS_CHUNK_LOGITS = 2 ** 26


def lm_loss(model, batch_BT1) -> torch.Tensor:
    ids_BT, targets_BT = batch_BT1[:, :-1], batch_BT1[:, 1:]
    chunked = not isinstance(model, torch.nn.parallel.DistributedDataParallel)  # DDP syncs through forward()
    if chunked and ids_BT.numel() * model.spec.vocab_size > CHUNKED_LOSS_LOGITS:
        return chunked_next_token_loss(model, model.hidden(ids_BT), targets_BT)
    logits = model(ids_BT)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets_BT.reshape(-1))


def _summed_loss(model, x_ND, targets_N):
    logits = model.logits(x_ND)
    return F.cross_entropy(logits.float(), targets_N, reduction="sum")


def chunked_next_token_loss(model, x_BTD, targets_BT) -> torch.Tensor:
    """The mean cross-entropy of model.logits(x) against the targets, one chunk of tokens at a time: each
    chunk's logits are made, reduced to its summed loss and dropped; the backward pass makes them again, one
    chunk at a time (activation checkpointing per chunk). Only the hidden states are kept. LOSS_CHUNK_LOGITS
    logits a chunk."""
    from torch.utils.checkpoint import checkpoint

    x_ND, targets_N = x_BTD.reshape(-1, x_BTD.shape[-1]), targets_BT.reshape(-1)
    chunk = max(1, LOSS_CHUNK_LOGITS // model.spec.vocab_size)
    total = sum(checkpoint(_summed_loss, model, x_ND[i:i + chunk], targets_N[i:i + chunk], use_reentrant=False)
                for i in range(0, x_ND.shape[0], chunk))
    return total / targets_N.numel()


class NextTokenObjective:
    """The default `train.objective`: next-token cross-entropy, for causal models."""

    name = "next-token"

    def __init__(self, cfg=None):
        self.cfg = cfg

    def check(self, blueprint) -> None:
        if not blueprint.model.causal:
            raise BlueprintError([Problem("model.causal", (
                "false, but the lm trainer predicts each next token (train.objective next_token), and a "
                "bidirectional model sees that token in its input: the loss falls without the model learning to "
                "predict anything. Set model.causal: true, or train.objective.type: mdm (masked diffusion)"))])

    def bind(self, tokenizer, vocab_size: int) -> None:
        pass

    def describe(self) -> str:
        return "next_token"

    def __call__(self, model, batch_BT1, generator=None) -> torch.Tensor:
        return lm_loss(model, batch_BT1)


# torch.compile's backend; tests on CPU swap in "aot_eager" (tracing and autograd without code generation)
COMPILE_BACKEND = "inductor"


def use_compile(setting, device: torch.device) -> bool:
    """`train.compile`: true, false, or auto (on CUDA only: on CPU compiling costs more than it wins)."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def compile_blocks(model, dynamic: bool = False) -> None:
    """torch.compile each block on its own (regional compilation, as torchtitan does): blocks of one kind share
    one compiled graph, so compiling takes seconds whatever the depth. Only passes with gradients (training
    steps) run compiled; evaluation and decoding (caches, changing lengths) run the blocks as written. Wrapped
    in place: parameter names, and so checkpoints, stay as they are."""
    # Mixers may cache device constants on their first call (Lightning's decay): made now, outside the graph,
    # the compiled code does not depend on whether the cache was filled yet (a guard, and a second compile).
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device))
    # every kind of block (and every shape a run trains at) is an entry of Block.forward's compile cache, whose
    # default size (8) a model with many kinds would overflow, falling back to eager without a word
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 8 + len(model.layers)))
    for block in model.layers:
        if getattr(block, "_compiled", False):
            continue
        plain = block.forward
        # static shapes: a run trains at one length, and a new one gets kernels specialised to it; GRPO's rows
        # and lengths change every micro-batch, so it asks for symbolic shapes (dynamic=True)
        compiled = torch.compile(plain, backend=COMPILE_BACKEND, dynamic=dynamic)

        def forward(*args, _plain=plain, _compiled=compiled, **kwargs):
            return (_compiled if torch.is_grad_enabled() else _plain)(*args, **kwargs)

        block.forward, block._compiled = forward, True


def checkpoint_blocks(model) -> None:
    """Activation checkpointing per block: each block keeps only its input for the backward pass, which runs
    the block's forward again. Call it after compile_blocks: the checkpoint then wraps the compiled block (a
    checkpoint inside a compiled region cannot replay the mixers' side effects, such as a cached decay tensor,
    and would break the graph). Wrapped in place, names unchanged; without gradients blocks run as before."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        if getattr(block, "_checkpointed", False):
            continue
        plain = block.forward

        def forward(*args, _plain=plain, **kwargs):
            if not torch.is_grad_enabled():
                return _plain(*args, **kwargs)
            return checkpoint(_plain, *args, use_reentrant=False, **kwargs)

        block.forward, block._checkpointed = forward, True


def _short(value) -> str:
    return "nan" if value is None else f"{value:.3g}"


class LMTrainer:
    def __init__(self, cfg: LMTrainerConfig):
        from hyloom.registry import registry

        self.cfg = cfg
        self.objective = registry().get("objective", cfg.objective.type).build(cfg.objective)
        self._eval_ctx = None
        self._headlines: set[str] = set()  # metrics.jsonl keys of each eval task's headline metric

    def check(self, blueprint) -> None:
        """Refuse, before any data is prepared, a model this objective cannot train."""
        self.objective.check(blueprint)

    def fit(self, model, data, run: TrainRun) -> dict:
        from hyloom.data import TokenLoader, data_spec

        cfg, env = self.cfg, run.env
        out = RunDir(cfg.out_dir)
        if env.main:
            out.path.mkdir(parents=True, exist_ok=True)
        seq_len = data_spec(run.blueprint.data).seq_len  # not the manifest's: a cache serves any seq_len
        micro = cfg.batch_size // cfg.grad_accum
        if micro % env.world:
            raise TrainingError(f"batch_size / grad_accum = {micro} must be divisible by the {env.world} processes")
        self.objective.bind(data.tokenizer, run.blueprint.model.vocab_size)
        objective = (run.resolved.get("train") or {}).get("objective")
        if isinstance(objective, dict) and "mask_id" in objective:  # the checkpoints say which id was the mask
            objective["mask_id"] = self.objective.mask_id
        loader = TokenLoader(data.dir, "train", seq_len=seq_len, batch_size=micro, rank=env.rank,
                             world_size=env.world, seed=cfg.seed)
        opt = make_optimizer(model, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, device=env.device)
        start = 0
        point = resume_point(out, run.resume)
        state = resume_training(point, model, run.resolved, opt, cfg.steps)
        if state is not None:
            start = state["step"]
            loader.load_state_dict(state["loader"])
        if env.main:
            out.forget_after(start)
            self._summary(model, data, env, seq_len, point, start)
        if use_compile(cfg.compile, env.device):
            compile_blocks(model)
        if cfg.activation_checkpointing:
            checkpoint_blocks(model)
        net = torch.nn.parallel.DistributedDataParallel(model) if env.world > 1 else model
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and env.device.type == "cuda")
        autocast = (lambda: torch.autocast(env.device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
        board = self._tensorboard(out) if env.main else None

        def evaluate() -> float:
            model.eval()
            held_out = TokenLoader(data.dir, "eval", seq_len=seq_len, batch_size=micro, rank=env.rank,
                                   world_size=env.world, seed=cfg.seed)
            # a fixed generator: a random objective (mdm) draws the same masks at every evaluation
            masks = torch.Generator(env.device).manual_seed(cfg.seed + env.rank)
            with torch.no_grad(), autocast():
                losses = [self.objective(model, held_out.next_batch().to(env.device), masks).item()
                          for _ in range(cfg.eval_batches)]
            model.train()
            return env.mean(sum(losses) / len(losses))

        tokens_per_step = cfg.batch_size * seq_len
        bar = tqdm(total=cfg.steps, initial=start, unit="step", disable=not (env.main and run.progress),
                   dynamic_ncols=True)
        began, eval_loss, loss = time.perf_counter(), None, float("nan")
        headlines = {}  # the latest headline metric of each eval task, shown on the bar
        model.train()
        for step in range(start, cfg.steps):
            lr = learning_rate(step, lr=cfg.lr, steps=cfg.steps, warmup=cfg.warmup, schedule=cfg.schedule,
                               min_lr_ratio=cfg.min_lr_ratio, decay_fraction=cfg.decay_fraction)
            for group in opt.param_groups:
                group["lr"] = lr
            total = 0.0
            for i in range(cfg.grad_accum):
                batch = loader.next_batch().to(env.device)
                last = i == cfg.grad_accum - 1
                with (net.no_sync() if env.world > 1 and not last else contextlib.nullcontext()), autocast():
                    micro_loss = self.objective(net, batch) / cfg.grad_accum
                micro_loss.backward()
                total += micro_loss.item()
            loss = env.mean(total)
            if not math.isfinite(loss):
                kept = out.latest()
                raise TrainingError(f"step {step + 1}: the loss is {loss}; stopping without saving. "
                                    f"The last good checkpoint is {kept or 'none (no checkpoint yet)'}.")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip or float("inf")))
            opt.step()
            opt.zero_grad(set_to_none=True)
            done = step + 1
            seconds = time.perf_counter() - began
            tok_s = (done - start) * tokens_per_step / max(seconds, 1e-9)
            record = {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": done * tokens_per_step,
                      "tokens_per_s": round(tok_s, 1)}
            if done % cfg.eval_every == 0 or done == cfg.steps:
                eval_loss = record["eval_loss"] = evaluate()
            if cfg.eval_tasks and (done % (cfg.eval_tasks_every or cfg.eval_every) == 0 or done == cfg.steps):
                if env.main:  # the raw model, not DDP: the other ranks wait at the barrier
                    with autocast():
                        tasks = self._run_tasks(model, data, env, seq_len)
                    record.update(tasks)
                    headlines = {k[len("eval/"):]: v for k, v in tasks.items() if k in self._headlines}
                env.barrier()
            evaluated = "eval_loss" in record or any(k.startswith("eval/") for k in record)
            if env.main and (done % cfg.log_every == 0 or evaluated or done == cfg.steps):
                out.log(record)
                if not run.progress:  # the bar's place: one line per logged step
                    held_out = f"   held-out {record['eval_loss']:.3f}" if "eval_loss" in record else ""
                    scores = "".join(f"   {k} {_short(record['eval/' + k])}" for k in headlines
                                     if "eval/" + k in record)
                    print(f"step {done}/{cfg.steps}   loss {loss:.3f}{held_out}{scores}   lr {lr:.2e}   "
                          f"grad norm {grad_norm:.3g}   {tok_s:,.0f} tokens/s", flush=True)
                if board:
                    for key, value in record.items():
                        if value is not None:  # a task's non-finite metric
                            board.add_scalar(f"train/{key}", value, done)
            if done % cfg.save_every == 0 or done == cfg.steps:
                if env.main:
                    state = {"step": done, "optimizer": opt.state_dict(), "loader": loader.state_dict(),
                             "rng": rng_state()}
                    out.save(done, model, run.resolved, state, cfg.keep,
                             extra_files={"tokenizer.json": (data.dir / "tokenizer.json").read_text()})
                env.barrier()
            bar.set_postfix(loss=f"{loss:.3f}", eval=f"{eval_loss:.3f}" if eval_loss else "-",
                            **{k: _short(v) for k, v in headlines.items()}, tok_s=f"{tok_s:,.0f}", refresh=False)
            bar.update(1)
        bar.close()
        result = {"steps": cfg.steps, "train_loss": loss, "eval_loss": eval_loss, "unigram_loss": data.unigram_loss,
                  "seconds": round(time.perf_counter() - began, 1), "checkpoint": str(out.latest())}
        if env.main:
            self._finish(model, data, out, result)
        return result

    def _run_tasks(self, model, data, env, seq_len: int) -> dict:
        """train.eval_tasks on the model now: {"eval/<metric>": value}; remembers each task's headline metric."""
        from hyloom.eval import EvalContext, headline, heldout_reader, run_tasks

        cfg = self.cfg
        if self._eval_ctx is None:  # one context a run: the held-out ids are read once
            self._eval_ctx = EvalContext(model=model, tokenizer=data.tokenizer, device=env.device,
                                         heldout_ids=heldout_reader(data.dir), train_len=seq_len,
                                         batch_size=cfg.batch_size // cfg.grad_accum, seed=cfg.seed)
        report = run_tasks(cfg.eval_tasks, self._eval_ctx)
        self._headlines = {"eval/" + headline(e)[0] for e in report["tasks"].values() if e["metrics"]}
        return {f"eval/{k}": v for e in report["tasks"].values() for k, v in e["metrics"].items()}

    def _summary(self, model, data, env, seq_len: int, point, start: int) -> None:
        """What is about to run, printed before the first step; and what changed since a resumed checkpoint."""
        cfg = self.cfg
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and env.device.type == "cuda")
        splits = data.manifest["splits"]
        extras = "".join([", compiled" if use_compile(cfg.compile, env.device) else "",
                          ", activation checkpointing" if cfg.activation_checkpointing else ""])
        print(f"model    {model.num_parameters():,} parameters on {env.device} "
              f"({env.world} process{'es' if env.world > 1 else ''}), {'bf16 autocast' if bf16 else 'fp32'}{extras}")
        print(f"data     {splits['train']['tokens']:,} training tokens, {splits['eval']['tokens']:,} held out, "
              f"vocab {data.tokenizer.vocab_size:,}, seq_len {seq_len} ({data.dir})")
        print(f"loss     {self.objective.describe()}")
        print(f"steps    {cfg.steps} x {cfg.batch_size} sequences ({cfg.steps * cfg.batch_size * seq_len:,} tokens), "
              f"lr {cfg.lr:g}, warmup {cfg.warmup}, {cfg.schedule}")
        print(f"run      {cfg.out_dir}: " + (f"resuming from {point.name} at step {start}" if point else "from step 0"),
              flush=True)
        if cfg.warmup > cfg.steps:
            peak = learning_rate(cfg.steps - 1, **self._schedule(cfg))
            print(f"hyloom: warning: train.warmup ({cfg.warmup}) is longer than train.steps ({cfg.steps}): "
                  f"the whole run is warmup, the learning rate only climbs (to {peak:.2e} of lr {cfg.lr:g}) "
                  "and never decays",
                  file=sys.stderr, flush=True)
        if point is not None:
            self._schedule_change(saved_blueprint(point).get("train") or {}, start)

    @staticmethod
    def _schedule(cfg) -> dict:
        return {k: getattr(cfg, k) for k in SCHEDULE_KEYS}

    def _schedule_change(self, saved: dict, start: int) -> None:
        """Say how the learning rate moves when the resumed run's schedule settings differ from the checkpoint's.
        The schedule is a function of the step and these settings only, so it is recomputed as if the run had
        had the new settings from step 0: the LR can jump at the resume point."""
        new = self._schedule(self.cfg)
        try:
            old = {k: type(v)(saved[k]) for k, v in new.items()}
        except (KeyError, TypeError, ValueError):
            return  # a checkpoint of another trainer type: nothing to compare
        changed = [f"train.{k} {old[k]} -> {new[k]}" for k in new if old[k] != new[k]]
        if not changed:
            return
        before, after = learning_rate(start - 1, **old), learning_rate(start, **new)
        print(f"resume: {', '.join(changed)}. The {new['schedule']} schedule is recomputed for the new settings as if "
              f"the run had always had them: the LR goes from {before:.2e} (step {start}) to {after:.2e} "
              f"(step {start + 1}) and ends at {learning_rate(new['steps'] - 1, **new):.2e} (step {new['steps']}); "
              f"the optimizer state carries on", flush=True)

    def _finish(self, model, data, out: RunDir, result: dict) -> None:
        from hyloom.plot import line_plot

        metrics = out.metrics()
        baseline = {"unigram baseline": data.unigram_loss} if math.isfinite(data.unigram_loss) else {}
        line_plot(out.path / "loss.png", {
            "train": [(r["step"], r["loss"]) for r in metrics],
            "held-out": [(r["step"], r["eval_loss"]) for r in metrics if "eval_loss" in r]},
            hlines=baseline, markers=("held-out",),
            xlabel="optimizer step", ylabel="loss (nats/token)", title=f"{out.path}: {self.objective.name} loss")
        if self.cfg.sample_tokens:
            from hyloom.generate import run_sampler

            model.eval()
            ids = data.tokenizer.encode(self.cfg.sample_prompt)
            options = {"temperature": 0.8, "top_k": 40} if model.spec.causal else {}
            got = run_sampler(model, [ids], tokenizer=data.tokenizer, seed=self.cfg.seed,
                              max_new_tokens=self.cfg.sample_tokens, **options)
            result["sample"] = self.cfg.sample_prompt + data.tokenizer.decode(got.tokens[0])

    def _tensorboard(self, out: RunDir):
        if self.cfg.tensorboard is False:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if self.cfg.tensorboard:
                raise TrainingError("tensorboard: true, but TensorBoard is not installed (pip install tensorboard)")
            return None
        return SummaryWriter(str(out.path / "tensorboard"))
