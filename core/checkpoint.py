"""Checkpoints: a directory of sharded safetensors in the Hugging Face layout, the resolved blueprint and
trainer state. Every write goes to a temporary sibling directory first and is renamed into place, so a crash
mid-save never destroys the previous checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
BLUEPRINT = "blueprint.yaml"


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


def load_safetensors(folder: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    folder = Path(folder)
    if (folder / INDEX).exists():
        files = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
    elif (folder / SINGLE).exists():
        files = [SINGLE]
    else:
        raise FileNotFoundError(f"{folder}: no {SINGLE} or {INDEX}")
    state = {}
    for name in files:
        state.update(load_file(folder / name, device=device))
    return state


def save_checkpoint(path: str | Path, model, blueprint: dict, *, trainer_state: dict | None = None,
                    extra_files: dict[str, str] | None = None, max_shard_bytes: int = 2 << 30) -> Path:
    """Write weights, the resolved blueprint, optional trainer state (torch.save'd dict, in `trainer/`)
    and extra text files, atomically."""
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


def load_checkpoint(path: str | Path, *, device: str = "cpu", dtype=None, overrides=()):
    """(model, validated blueprint) from a checkpoint directory."""
    from hyloom.blueprint import load_blueprint
    from hyloom.model import build_model

    path = Path(path)
    bp = load_blueprint(str(path / BLUEPRINT), overrides)
    model = build_model(bp, device="meta")
    model.load_state_dict(load_safetensors(path, device=device), strict=True, assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # mixers keep derived constants out of buffers so that everything real is in the checkpoint
        raise RuntimeError(f"{path}: not restored from the checkpoint: {', '.join(left)}")
    return (model.to(dtype) if dtype is not None else model), bp


def load_trainer_state(path: str | Path) -> dict | None:
    file = Path(path) / "trainer" / "state.pt"
    return torch.load(file, map_location="cpu", weights_only=False) if file.exists() else None
