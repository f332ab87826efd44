"""What every trainer shares: the process group, the run directory (checkpoints, `latest`, metrics) and
the path from a blueprint to `trainer.fit`. Trainers themselves are plugins (`hyloom ls trainer`)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

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


RUN_FILES = ("latest", "metrics.jsonl", "loss.png", "tensorboard")


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


def train(blueprint, resolved: dict, *, resume: str | None = None, progress: bool = True, overwrite: bool = False):
    """Prepare the data, build the model and hand both to the blueprint's trainer. A run directory that
    already holds a run is continued only with `resume`, or emptied first with `overwrite`; else refused."""
    from hyloom.blueprint import blueprint_model
    from hyloom.data import prepare
    from hyloom.model import build_model
    from hyloom.registry import registry

    trainer_cfg = blueprint.train or _default(blueprint_model().model_fields["train"], {"type": "lm"})
    trainer = registry().get("trainer", trainer_cfg.type).build(trainer_cfg)
    if hasattr(trainer, "check"):  # what this trainer cannot train is refused before the data is prepared
        trainer.check(blueprint)
    out_dir = getattr(trainer_cfg, "out_dir", None)
    if out_dir is not None:
        _check_run_dir(RunDir(out_dir), resume, overwrite)
    env = init_distributed(getattr(trainer_cfg, "device", "auto"))
    if overwrite and out_dir is not None and env.main:
        RunDir(out_dir).clear()
    if env.main:  # rank 0 builds the data cache (defaults when the blueprint has no `data`); the others find it
        prepared = prepare(blueprint.data, progress=progress)
    env.barrier()
    if not env.main:
        prepared = prepare(blueprint.data, progress=False)
    ids_needed = prepared.manifest.get("vocab_size", prepared.tokenizer.vocab_size)  # + pre-tokenized ids (mqar)
    if ids_needed > blueprint.model.vocab_size:
        raise TrainingError(f"the data holds token ids up to {ids_needed - 1} (the tokenizer has "
                            f"{prepared.tokenizer.vocab_size}) but model.vocab_size is {blueprint.model.vocab_size}")
    torch.manual_seed(trainer_cfg.seed)
    model = build_model(blueprint, device=env.device)
    try:
        result = trainer.fit(model, prepared, TrainRun(blueprint, resolved, env, resume, progress))
    except BaseException:
        env.close(wait=False)  # another rank may never reach a barrier
        raise
    env.close()
    return result


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
