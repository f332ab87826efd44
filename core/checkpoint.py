"""Checkpoints: a directory of sharded safetensors in the Hugging Face layout, the resolved blueprint and
trainer state. Every write goes to a temporary sibling directory first and is renamed into place, so a crash
mid-save never destroys the previous checkpoint. Every read failure (a missing folder, a truncated shard, an
index without `weight_map`, tensors that do not fit the blueprint) is a CheckpointError naming the file.
torch is imported only where a function needs it, so the CLI can register the hf plugin (whose errors derive
from CheckpointError) without paying for torch."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml
from safetensors import SafetensorError, safe_open

from hyloom.blueprint import BlueprintError, Problem

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
BLUEPRINT = "blueprint.yaml"
SHOWN = 5  # problems of one kind listed before "... and N more"


class CheckpointError(BlueprintError):
    """A checkpoint or weights directory that cannot be read or does not fit its model. The CLI prints it
    (one screen: long lists of tensors are summarised) and exits with status 2."""

    title = "cannot load checkpoint"

    def __str__(self) -> str:
        return f"{self.title}:\n" + "\n".join(f"  {line}" for line in summarise(self.problems))


def summarise(problems: list[Problem], shown: int = SHOWN) -> list[str]:
    """One line per problem, except that of the problems sharing a file and message only the first `shown`
    are listed, then how many more there are."""
    groups: dict[tuple, list[Problem]] = {}
    for p in problems:
        groups.setdefault((p.file, p.message), []).append(p)
    lines = []
    for (_, message), group in groups.items():
        lines += [str(p) for p in group[:shown]]
        if len(group) > shown:
            lines.append(f"... and {len(group) - shown} more: {message}")
    return lines


def _fsync_tree(path: Path) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield an empty temporary directory; when the block succeeds it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():  # swap: the old one is removed only once the new one is in place
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_file_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_safetensors(folder: Path, state_dict: dict[str, torch.Tensor], max_shard_bytes: int = 2 << 30,
                     metadata: dict | None = None) -> None:
    """`model-0000k-of-0000n.safetensors` shards and `model.safetensors.index.json` (also for one shard, so
    every checkpoint has the same layout)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt", **(metadata or {})})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


# ---- reading -----------------------------------------------------------------------------------------------

def require_dir(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError([Problem("", "is not a directory" if folder.exists() else "does not exist",
                                       str(folder))])
    return folder


def weight_files(folder: str | Path, explicit: str | None = None) -> list[Path]:
    """The safetensors files holding a directory's weights, chosen as transformers chooses them: the file
    `explicit` names (config.json's `transformers_weights`), else `model.safetensors`, else the shards
    `model.safetensors.index.json` lists. Every file returned exists."""
    folder = require_dir(folder)
    if explicit is not None:
        return _index_files(folder / explicit) if explicit.endswith(".index.json") else [_existing(folder / explicit)]
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    if (folder / INDEX).is_file():
        return _index_files(folder / INDEX)
    pickled = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
    why = "only pickled weights (*.bin); convert them to safetensors first" if pickled else "no safetensors weights"
    raise CheckpointError([Problem("", f"{why} (expected {SINGLE} or {INDEX})", str(folder))])


def _existing(file: Path) -> Path:
    if not file.is_file():
        raise CheckpointError([Problem("", "does not exist", str(file))])
    return file


def _index_files(index: Path) -> list[Path]:
    try:
        data = json.loads(_existing(index).read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise CheckpointError([Problem("", f"is not valid JSON ({exc})", str(index))]) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError([Problem("weight_map", "missing or not a mapping of tensor name to shard file",
                                       str(index))])
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [Problem("weight_map", f"lists {f.name}, which does not exist", str(index)) for f in files
               if not f.is_file()]
    if missing:
        raise CheckpointError(missing)
    return files


@contextlib.contextmanager
def open_safetensors(file: Path):
    """safe_open, with a file that is not safetensors (truncated, garbage, empty) reported by name."""
    try:
        handle = safe_open(file, "pt")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError([Problem("", f"not a readable safetensors file ({exc})", str(file))]) from None
    with handle as f:
        yield f


def tensor_headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Tensor name → (the file holding it, its shape), from the headers alone."""
    found = {}
    for file in files:
        with open_safetensors(file) as f:
            found.update({name: (file, tuple(f.get_slice(name).get_shape())) for name in f.keys()})
    return found


def load_safetensors(folder: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    state = {}
    for file in weight_files(folder):
        with open_safetensors(file) as f:
            state.update({name: f.get_tensor(name).to(device) for name in f.keys()})
    return state


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], where: str,
                     what: str = "the blueprint") -> None:
    """Refuse tensors that are missing, unexpected or of the wrong shape, all at once."""
    problems = [Problem(k, "missing from the checkpoint", where) for k in expected if k not in found]
    problems += [Problem(k, f"not a tensor of the model {what} describes", where) for k in found if k not in expected]
    problems += [Problem(k, f"shape {tuple(t.shape)} but {what} implies {tuple(expected[k].shape)}", where)
                 for k, t in found.items() if k in expected and t.shape != expected[k].shape]
    if problems:
        raise CheckpointError(problems)


# ---- checkpoints -------------------------------------------------------------------------------------------

def save_checkpoint(path: str | Path, model, blueprint: dict, *, trainer_state: dict | None = None,
                    extra_files: dict[str, str] | None = None, max_shard_bytes: int = 2 << 30) -> Path:
    """Write weights, the resolved blueprint, optional trainer state (torch.save'd dict, in `trainer/`)
    and extra text files, atomically."""
    import torch

    path = Path(path)
    with atomic_dir(path) as tmp:
        save_safetensors(tmp, model.state_dict(), max_shard_bytes)
        (tmp / BLUEPRINT).write_text(yaml.safe_dump(blueprint, sort_keys=False))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if trainer_state is not None:
            (tmp / "trainer").mkdir()
            torch.save(trainer_state, tmp / "trainer" / "state.pt")
    return path


@contextlib.contextmanager
def parameters_on_meta():
    """Inside this block every parameter moves to the meta device as it is registered, while buffers stay
    where the constructor made them: a model built here allocates no weights, yet its non-persistent
    buffers (constants the constructor computes) hold real values. Parameters are still created by
    their modules, as `torch.empty` on the current device, so each exists only briefly and is never filled."""
    from torch import nn

    register = nn.Module.register_parameter

    def to_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            meta = type(param)(param.to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)  # attributes a module tags its parameters with
            module._parameters[name] = meta

    nn.Module.register_parameter = to_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def load_checkpoint(path: str | Path, *, device: str = "cpu", dtype=None, overrides=()):
    """(model, validated blueprint) from a checkpoint directory. The model is built without initialising
    its weights (they come from the checkpoint); non-persistent buffers get the values its constructor
    computes on `device` (docs/design.md, Checkpoints)."""
    from hyloom.blueprint import load_blueprint
    from hyloom.model import build_model

    path = require_dir(path)
    if not (path / BLUEPRINT).is_file():
        raise CheckpointError([Problem("", f"not a hyloom checkpoint (no {BLUEPRINT})", str(path))])
    bp = load_blueprint(str(path / BLUEPRINT), overrides)
    with parameters_on_meta():
        model = build_model(bp, device=device)
    state = load_safetensors(path, device=device)
    check_state_dict(model.state_dict(), state, str(path), f"{BLUEPRINT}")
    model.load_state_dict(state, strict=True, assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a buffer the constructor derived from a (then meta) parameter
        raise CheckpointError([Problem(name, "still on the meta device after loading: a non-persistent buffer "
                                             "must be computed from the config alone, not from parameters",
                                       str(path)) for name in left])
    return (model.to(dtype) if dtype is not None else model), bp


def load_trainer_state(path: str | Path) -> dict | None:
    import torch

    file = Path(path) / "trainer" / "state.pt"
    return torch.load(file, map_location="cpu", weights_only=False) if file.exists() else None
