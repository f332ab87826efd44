"""The `grpo` trainer (SPEC §8, JustRL's recipe): per step, B prompts, G sampled completions each, verifier rewards,
group advantages, then several clipped mini-batch updates from the stored old log-probs. docs/rl.md is the guide.

Randomness: the sampler and the mini-batch shuffle draw from generators seeded from (seed, step, rank) at every
step, and the prompt order is a seeded permutation per epoch read at a saved position, so resuming from a
checkpoint continues exactly as the uninterrupted run would."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from hyloom.blueprint import BlueprintError, Problem
from hyloom.plugins.rl import grpo
from hyloom.plugins.rl.config import GrpoConfig
from hyloom.plugins.rl.prompts import PromptSetError, load_prompt_set
from hyloom.plugins.rl.rollout import completion_logits, sample_completions
from hyloom.plugins.rl.verifiers import build_verifier
from hyloom.plugins.train.lm import compile_blocks, use_compile
from hyloom.train import (RunDir, SetupError, TrainingError, TrainRun, make_optimizer, resume_point, resume_training,
                          rng_state)

COMPLETIONS = "completions.jsonl"
FIGURE = "rewards.png"
REFERENCE = "reference.safetensors"


# ---- prompts and rewards -----------------------------------------------------------------------------------

def fields_read(verifier_cfg) -> dict[str, str]:
    """{setting: record field} a verifier reads, by the convention that a config setting named `*_field` holds the
    name of a record field (answer_field, tests_field, pattern_field, ...)."""
    return {k: v for k, v in verifier_cfg.model_dump().items() if k.endswith("_field") and isinstance(v, str)}


def check_records(records: list[dict], cfg: GrpoConfig, where: str) -> None:
    """Refuse a prompt set a verifier could not score, naming the first record and field that lacks."""
    for name, v in zip(cfg.verifier_names(), cfg.verifiers):
        for setting, field in fields_read(v.verifier).items():
            for i, record in enumerate(records):
                if field not in record:
                    raise PromptSetError(f"{where}: record {i} has no field {field!r}, which verifier {name!r} "
                                         f"({v.verifier.type}, its {setting}) reads; fields: {', '.join(record)}")


class Scorer:
    """The weighted verifiers: rewards [N, n_verifiers] and each completion's accuracy (the first verifier)."""

    def __init__(self, cfg: GrpoConfig):
        self.names = cfg.verifier_names()
        self.weights = torch.tensor([v.weight for v in cfg.verifiers], dtype=torch.float32)
        self.verifiers = [build_verifier(v.verifier) for v in cfg.verifiers]
        first = cfg.verifiers[0].verifier
        # a plugin verifier without a `correct` setting counts a positive reward as correct
        self.correct = getattr(first, "correct", None)
        # threads only when some verifier waits (a sandbox process, a service): verifiers that only compute hold
        # the GIL, and a pool around them only adds its overhead (2.7x the math verifier's time on 512 completions)
        blocking = any(getattr(v, "blocking", False) for v in self.verifiers)
        self.workers = cfg.reward_workers if blocking else 1

    def _one(self, item):
        record, text = item
        out = []
        for name, verifier in zip(self.names, self.verifiers):
            try:
                out.append(float(verifier(record, text).reward))
            except (KeyError, ValueError, TypeError) as exc:  # the record, not the completion, is at fault
                raise TrainingError(f"verifier {name!r} cannot score the prompt {record.get('prompt', '')!r:.80}: "
                                    f"{exc}") from None
        return out

    def __call__(self, records: list[dict], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        items = list(zip(records, texts))
        if self.workers > 1 and len(items) > 1:
            with ThreadPoolExecutor(self.workers) as pool:
                rows = list(pool.map(self._one, items))
        else:
            rows = [self._one(item) for item in items]
        rewards = torch.tensor(rows, dtype=torch.float32).reshape(len(items), len(self.names))
        first = rewards[:, 0]
        accurate = first >= self.correct if self.correct is not None else first > 0
        return rewards, accurate

    def total(self, rewards_NV: torch.Tensor) -> torch.Tensor:
        return rewards_NV @ self.weights


class PromptOrder:
    """Prompts in a seeded random order per epoch, read from a saved position (epoch, cursor)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.epoch, self.cursor = 0, 0

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed % 2**63, epoch]).permutation(self.n)

    def take(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            perm = self._perm(self.epoch)
            grab = perm[self.cursor:self.cursor + count - len(out)].tolist()
            out += grab
            self.cursor += len(grab)
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise SetupError(f"the checkpoint was trained on {state['n']} prompts, the prompt set now has {self.n}: "
                             "resuming would not continue the same order")
        self.epoch, self.cursor = state["epoch"], state["cursor"]


def _seeded(device, *parts: int) -> torch.Generator:
    """A generator whose state is a function of `parts` alone (so a resumed run draws what the whole run drew)."""
    seed = int(np.random.SeedSequence([abs(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device).manual_seed(seed)


def _sum_over_ranks(values: list[float], env, op=None) -> list[float]:
    if env.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


# ---- evaluation --------------------------------------------------------------------------------------------

def score_prompts(model, tokenizer, records: list[dict], scorer: Scorer, *, template: str, max_new_tokens: int,
                  temperature: float = 0.0, batch: int | None = None, seed: int = 0, env=None) -> dict:
    """One completion per record (greedy by default) scored by the verifiers: accuracy, mean reward and length,
    and per-record rows. Under several processes each scores its share; the sums are all-reduced."""
    world, rank = (env.world, env.rank) if env is not None else (1, 0)
    mine = records[rank::world]
    totals = [0.0, 0.0, 0.0, 0.0]  # accurate, reward, length, count
    rows = []
    if mine:
        was_training = model.training
        model.eval()
        prompts = [tokenizer.encode(template.format(prompt=r["prompt"])) for r in mine]
        gen = _seeded(next(model.parameters()).device, seed, rank, 7)
        roll = sample_completions(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                  eos_id=tokenizer.eos_id, generator=gen, batch=batch)
        model.train(was_training)
        texts = [tokenizer.decode(ids) for ids in roll.completion_ids(tokenizer.eos_id)]
        rewards, accurate = scorer(mine, texts)
        total = scorer.total(rewards)
        lengths = roll.lengths_N.cpu()
        totals = [float(accurate.sum()), float(total.sum()), float(lengths.sum()), float(len(mine))]
        rows = [{"prompt": r["prompt"], "completion": t, "reward": float(total[i]), "accurate": bool(accurate[i]),
                 "length": int(lengths[i]), **({"steps": r["steps"]} if "steps" in r else {})}
                for i, (r, t) in enumerate(zip(mine, texts))]
    accurate, reward, length, count = _sum_over_ranks(totals, env) if env is not None else totals
    count = max(count, 1)
    return {"accuracy": accurate / count, "reward_mean": reward / count, "response_length_mean": length / count,
            "rows": rows}


# ---- the trainer -------------------------------------------------------------------------------------------

class GrpoTrainer:
    def __init__(self, cfg: GrpoConfig):
        self.cfg = cfg
        self.scorer = Scorer(cfg)  # an unregistered verifier has been refused by the config already
        self._records = None
        self.dropped = 0  # training prompts left out because they are held-out prompts too

    def check(self, blueprint) -> None:
        """Refuse, before any data is prepared, a model that cannot sample and a prompt set the verifiers cannot
        score."""
        if not blueprint.model.causal:
            raise BlueprintError([Problem("model.causal", "false, but the grpo trainer samples completions left "
                                          "to right: set model.causal: true")])
        self.records()

    def records(self) -> tuple[list[dict], list[dict]]:
        """(training prompts, held-out prompts). Training records whose prompt is also a held-out prompt are
        dropped, so the held-out set stays whole and held out (a small generated problem space overlaps)."""
        if self._records is None:
            cfg = self.cfg
            train = load_prompt_set(cfg.prompts)
            check_records(train, cfg, "train.prompts")
            held = []
            if cfg.eval_prompts is not None:
                held = load_prompt_set(cfg.eval_prompts)
                held = held[:cfg.eval_limit] if cfg.eval_limit else held
                check_records(held, cfg, "train.eval_prompts")
                seen = {r["prompt"] for r in held}
                kept = [r for r in train if r["prompt"] not in seen]
                if not kept:
                    raise PromptSetError("train.prompts: every training prompt is also a held-out prompt "
                                         "(train.eval_prompts)")
                self.dropped, train = len(train) - len(kept), kept
            self._records = (train, held)
        return self._records

    def fit(self, model, data, run: TrainRun) -> dict:
        cfg, env = self.cfg, run.env
        out = RunDir(cfg.out_dir)
        if env.main:
            out.path.mkdir(parents=True, exist_ok=True)
        if cfg.prompts_per_step % env.world:
            raise TrainingError(f"prompts_per_step ({cfg.prompts_per_step}) must be divisible by the {env.world} "
                                "processes")
        train, held = self.records()
        tokenizer = data.tokenizer
        eos = tokenizer.eos_id
        prompt_ids = tokenizer.encode_batch([cfg.prompt_template.format(prompt=r["prompt"]) for r in train])
        longest = max(map(len, prompt_ids)) + cfg.max_new_tokens
        if longest > run.blueprint.model.max_seq_len and env.main:
            print(f"hyloom: warning: the longest prompt plus max_new_tokens is {longest} tokens, more than "
                  f"model.max_seq_len ({run.blueprint.model.max_seq_len})", file=sys.stderr, flush=True)

        opt = make_optimizer(model, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, device=env.device)
        order = PromptOrder(len(train), cfg.seed)
        start = 0
        point = resume_point(out, run.resume)
        state = resume_training(point, model, run.resolved, opt, cfg.steps)
        if state is not None:
            start = state["step"]
            order.load_state_dict(state["prompts"])
        reference = self._reference(model, out, env, fresh=point is None) if cfg.kl_coef else None
        if env.main:
            out.forget_after(start, ("metrics.jsonl", COMPLETIONS))
            self._summary(model, env, len(train), len(held), point, start)
        env.barrier()

        if use_compile(cfg.compile, env.device):
            compile_blocks(model, dynamic=True)
        net = torch.nn.parallel.DistributedDataParallel(model) if env.world > 1 else model
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and env.device.type == "cuda")
        autocast = (lambda: torch.autocast(env.device.type, dtype=torch.bfloat16)) if use_bf16 \
            else contextlib.nullcontext
        local_prompts = cfg.prompts_per_step // env.world
        G = cfg.group_size

        def evaluate() -> dict:
            with autocast():
                got = score_prompts(model, tokenizer, held, self.scorer, template=cfg.prompt_template,
                                    max_new_tokens=cfg.max_new_tokens, temperature=cfg.eval_temperature,
                                    batch=cfg.rollout_batch, seed=cfg.seed, env=env)
            return {f"eval/{k}": v for k, v in got.items() if k != "rows"}

        bar = tqdm(total=cfg.steps, initial=start, unit="step", disable=not (env.main and run.progress),
                   dynamic_ncols=True)
        began = time.perf_counter()
        last_eval: dict = {}
        if held and start == 0:
            last_eval = evaluate()
            if env.main:
                out.log({"step": 0, **last_eval})
        record: dict = {}
        done = start
        for step in range(start, cfg.steps):
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
            for group in opt.param_groups:
                group["lr"] = lr
            picked = order.take(cfg.prompts_per_step)[env.rank * local_prompts:(env.rank + 1) * local_prompts]
            records = [train[i] for i in picked]

            # rollouts: G completions per prompt, prompt-major
            model.eval()
            with autocast():
                roll = sample_completions(model, [prompt_ids[i] for i in picked for _ in range(G)],
                                          max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                          eos_id=eos, generator=_seeded(env.device, cfg.seed, step, env.rank, 1),
                                          batch=cfg.rollout_batch)
            model.train()
            rollout_end = time.perf_counter()
            texts = [tokenizer.decode(ids) for ids in roll.completion_ids(eos)]
            expanded = [r for r in records for _ in range(G)]
            rewards, accurate = self.scorer(expanded, texts)
            total = self.scorer.total(rewards)
            reward_s = time.perf_counter() - rollout_end
            update_began = time.perf_counter()

            adv_BG = grpo.group_advantages(total.view(local_prompts, G), normalise_std=cfg.normalise_std)
            mask = roll.mask_NT
            adv_NT = grpo.token_advantages(adv_BG.to(env.device), mask)
            old, entropy, ref = self._old_logprobs(model, roll, reference, autocast)
            # every group of every process with one reward for all G: the loss and its gradient are exactly zero
            # (unless a KL or entropy term adds one), and an AdamW step would still move the weights by its
            # momentum and weight decay, so there is no step at all. Every process agrees, so all average the same
            # keys below; the row leaves the update metrics out (a logged 0.0 loss would read as a measurement)
            signal = _sum_over_ranks([float(bool((adv_BG != 0).any()))], env)[0] > 0
            skipped = not (signal or cfg.kl_coef or cfg.entropy_coef)
            stats = {} if skipped else self._update(net, opt, roll, old, ref, adv_NT, step, env, autocast)
            update_s = time.perf_counter() - update_began
            done = step + 1

            lengths = roll.lengths_N
            n_tok = float(mask.sum())
            local = {
                "reward_mean": float(total.mean()), "reward_std": float(total.std()) if len(total) > 1 else 0.0,
                **{f"reward/{n}": float(rewards[:, k].mean()) for k, n in enumerate(self.scorer.names)},
                "accuracy": float(accurate.float().mean()),
                "response_length_mean": float(lengths.mean()),
                "clipped": float((~roll.finished_N).float().mean()),
                "entropy": float((entropy * mask).sum()) / max(n_tok, 1),
                "logp_mismatch": float(((old - roll.logp_NT).abs() * mask).sum()) / max(n_tok, 1),
                "groups_all_same": float((adv_BG == 0).all(1).float().mean()),
                **stats,
                "rollout_seconds": roll.seconds, "reward_seconds": reward_s, "update_seconds": update_s,
                "rollout_tokens_per_s": n_tok / max(roll.seconds, 1e-9),
            }
            names = list(local)
            means = _sum_over_ranks([local[k] for k in names], env)
            record = {"step": done, "lr": lr, **{k: v / env.world for k, v in zip(names, means)},
                      "skipped_update": skipped}
            record["rollout_tokens_per_s"] *= env.world  # every process samples at once: their rates add up
            record["response_length_max"] = int(_sum_over_ranks([float(lengths.max())], env, dist.ReduceOp.MAX
                                                                if env.world > 1 else None)[0])
            record["prompts"] = done * cfg.prompts_per_step
            time_up = cfg.max_seconds is not None and time.perf_counter() - began > cfg.max_seconds
            time_up = bool(_sum_over_ranks([float(time_up)], env)[0])
            last = done == cfg.steps or time_up
            if held and (done % cfg.eval_every == 0 or last):
                last_eval = evaluate()
                record.update(last_eval)
            if env.main:
                if cfg.completions_logged and (done % cfg.completions_every == 0 or step == start or last):
                    self._log_completions(out, done, expanded, texts, rewards, total, roll)
                if done % cfg.log_every == 0 or last or any(k.startswith("eval/") for k in record):
                    out.log(record)
                    if not run.progress:
                        print(self._line(record, cfg.steps), flush=True)
            if done % cfg.save_every == 0 or last:
                if env.main:
                    state = {"step": done, "optimizer": opt.state_dict(), "prompts": order.state_dict(),
                             "rng": rng_state()}
                    out.save(done, model, run.resolved, state, cfg.keep,
                             extra_files={"tokenizer.json": (data.dir / "tokenizer.json").read_text()})
                env.barrier()
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}", acc=f"{record['accuracy']:.2f}",
                            eval=f"{last_eval['eval/accuracy']:.2f}" if last_eval else "-",
                            len=f"{record['response_length_mean']:.0f}", tok_s=f"{record['rollout_tokens_per_s']:,.0f}",
                            refresh=False)
            bar.update(1)
            if time_up:
                if env.main:
                    print(f"grpo: max_seconds ({cfg.max_seconds:g}) reached after step {done}; stopping", flush=True)
                break
        bar.close()
        result = {"steps": done, "seconds": round(time.perf_counter() - began, 1), "checkpoint": str(out.latest()),
                  **{k: record.get(k) for k in ("reward_mean", "accuracy", "response_length_mean", "entropy")},
                  **{k: v for k, v in last_eval.items()}}
        if env.main:
            self._figure(out)
        return result

    # ---- pieces of a step ----------------------------------------------------------------------------------

    def _rows(self, n: int, size: int | None):
        size = size or n
        return [torch.arange(lo, min(lo + size, n)) for lo in range(0, n, size)]

    @torch.no_grad()
    def _old_logprobs(self, model, roll, reference, autocast):
        """The policy's log-probs of the sampled tokens from the training forward (the ratio's denominator), the
        entropy of its next-token distributions, and the reference model's log-probs when kl_coef is set."""
        cfg = self.cfg
        old, ent = torch.zeros_like(roll.logp_NT), torch.zeros_like(roll.logp_NT)
        ref = torch.zeros_like(roll.logp_NT) if reference is not None else None
        for index in self._rows(len(roll.finished_N), cfg.micro_batch):
            part = roll.rows(index)
            T = part.tokens_NT.shape[1]
            with autocast():
                logits = completion_logits(model, part).float() / cfg.temperature
            old[index, :T] = grpo.token_logprobs(logits, part.tokens_NT) * part.mask_NT
            ent[index, :T] = grpo.token_entropy(logits) * part.mask_NT
            if reference is not None:
                with autocast():
                    ref_logits = completion_logits(reference, part).float() / cfg.temperature
                ref[index, :T] = grpo.token_logprobs(ref_logits, part.tokens_NT) * part.mask_NT
        return old, ent, ref

    def _update(self, net, opt, roll, old, ref, adv_NT, step, env, autocast) -> dict:
        """updates_per_step optimizer steps over shuffled mini-batches; each normalised by its global token count."""
        cfg = self.cfg
        N = len(roll.finished_N)
        order = torch.randperm(N, generator=_seeded("cpu", cfg.seed, step, env.rank, 2))
        sums = {"clip_high": 0.0, "clip_low": 0.0, "clip_dual": 0.0, "approx_kl": 0.0, "ratio_mean": 0.0}
        if cfg.kl_coef:
            sums["kl_ref"] = 0.0
        tokens, grad_norms, losses = 0.0, [], []
        for mini in order.chunk(cfg.updates_per_step):
            count = grpo.global_token_count(roll.mask_NT[mini])
            micro = [mini[rows] for rows in self._rows(len(mini), cfg.micro_batch)]
            loss_sum = 0.0
            for j, index in enumerate(micro):
                part = roll.rows(index)
                T = part.tokens_NT.shape[1]
                sync = env.world == 1 or j == len(micro) - 1  # DDP all-reduces on the last micro-batch only
                with contextlib.nullcontext() if sync else net.no_sync():
                    with autocast():
                        logits = completion_logits(net, part).float() / cfg.temperature
                    logp = grpo.token_logprobs(logits, part.tokens_NT)
                    entropy = grpo.token_entropy(logits) if cfg.entropy_coef else None
                    per_token, st = grpo.grpo_token_loss(
                        logp, old[index, :T], adv_NT[index, :T], part.mask_NT, clip_low=cfg.clip_low,
                        clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, kl_coef=cfg.kl_coef,
                        logp_ref=ref[index, :T] if ref is not None else None, entropy_coef=cfg.entropy_coef,
                        entropy=entropy)
                    # DDP averages gradients over processes; world_size undoes it, so every token weighs the same
                    loss = grpo.token_mean(per_token, part.mask_NT, count, world_size=env.world)
                    loss.backward()
                loss_sum += loss.item()
                n = float(st["tokens"])
                tokens += n
                for k in sums:
                    if k in st:
                        sums[k] += float(st[k]) * n
            if not math.isfinite(loss_sum):
                raise TrainingError(f"step {step + 1}: the loss is {loss_sum}; stopping without saving")
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip or float("inf"))))
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss_sum)
        out = {k: v / max(tokens, 1) for k, v in sums.items()}
        return {"loss": sum(losses) / len(losses), "grad_norm": sum(grad_norms) / len(grad_norms),
                "grad_norm_max": max(grad_norms), **out}

    def _reference(self, model, out: RunDir, env, fresh: bool):
        """A frozen copy of the weights this run started from (kl_coef > 0): saved beside the run on a fresh start,
        read back on resume."""
        import copy

        from safetensors.torch import load_file, save_file

        file = out.path / REFERENCE
        reference = copy.deepcopy(model)
        if fresh:
            if env.main:
                save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(file))
            env.barrier()
        elif file.exists():
            reference.load_state_dict(load_file(str(file), device=str(env.device)))
        else:
            raise SetupError(f"kl_coef is set but {file} (the reference weights of this run) is missing")
        reference.eval()
        for p in reference.parameters():
            p.requires_grad_(False)
        return reference

    # ---- reporting ---------------------------------------------------------------------------------------------

    def _log_completions(self, out: RunDir, step, records, texts, rewards, total, roll) -> None:
        lengths, finished = roll.lengths_N.long().tolist(), roll.finished_N.tolist()
        with open(out.path / COMPLETIONS, "a") as f:
            for i in range(min(self.cfg.completions_logged, len(texts))):
                row = {"step": step, "prompt": records[i]["prompt"], "completion": texts[i],
                       "reward": float(total[i]),
                       "rewards": {n: float(rewards[i, k]) for k, n in enumerate(self.scorer.names)},
                       "length": lengths[i], "finished": finished[i]}
                if "answer" in records[i]:
                    row["answer"] = records[i]["answer"]
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def _summary(self, model, env, n_train: int, n_held: int, point, start: int) -> None:
        cfg = self.cfg
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and env.device.type == "cuda")
        terms = " + ".join(f"{v.weight:g} x {n}" for n, v in zip(self.scorer.names, cfg.verifiers))
        print(f"model    {model.num_parameters():,} parameters on {env.device} "
              f"({env.world} process{'es' if env.world > 1 else ''}), {'bf16 autocast' if bf16 else 'fp32'}"
              f"{', compiled' if use_compile(cfg.compile, env.device) else ''}")
        dropped = f" ({self.dropped:,} more left out: also held out)" if self.dropped else ""
        print(f"prompts  {n_train:,} for training ({cfg.prompts.type}){dropped}, {n_held:,} held out")
        print(f"reward   {terms}")
        print(f"steps    {cfg.steps} x {cfg.prompts_per_step} prompts x G={cfg.group_size}, {cfg.updates_per_step} "
              f"updates a step, lr {cfg.lr:g} (warmup {cfg.warmup}), up to {cfg.max_new_tokens} new tokens")
        print(f"run      {cfg.out_dir}: " + (f"resuming from {point.name} at step {start}" if point else "from step 0"),
              flush=True)

    @staticmethod
    def _line(r: dict, steps: int) -> str:
        held = f"   held-out acc {r['eval/accuracy']:.3f}" if "eval/accuracy" in r else ""
        update = "no update (no mixed rewards)" if r["skipped_update"] else f"grad norm {r['grad_norm']:.3g}"
        return (f"step {r['step']}/{steps}   reward {r['reward_mean']:.3f}   acc {r['accuracy']:.3f}{held}   "
                f"len {r['response_length_mean']:.1f}   entropy {r['entropy']:.3f}   {update}   "
                f"{r['rollout_tokens_per_s']:,.0f} rollout tokens/s")

    def _figure(self, out: RunDir) -> Path:
        from hyloom.plot import line_plot

        metrics = out.metrics()
        train = [r for r in metrics if "reward_mean" in r]
        line_plot(out.path / FIGURE, {
            "reward (mean)": [(r["step"], r["reward_mean"]) for r in train],
            "accuracy (samples)": [(r["step"], r["accuracy"]) for r in train],
            "held-out accuracy": [(r["step"], r["eval/accuracy"]) for r in metrics if "eval/accuracy" in r]},
            markers=("held-out accuracy",), xlabel="GRPO step", ylabel="reward / accuracy",
            title=f"{out.path}: GRPO")
        return out.path / FIGURE
