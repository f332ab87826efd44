"""What every trainer shares: the process group, the run directory (checkpoints, `latest`, metrics) and
the path from a blueprint to `trainer.fit`. Trainers themselves are plugins (`hyloom ls trainer`)."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from hyloom.checkpoint import BLUEPRINT, load_safetensors, load_trainer_state, save_checkpoint, write_file_atomic
from hyloom.errors import SetupError, TrainingError  # noqa: F401 (hyloom.train's errors, defined without torch)


def pick_device(name: str = "auto", what: str = "device", local_rank: int | None = None) -> torch.device:
    """`auto` (CUDA when there is one, else the CPU), `cpu`, `cuda` or `cuda:N`; under torchrun (`local_rank`
    given) `cuda` means this process's GPU. `what` names the setting in errors (`train.device`, `--device`)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SetupError(f"{what}: {name!r} is not a device; expected auto, cpu, cuda or cuda:N")
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise SetupError(f"{what}: {name!r}, but this torch ({torch.__version__}) sees no CUDA device")
    if local_rank is not None:
        if device.index is not None:
            raise SetupError(f"{what}: {name!r} names one GPU, but torchrun gives each process its own; use cuda")
        return torch.device(f"cuda:{local_rank}")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise SetupError(f"{what}: {name!r}, but there are {torch.cuda.device_count()} CUDA devices")
    return device


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self, wait: bool = True) -> None:
        """Leave the process group (together, when `wait`): a rank that exits while gloo still talks to it aborts."""
        if self.world > 1 and dist.is_initialized():
            if wait:
                dist.barrier()
            dist.destroy_process_group()

    def mean(self, value: float) -> float:
        """The mean of a scalar over ranks (every rank gets it)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world


def init_distributed(device: str = "auto", what: str = "train.device") -> Dist:
    """One process, or the process group torchrun describes (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=pick_device(device, what))
    chosen = pick_device(device, what, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    cuda = chosen.type == "cuda"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(chosen)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=chosen)


STAGES_FILE = "stages.json"  # in a staged run's out_dir: the finished stages and their final checkpoints
# what trainers write beside their checkpoints (the grpo trainer: completions.jsonl, rewards.png, the KL reference)
RUN_FILES = ("latest", "metrics.jsonl", "loss.png", "tensorboard", STAGES_FILE, "completions.jsonl", "rewards.png",
             "reference.safetensors")


class RunDir:
    """runs/NAME/: checkpoint-000100/ ..., `latest` (name of the newest complete checkpoint), metrics.jsonl."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def checkpoints(self) -> list[Path]:
        return sorted(p for p in self.path.glob("checkpoint-*") if p.is_dir() and not p.name.startswith("."))

    def latest(self) -> Path | None:
        pointer = self.path / "latest"
        if pointer.exists() and (self.path / pointer.read_text().strip()).is_dir():
            return self.path / pointer.read_text().strip()
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, step: int, model, blueprint: dict, trainer_state: dict, keep: int,
             extra_files: dict[str, str] | None = None) -> Path:
        path = save_checkpoint(self.path / f"checkpoint-{step:06d}", model, blueprint, trainer_state=trainer_state,
                               extra_files=extra_files)
        write_file_atomic(self.path / "latest", path.name)
        for old in self.checkpoints()[:-keep]:
            shutil.rmtree(old)
        return path

    def in_use(self) -> list[str]:
        """What a run has written here (names), empty for a new or unrelated folder."""
        return sorted(p.name for p in self.path.glob("*") if p.name in RUN_FILES or p.name.startswith("checkpoint-"))

    def clear(self) -> None:
        """Remove what a run writes (checkpoints, `latest`, metrics, figure, logs); leave any other file alone."""
        for p in self.path.glob("*"):
            if p.name in RUN_FILES or p.name.startswith(("checkpoint-", ".checkpoint-")):
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()

    def log(self, record: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def forget_after(self, step: int, names=("metrics.jsonl",)) -> None:
        """Drop what a stopped run logged after `step` (everything on a fresh start, step 0) from its JSONL logs, so
        that a resumed run continues them without duplicate steps. Each file is rewritten atomically."""
        for name in names:
            file = self.path / name
            if file.exists():
                kept = [line for line in file.read_text().splitlines() if json.loads(line)["step"] <= step]
                write_file_atomic(file, "".join(line + "\n" for line in kept))

    def metrics(self) -> list[dict]:
        file = self.path / "metrics.jsonl"
        return [json.loads(line) for line in file.read_text().splitlines()] if file.exists() else []


def checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory's newest checkpoint (its `latest`): what `generate`, `eval`
    and `export-hf` accept."""
    folder = Path(path)
    if not folder.is_dir():
        raise SetupError(f"{path}: {'not a folder' if folder.exists() else 'does not exist'}")
    if (folder / BLUEPRINT).exists():
        return folder
    latest = RunDir(folder).latest()
    if latest is None:
        raise SetupError(f"{path}: neither a checkpoint (no {BLUEPRINT}) nor a run directory with checkpoints")
    return latest


def open_checkpoint(path: str | Path, device: str | None = "auto", *, refuse=None):
    """What `generate` and `eval` start from: (checkpoint, model on the device, blueprint, tokenizer, device).
    A run directory means its newest checkpoint, named on stderr. `refuse(blueprint, path)` may raise before
    the tokenizer is read."""
    import sys

    from hyloom.blueprint import BlueprintError, Problem
    from hyloom.checkpoint import load_checkpoint
    from hyloom.registry import registry

    found = checkpoint_dir(path)
    if found != Path(path):
        print(f"checkpoint: {found}", file=sys.stderr)
    device = pick_device(device or "auto", "--device")
    tokenizer_file = found / "tokenizer.json"
    if not tokenizer_file.exists():
        raise BlueprintError([Problem("", "no tokenizer.json in this checkpoint", str(found))])
    model, bp = load_checkpoint(found, device=str(device))
    if refuse is not None:
        refuse(bp, found)
    file_tokenizer = registry().get("tokenizer", "file")
    return found, model, bp, file_tokenizer.build(file_tokenizer.config(path=str(tokenizer_file))), device


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW parameter groups of every trainer: weight decay on matrices only (not norms, gains, biases)."""
    matrices = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    others = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": matrices, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]


def make_optimizer(model, *, lr, betas, weight_decay, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the fused implementation (one kernel for all parameters) on CUDA: a small
    model's step is otherwise a few hundred kernel launches (the GRPO update, bench/grpo_step.py)."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=device.type == "cuda")


def rng_state() -> dict:
    """The host RNGs a trainer saves in its checkpoint, so a resumed run draws what the whole run drew."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def resume_point(run: RunDir, resume: str | None) -> Path | None:
    """`--resume auto`: the newest checkpoint of this run if there is one; a path: that checkpoint."""
    if resume in (None, "", "never"):
        return None
    if resume == "auto":
        return run.latest()
    path = Path(resume)
    if not (path / BLUEPRINT).exists():
        raise SetupError(f"--resume {resume}: not a checkpoint directory (no {BLUEPRINT})")
    return path


def saved_blueprint(path: Path) -> dict:
    """The resolved blueprint a checkpoint was saved with."""
    return yaml.safe_load((path / BLUEPRINT).read_text()) or {}


def restore(path: Path, model, resolved: dict) -> dict:
    """Load a checkpoint's weights into `model` (in place) and return its trainer state. The checkpoint must
    come from the same model: resuming into another architecture is refused with the keys that differ."""
    saved = saved_blueprint(path).get("model", {})
    differ = sorted(k for k in set(saved) | set(resolved["model"]) if saved.get(k) != resolved["model"].get(k))
    if differ:
        raise SetupError(f"cannot resume from {path}: its model differs in {', '.join('model.' + k for k in differ)}")
    model.load_state_dict(load_safetensors(path, device=str(next(model.parameters()).device)))
    state = load_trainer_state(path)
    if state is None:
        raise TrainingError(f"{path} has no trainer/ state to resume from")
    return state


def resume_training(point: Path | None, model, resolved: dict, opt, steps: int,
                    steps_setting: str = "train.steps") -> dict | None:
    """Continue a run from checkpoint `point` (None: a fresh start, nothing done): the weights (`restore`), the
    optimizer's moments and the host RNGs, so the next step is the one the uninterrupted run would have taken.
    Returns the checkpoint's trainer state: its "step" is where to start, and the caller restores from it what
    is its own (the loader's or the prompt order's position). A checkpoint already at `steps` is refused, naming
    `steps_setting` as the setting to raise: the run would take no step."""
    if point is None:
        return None
    state = restore(point, model, resolved)
    if state["step"] >= steps:
        raise SetupError(f"{point} is at step {state['step']}, and {steps_setting} is {steps}: nothing left to train. "
                         f"Raise {steps_setting} to continue the run")
    opt.load_state_dict(state["optimizer"])
    for group in opt.param_groups:  # the saved groups name the implementation of the run that saved them
        group["fused"] = opt.defaults["fused"]
    set_rng_state(state["rng"])
    return state


def train(blueprint, resolved: dict, *, resume: str | None = None, progress: bool = True, overwrite: bool = False):
    """Prepare the data, build the model and hand both to the blueprint's trainer; a blueprint with `stages`
    runs them in order (`train_stages`). A run directory that already holds a run is continued only with
    `resume`, or emptied first with `overwrite`; else refused."""
    from hyloom.blueprint import blueprint_model
    from hyloom.model import build_model

    if blueprint.stages is not None:
        return train_stages(blueprint, resolved, resume=resume, progress=progress, overwrite=overwrite)
    trainer_cfg = blueprint.train or _default(blueprint_model().model_fields["train"], {"type": "lm"})
    trainer = _trainer(trainer_cfg, blueprint)
    out_dir = getattr(trainer_cfg, "out_dir", None)
    if out_dir is not None:
        _check_run_dir(RunDir(out_dir), resume, overwrite)
    env = init_distributed(getattr(trainer_cfg, "device", "auto"))
    if overwrite and out_dir is not None and env.main:
        RunDir(out_dir).clear()
    try:
        prepared = _prepare(blueprint, env, progress)
        torch.manual_seed(trainer_cfg.seed)
        model = build_model(blueprint, device=env.device)
        result = trainer.fit(model, prepared, TrainRun(blueprint, resolved, env, resume, progress,
                                                       out_dir=Path(out_dir) if out_dir is not None else None))
    except BaseException:
        env.close(wait=False)  # another rank may never reach a barrier
        raise
    env.close()
    return result


def _trainer(cfg, blueprint):
    from hyloom.registry import registry

    trainer = registry().get("trainer", cfg.type).build(cfg)
    data = getattr(blueprint, "data", None)
    if data is not None and data.seq_len > blueprint.model.max_seq_len and os.environ.get("RANK", "0") == "0":
        print(f"hyloom: warning: data.seq_len ({data.seq_len}) is longer than model.max_seq_len "
              f"({blueprint.model.max_seq_len}): the model is trained on sequences longer than it is meant for "
              "(raise model.max_seq_len, or lower data.seq_len)", file=sys.stderr, flush=True)
    if hasattr(trainer, "check"):  # what this trainer cannot train is refused before the data is prepared
        trainer.check(blueprint)
    return trainer


def _prepare(blueprint, env: Dist, progress: bool):
    """The blueprint's data: rank 0 builds the cache (defaults when the blueprint has no `data`), the others
    find it; refused when it holds token ids the model has no embedding for."""
    from hyloom.data import prepare

    if env.main:
        prepared = prepare(blueprint.data, progress=progress)
    env.barrier()
    if not env.main:
        prepared = prepare(blueprint.data, progress=False)
    ids_needed = prepared.manifest.get("vocab_size", prepared.tokenizer.vocab_size)  # + pre-tokenized ids (mqar)
    if ids_needed > blueprint.model.vocab_size:
        raise TrainingError(f"the data holds token ids up to {ids_needed - 1} (the tokenizer has "
                            f"{prepared.tokenizer.vocab_size}) but model.vocab_size is {blueprint.model.vocab_size}")
    return prepared


# ---- stages ------------------------------------------------------------------------------------------------

DEFAULT_STAGED_OUT = "runs/train"


def stage_blueprint(resolved: dict, index: int, model: dict, out_dir: Path):
    """(validated blueprint, its resolved dict) that stage `index` runs as and saves in its checkpoints: a
    one-stage blueprint of the given model, the stage's trainer (writing to out_dir/<name>) and its data."""
    from hyloom.blueprint import blueprint_model
    from hyloom.registry import registry

    stage = resolved["stages"][index]
    train = dict(stage["train"])
    if "out_dir" in registry().get("trainer", train["type"]).config.model_fields:
        train["out_dir"] = str(out_dir / stage["name"])
    data = stage["data"] if stage["data"] is not None else resolved["data"]
    bp = blueprint_model().model_validate({"model": model, "data": data, "train": train,
                                           "requires": resolved["requires"]})
    return bp, bp.model_dump(mode="json")


def _init_point(stage, index: int) -> Path | None:
    if stage.init is None:
        return None
    from hyloom.blueprint import BlueprintError, Problem

    try:
        return checkpoint_dir(stage.init)
    except SetupError as exc:
        raise BlueprintError([Problem(f"stages.{index}.init", f"{exc}; expected a checkpoint or a run directory "
                                                            "with one")]) from None


def _finished(out: Path, names: list[str]) -> list[dict]:
    """The finished stages stages.json records; they must be the first stages of the blueprint, in order."""
    file = out / STAGES_FILE
    if not file.exists():
        return []
    try:
        done = json.loads(file.read_text())["finished"]
        recorded = [d["name"] for d in done]
    except (ValueError, KeyError, TypeError):
        raise SetupError(f"{file}: not a stages record of hyloom (expected {{\"finished\": [...]}}); "
                         "start over with --overwrite or train into another folder with --out") from None
    if recorded != names[:len(recorded)]:
        raise SetupError(f"{file}: this run finished stages {', '.join(recorded)}, but the blueprint's stages are "
                         f"{', '.join(names)}: it was made by another blueprint. Start over with --overwrite or "
                         "train into another folder with --out")
    for d in done:
        if not (out / d["checkpoint"] / BLUEPRINT).exists():
            raise SetupError(f"{file}: stage {d['name']!r} finished with {out / d['checkpoint']}, which is gone; "
                             "start over with --overwrite")
    return done


def _check_staged_dir(out: Path, names: list[str], done: list[dict], resume: str | None, overwrite: bool) -> None:
    if overwrite and resume not in (None, "", "never"):
        raise SetupError("--overwrite starts the run over, --resume continues it: give one of them")
    if resume not in (None, "", "never", "auto"):
        raise SetupError(f"--resume {resume}: a blueprint with stages resumes with --resume auto (at its first "
                         "unfinished stage, from that stage's last checkpoint); to start a stage from a given "
                         "checkpoint, give that stage init: PATH")
    used = RunDir(out).in_use() + [f"{n}/{f}" for n in names for f in RunDir(out / n).in_use()]
    if used and not overwrite and resume != "auto":
        listed = ", ".join(used[:4]) + (f" and {len(used) - 4} more" if len(used) > 4 else "")
        raise SetupError(f"{out} already holds a run ({listed}). Continue it with --resume auto, start it over "
                         f"with --overwrite (deletes those), or train into another folder with --out")
    if resume == "auto":  # a stage after the one to resume has outputs only if they came from another run
        later = [f"{n}/{f}" for n in names[len(done) + 1:] for f in RunDir(out / n).in_use()]
        if later:
            raise SetupError(f"{out}: stage {names[len(done)]!r} has not finished, yet a later stage's folder holds "
                             f"{', '.join(later[:4])}: those came from another run. Start over with --overwrite")


def train_stages(blueprint, resolved: dict, *, resume: str | None = None, progress: bool = True,
                 overwrite: bool = False):
    """Run a blueprint's stages in order, stage NAME in out_dir/NAME/. Stage 0 starts from a fresh model,
    each later one from the previous stage's final checkpoint: the model its blueprint describes (so a stage
    may change the model by saving another one), with its weights; `init` overrides. out_dir/stages.json
    records each finished stage, and `resume="auto"` skips those and resumes the first unfinished one from
    its own last checkpoint. Returns the last stage's result, with `stage` set to its name."""
    import time

    from hyloom.model import build_model

    out = Path(blueprint.out_dir or DEFAULT_STAGED_OUT)
    names = [s.name for s in blueprint.stages]
    inits = [_init_point(s, i) for i, s in enumerate(blueprint.stages)]
    trainers, checked, settings = [], [], []
    for i, stage in enumerate(blueprint.stages):  # every stage's trainer refuses what it cannot do, up front
        model = saved_blueprint(inits[i])["model"] if inits[i] else resolved["model"]
        bp, stage_resolved = stage_blueprint(resolved, i, model, out)
        trainers.append(_trainer(bp.train, bp))
        checked.append(model)
        settings.append(stage_resolved["train"])
    done = _finished(out, names) if resume == "auto" else []
    _check_staged_dir(out, names, done, resume, overwrite)
    for d, now in zip(done, settings):
        changed = [f"train.{k}" for k in sorted(set(d["train"]) | set(now)) if d["train"].get(k) != now.get(k)]
        if changed and os.environ.get("RANK", "0") == "0":
            print(f"stage {d['name']}: finished with other {', '.join(changed)}; it is not run again (a finished "
                  "stage is kept as it is: --overwrite starts the whole run over)", flush=True)
    if len(done) == len(names):
        raise SetupError(f"{out}: every stage of this run has finished ({', '.join(names)}; final checkpoint "
                         f"{out / done[-1]['checkpoint']}): nothing left to train. Add a stage to go on, or start "
                         "over with --overwrite")
    env = init_distributed(getattr(blueprint.stages[len(done)].train, "device", "auto"))
    if overwrite and env.main:
        for folder in [out] + [out / n for n in names]:
            RunDir(folder).clear()
    result = None
    try:
        for i in range(len(done), len(names)):
            stage = blueprint.stages[i]
            start = inits[i] or (out / done[-1]["checkpoint"] if done else None)
            model_section = saved_blueprint(start)["model"] if start else resolved["model"]
            bp, stage_resolved = stage_blueprint(resolved, i, model_section, out)
            if env.main:
                print(f"stage {i + 1}/{len(names)} {stage.name}: {bp.train.type} trainer in {out / stage.name}, "
                      f"from {start or 'a fresh model'}", flush=True)
            trainer = trainers[i] if model_section == checked[i] else _trainer(bp.train, bp)
            prepared = _prepare(bp, env, progress)
            torch.manual_seed(getattr(bp.train, "seed", 0))
            model = build_model(bp, device=env.device)
            if start is not None:
                _load_weights(model, start, env.device)
            began = time.perf_counter()
            result = trainer.fit(model, prepared, TrainRun(bp, stage_resolved, env, resume if i == len(done) else None,
                                                           progress, out_dir=out / stage.name, stage=stage.name,
                                                           init=start))
            final = RunDir(out / stage.name).latest()
            if final is None:
                raise TrainingError(f"stage {stage.name!r}: its {bp.train.type} trainer saved no checkpoint in "
                                    f"{out / stage.name}, and the next stage starts from one")
            done.append({"name": stage.name, "checkpoint": str(final.relative_to(out)),
                         "train": stage_resolved["train"]})
            if env.main:
                write_file_atomic(out / STAGES_FILE, json.dumps({"finished": done}, indent=1) + "\n")
                print(f"stage {i + 1}/{len(names)} {stage.name}: done in {time.perf_counter() - began:.1f} s, "
                      f"checkpoint {final}", flush=True)
            env.barrier()
    except BaseException:
        env.close(wait=False)  # another rank may never reach a barrier
        raise
    env.close()
    return {**result, "stage": names[-1], "stages": len(names)}


def _load_weights(model, path: Path, device) -> None:
    """A checkpoint's weights into a model built from its blueprint (so they fit, unless the files changed)."""
    from hyloom.checkpoint import check_state_dict

    state = load_safetensors(path, device=str(device))
    check_state_dict(model.state_dict(), state, str(path), BLUEPRINT)
    model.load_state_dict(state)


def _check_run_dir(run: RunDir, resume: str | None, overwrite: bool) -> None:
    if overwrite and resume not in (None, "", "never"):
        raise SetupError("--overwrite starts the run over, --resume continues it: give one of them")
    used = run.in_use()
    if used and not overwrite and resume in (None, "", "never"):
        listed = ", ".join(used[:4]) + (f" and {len(used) - 4} more" if len(used) > 4 else "")
        raise SetupError(f"{run.path} already holds a run ({listed}). Continue it with --resume auto, start it over "
                         f"with --overwrite (deletes those), or train into another folder with --out")


def _default(field, data: dict):
    """Validate `data` as the non-None member of an optional blueprint section."""
    from pydantic import TypeAdapter

    options = getattr(field.annotation, "__args__", None) or (field.annotation,)
    return TypeAdapter(next(o for o in options if o is not type(None))).validate_python(data)


@dataclass
class TrainRun:
    """What `fit` gets besides the model and data."""

    blueprint: object
    resolved: dict  # the resolved blueprint, saved in every checkpoint
    env: Dist
    resume: str | None
    progress: bool
    out_dir: Path | None = None  # where the trainer writes: its config's out_dir; a stage's is out_dir/<name>, set
    # there too when the config has the field
    stage: str | None = None  # the stage's name; None for a blueprint with plain `train`
    init: Path | None = None  # the checkpoint the model's weights were loaded from; None: a freshly built model
