"""The teacher of a conversion: where it comes from, whether a student can be made from it, and loading it frozen.

A teacher is a hyloom checkpoint (or a run directory: its newest checkpoint) or a Hugging Face Llama/Qwen3
directory, which goes through the `import-hf` conversion into a temporary checkpoint (so it is read exactly as
`hyloom import-hf` reads it) and is then loaded from there.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hyloom.blueprint import BlueprintError, Problem
from hyloom.errors import SetupError

# model keys a student must share with its teacher for the weights outside the mixers to be copied as they are
SHARED_KEYS = ("d_model", "n_layers", "vocab_size", "ffn", "norm", "tie_embeddings", "scale_emb", "scale_depth",
               "dim_model_base", "causal")


def teacher_kind(path: str | Path) -> tuple[str, Path]:
    """("hf", folder) for a Hugging Face directory, ("hyloom", checkpoint folder) otherwise."""
    from hyloom.checkpoint import BLUEPRINT
    from hyloom.train import checkpoint_dir

    folder = Path(path).expanduser()
    if not folder.exists():
        raise SetupError(f"teacher {path}: does not exist (expected a hyloom checkpoint or run directory, or a "
                         "Hugging Face Llama/Qwen3 directory)")
    if folder.is_dir() and (folder / "config.json").is_file() and not (folder / BLUEPRINT).is_file():
        return "hf", folder
    try:
        return "hyloom", checkpoint_dir(folder)
    except SetupError:
        raise SetupError(f"teacher {path}: neither a hyloom checkpoint (no {BLUEPRINT}), a run directory with "
                         "checkpoints, nor a Hugging Face directory (no config.json)") from None


def teacher_spec(path: str | Path):
    """The teacher's validated `model` section, read without loading any weight."""
    from hyloom.blueprint import Loaded, load_blueprint, validate
    from hyloom.checkpoint import BLUEPRINT

    kind, folder = teacher_kind(path)
    if kind == "hyloom":
        return load_blueprint(str(folder / BLUEPRINT)).model
    from hyloom.plugins.hf.convert import pick_import_format, read_config

    config = read_config(folder)
    source = str(folder / "config.json")
    return validate(Loaded(pick_import_format(config).blueprint(config, source), source)).model


def load_teacher(path: str | Path, *, device, dtype=None):
    """The teacher model, frozen (no parameter requires a gradient) and in eval mode, on `device` in `dtype`."""
    from hyloom.checkpoint import load_checkpoint

    kind, folder = teacher_kind(path)
    if kind == "hf":
        from hyloom.plugins.hf.convert import import_hf

        with tempfile.TemporaryDirectory(prefix="hyloom-teacher-") as tmp:
            import_hf(folder, Path(tmp) / "checkpoint")
            model, _ = load_checkpoint(Path(tmp) / "checkpoint", device=str(device), dtype=dtype)
    else:
        model, _ = load_checkpoint(folder, device=str(device), dtype=dtype)
    model.requires_grad_(False)
    return model.eval()


def teacher_tokenizer(path: str | Path) -> str | None:
    """The text of the teacher's tokenizer.json, when it has one."""
    file = teacher_kind(path)[1] / "tokenizer.json"
    return file.read_text() if file.is_file() else None


def _dump(value):
    return value.model_dump(exclude_none=True) if hasattr(value, "model_dump") else value


def _attention_shape(cfg, d_model: int) -> dict | None:
    """heads, kv_heads, head_dim, qk_norm of a GQA attention config (attention, infllm_v2), or None."""
    if not all(hasattr(cfg, k) for k in ("heads", "kv_heads", "qk_norm")):
        return None
    return {"heads": cfg.heads, "kv_heads": cfg.kv_heads or cfg.heads,
            "head_dim": getattr(cfg, "head_dim", None) or d_model // cfg.heads, "qk_norm": cfg.qk_norm}


def check_fits(teacher, student, teacher_path: str | Path) -> None:
    """Refuse, naming both values, a student (validated `model` section) whose weights cannot be made from the
    teacher's: shared sizes, FFN and norms must be equal; each linear twin needs the teacher layer's query heads and
    head size (its K/V heads are repeated to them); each kept attention layer needs the teacher layer's heads,
    K/V heads, head size and QK-norm."""
    from hyloom.registry import registry

    where = f"teacher {teacher_path}"
    problems = [Problem(f"model.{k}", f"{_dump(getattr(student, k))!r}, but the teacher's is "
                                      f"{_dump(getattr(teacher, k))!r}", where)
                for k in SHARED_KEYS if _dump(getattr(student, k)) != _dump(getattr(teacher, k))]
    if problems:  # with other layer counts or widths the per-layer comparison says nothing useful
        raise BlueprintError(problems)
    t_rope, s_rope = (getattr(p.position, "rope_theta", None) for p in (teacher, student))
    if t_rope is not None and s_rope is not None and t_rope != s_rope:
        problems.append(Problem("model.position.rope_theta", f"{s_rope}, but the teacher's RoPE base is {t_rope}: "
                                "the transferred q/k would be rotated at other frequencies", where))
    for i, (t_cfg, s_cfg) in enumerate(zip(teacher.layers, student.layers)):
        key = f"model.mixers.{student.layout[i]} (layer {i})"
        t = _attention_shape(t_cfg, teacher.d_model)
        if t is None:
            problems.append(Problem(key, f"the teacher's layer {i} is {t_cfg.type!r}, not a GQA attention layer: "
                                         "there is nothing to transfer from", where))
            continue
        family = registry().get("mixer", s_cfg.type).capabilities.family
        s = _attention_shape(s_cfg, student.d_model)
        if family == "linear":
            if s_cfg.type != "lightning":
                problems.append(Problem(key, f"{s_cfg.type!r}: only a lightning twin can be made from attention",
                                        where))
                continue
            s_dim = s_cfg.head_dim or student.d_model // s_cfg.heads
            for name, mine, theirs in (("heads", s_cfg.heads, t["heads"]), ("head_dim", s_dim, t["head_dim"])):
                if mine != theirs:
                    problems.append(Problem(f"{key}.{name}", f"{mine}, but the teacher's layer {i} has {name} "
                                                             f"{theirs} (a twin has one head per query head)", where))
        elif s is None:
            problems.append(Problem(key, f"{s_cfg.type!r}: no weight transfer from attention into it", where))
        else:
            for name in ("heads", "kv_heads", "head_dim", "qk_norm"):
                if s[name] != t[name]:
                    problems.append(Problem(f"{key}.{name}", f"{s[name]}, but the teacher's layer {i} has "
                                                             f"{t[name]} (a kept layer copies it exactly)", where))
    if problems:
        raise BlueprintError(problems)


def check_tokenizer(teacher_path: str | Path, data_dir: Path) -> None:
    """Refuse data tokenized otherwise than the teacher was trained (when the teacher names its tokenizer): the
    student would be taught the teacher's answers to other tokens."""
    theirs = teacher_tokenizer(teacher_path)
    mine = data_dir / "tokenizer.json"
    if theirs is None or not mine.is_file():
        return
    if json.loads(theirs).get("model") != json.loads(mine.read_text()).get("model"):
        raise SetupError(f"the data's tokenizer ({mine}) is not the teacher's ({teacher_path}): tokenize the data "
                         f"with it, data.tokenizer: {{type: file, path: {teacher_kind(teacher_path)[1]}}}")
