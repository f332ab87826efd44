"""Moving weights between a Hugging Face directory and a hyloom checkpoint, one tensor at a time.

Import fills a model built on the meta device shard by shard (so a large model is in memory once, not
twice) and writes it with `save_checkpoint`. Export never builds a model: it renames the tensors of each
stored shard and writes HF shards as it goes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from hyloom.blueprint import Problem, load_blueprint
from hyloom.blueprint.load import Loaded
from hyloom.checkpoint import (BLUEPRINT, INDEX, SINGLE, atomic_dir, open_safetensors, require_dir, save_checkpoint,
                               tensor_headers, weight_files)
from hyloom.plugins.hf.formats import DERIVED_HF_KEY, DTYPE_NAMES, ConversionError, HFFormat, formats

# Copied verbatim both ways when present (binary files included, e.g. a sentencepiece tokenizer.model).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
DTYPES = {name: getattr(torch, dtype) if dtype else None for name, dtype in DTYPE_NAMES.items()}


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '100KiB' or a number of bytes (decimal units, as transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise ConversionError([Problem("--max-shard-size", f"expected e.g. 5GB, 500MB or bytes, got {text!r}")])
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_KMGT".index(m.group(2).upper() or "_"))


def read_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise ConversionError([Problem("", "is not a directory" if folder.exists() else "does not exist", str(folder))])
    file = folder / "config.json"
    if not file.is_file():
        raise ConversionError([Problem("", "no config.json: not a Hugging Face model directory", str(folder))])
    try:
        config = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ConversionError([Problem("", f"is not valid JSON ({exc})", str(file))]) from None
    if not isinstance(config, dict):
        raise ConversionError([Problem("", "must hold a JSON object", str(file))])
    return config


def shard_files(folder: Path, config: dict) -> list[Path]:
    """The safetensors files transformers would load from `folder` (see checkpoint.weight_files)."""
    explicit = config.get("transformers_weights")
    if explicit is not None and not (isinstance(explicit, str) and explicit.endswith((".safetensors", ".index.json"))
                                     and Path(explicit).name == explicit):
        raise ConversionError([Problem("transformers_weights", "must name a *.safetensors or *.safetensors.index.json "
                                                               "file in the model directory", str(folder / "config.json"))])
    return weight_files(folder, explicit)


def _check_target(src: Path, out: Path, marker: str) -> None:
    """`out` is replaced as a whole, so only an earlier output of the same command may stand there."""
    if out.resolve() == src.resolve():
        raise ConversionError([Problem("", "the output directory must differ from the input", str(out))])
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).is_file())):
        raise ConversionError([Problem("", f"exists and is not an earlier output (no {marker}); "
                                           "refusing to replace it", str(out))])


def _copy_tokenizer(src: Path, dest: Path) -> list[str]:
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    for name in copied:
        shutil.copyfile(src / name, dest / name)
    return copied


# ---- import ------------------------------------------------------------------------------------------------

@dataclass
class ImportSummary:
    format: str
    blueprint: object
    parameters: int
    dtypes: list[str]
    shards_read: int
    tokenizer_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def pick_import_format(config: dict, name: str = "auto") -> HFFormat:
    known = formats()
    if name != "auto":
        if name not in known:
            raise ConversionError([Problem("--format", f"unknown format {name!r} (known: {', '.join(known)})")])
        return known[name]
    model_type = config.get("model_type")
    if model_type is None:
        raise ConversionError([Problem("model_type", "missing; pass --format to say which format this is",
                                       "config.json")])
    for fmt in known.values():
        if model_type in fmt.model_types:
            return fmt
    readable = sorted(t for f in known.values() for t in f.model_types)
    raise ConversionError([Problem("model_type", f"{model_type!r} is not supported (supported: "
                                                 f"{', '.join(readable)}); pass --format if it is a variant",
                                   "config.json")])


def import_hf(src: str | Path, out: str | Path, *, format: str = "auto", dtype: str = "auto",
              max_shard_bytes: int = 2 << 30) -> ImportSummary:
    """Convert the HF checkpoint directory `src` into a hyloom checkpoint at `out` (written atomically),
    loading what transformers would load or refusing with every reason named."""
    from hyloom.blueprint.schema import validate
    from hyloom.model import build_model

    src, out = Path(src), Path(out)
    config = read_config(src)
    _check_target(src, out, BLUEPRINT)
    fmt = pick_import_format(config, format)
    source = str(src / "config.json")
    blueprint = fmt.blueprint(config, source)
    files = shard_files(src, config)
    headers = tensor_headers(files)  # HF name -> (file, shape): everything is checked before a tensor is read
    notes = []
    embed, head = fmt.to_hf("embed_tokens.weight"), fmt.to_hf("lm_head.weight")
    rename = {}  # HF name -> ours, where it differs from fmt.to_ours
    if blueprint["model"]["tie_embeddings"] and head in headers:
        # transformers ties the head to the embedding only when the file has one of them or both are equal
        if embed not in headers:
            rename[head] = "embed_tokens.weight"  # it ties the other way round: the stored head is the embedding
        elif not _equal(headers, embed, head):
            blueprint["model"]["tie_embeddings"] = False
            notes.append(f"config.json says tie_word_embeddings, but {head} differs from {embed}: imported "
                         "untied, as transformers loads it")
    bp = validate(Loaded(blueprint, source))
    model = build_model(bp, device="meta")
    expected = model.state_dict()  # meta tensors: names and shapes, no memory

    plan, problems = {}, []  # HF name -> our name
    for hf, (file, shape) in headers.items():
        ours = rename.get(hf) or fmt.to_ours(hf)
        if DERIVED_HF_KEY.fullmatch(hf) or (bp.model.tie_embeddings and hf == head and embed in headers):
            continue  # a tied head equal to the embedding: the embedding again
        if ours is None or ours not in expected:
            problems.append(Problem(hf, f"tensor has no place in a {fmt.name} model of this config", str(file)))
        elif shape != tuple(expected[ours].shape):
            problems.append(Problem(hf, f"shape {shape} but config.json implies {tuple(expected[ours].shape)}",
                                    str(file)))
        else:
            plan[hf] = ours
    problems += [Problem(fmt.to_hf(k) or k, "missing, but config.json implies it", str(src))
                 for k in expected if k not in plan.values()]
    if problems:
        raise ConversionError(problems)

    cast = DTYPES[dtype]
    for file in files:
        part = {}
        with open_safetensors(file) as f:
            for hf in f.keys():
                if hf in plan:
                    tensor = f.get_tensor(hf)
                    part[plan[hf]] = tensor.to(cast) if cast is not None else tensor
        model.load_state_dict(part, strict=False, assign=True)
        del part

    hf_config = fmt.hf_config(bp)
    hf_config.update({k: config[k] for k in TOKEN_ID_FIELDS if k in config})
    hf_config["torch_dtype"] = _dtype_name(model.embed_tokens.weight.dtype)
    # save_checkpoint writes text extra files only, so the checkpoint is staged in a directory of our own,
    # tokenizer files (some binary) are copied beside it, and the whole is renamed into place at once.
    with atomic_dir(out) as staging:
        save_checkpoint(staging, model, blueprint, max_shard_bytes=max_shard_bytes,
                        extra_files={"config.json": json.dumps(hf_config, indent=2) + "\n"})
        copied = _copy_tokenizer(src, staging)
    dtypes = sorted({_dtype_name(t.dtype) for t in model.state_dict().values()})
    return ImportSummary(fmt.name, bp, model.num_parameters(), dtypes, len(files), copied, notes)


def _equal(headers: dict, a: str, b: str) -> bool:
    """Whether two stored tensors are equal (transformers' test for tying them); reads just these two."""
    def read(name):
        with open_safetensors(headers[name][0]) as f:
            return f.get_tensor(name)
    return headers[a][1] == headers[b][1] and torch.equal(read(a), read(b))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- export ------------------------------------------------------------------------------------------------

class ShardWriter:
    """Writes tensors into HF-named shards of at most `max_bytes` (one shard in memory at a time)."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.size = self.total = 0
        self.parts: list[tuple[Path, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.size + nbytes > self.max_bytes:
            self._flush()
        self.current[name] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        path = self.folder / f".part-{len(self.parts):05d}.safetensors"  # final names need the shard count
        save_file(self.current, path, metadata={"format": "pt"})
        self.parts.append((path, list(self.current)))
        self.current, self.size = {}, 0

    def close(self) -> int:
        """Name the shards and write the index; returns the number of shards."""
        self._flush()
        n = len(self.parts)
        if n == 1:
            os.rename(self.parts[0][0], self.folder / SINGLE)
            return 1
        weight_map = {}
        for i, (path, names) in enumerate(self.parts, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.rename(path, self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return n


def pick_export_format(spec, name: str = "auto") -> tuple[HFFormat, dict]:
    """(format, config.json) for a model spec; with 'auto', the format with fewest objections is reported."""
    known = formats()
    if name != "auto":
        if name not in known:
            raise ConversionError([Problem("--format", f"unknown format {name!r} (known: {', '.join(known)})")])
        return known[name], known[name].hf_config(spec)
    qk_norm = next((c.qk_norm for c in spec.layers if c.type == "attention"), None)
    errors = []
    for fmt in known.values():
        try:
            return fmt, fmt.hf_config(spec)
        except ConversionError as exc:  # on a tie, the format whose QK-norm matches the blueprint's is closer
            errors.append((len(exc.problems), getattr(fmt, "qk_norm", None) != qk_norm, fmt.name, exc))
    *_, closest, exc = min(errors, key=lambda e: e[:3])
    raise ConversionError([Problem("", f"no Hugging Face format can express this blueprint; "
                                       f"closest is {closest}:")] + exc.problems)


def hf_config_for(blueprint, format: str = "auto") -> dict | None:
    """config.json for a blueprint (validated, its `model`, or a plain dict) when a registered format can
    express it, else None."""
    if isinstance(blueprint, dict):
        from hyloom.blueprint.schema import validate

        blueprint = validate(Loaded(blueprint, "<blueprint>"))
    try:
        return pick_export_format(getattr(blueprint, "model", blueprint), format)[1]
    except ConversionError:
        return None


@dataclass
class ExportSummary:
    format: str
    tensors: int
    shards: int
    total_bytes: int
    tokenizer_files: list[str]


def export_hf(checkpoint: str | Path, out: str | Path, *, format: str = "auto", dtype: str = "auto",
              max_shard_bytes: int = 5 * 10**9) -> ExportSummary:
    """Write the hyloom checkpoint `checkpoint` as an HF directory at `out` (atomically)."""
    from hyloom.model import build_model

    checkpoint, out = require_dir(checkpoint), Path(out)
    if not (checkpoint / BLUEPRINT).is_file():
        raise ConversionError([Problem("", f"not a hyloom checkpoint (no {BLUEPRINT})", str(checkpoint))])
    _check_target(checkpoint, out, "config.json")
    bp = load_blueprint(str(checkpoint / BLUEPRINT))
    fmt, config = pick_export_format(bp.model, format)
    files = weight_files(checkpoint)
    headers = tensor_headers(files)
    expected = build_model(bp, device="meta").state_dict()
    # transformers would fill a missing tensor with random values, so every one must be there
    problems = [Problem(n, f"no {fmt.name} tensor name for it", str(file))
                for n, (file, _) in headers.items() if n not in expected or fmt.to_hf(n) is None]
    problems += [Problem(n, f"shape {shape} but {BLUEPRINT} implies {tuple(expected[n].shape)}", str(file))
                 for n, (file, shape) in headers.items() if n in expected and shape != tuple(expected[n].shape)]
    problems += [Problem(n, "missing from the checkpoint", str(checkpoint)) for n in expected if n not in headers]
    if problems:
        raise ConversionError(problems)
    if (checkpoint / "config.json").is_file():  # keep the token ids an import (or the lead's writer) recorded
        config.update({k: v for k, v in read_config(checkpoint).items() if k in TOKEN_ID_FIELDS})
    cast = DTYPES[dtype]
    with atomic_dir(out) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for file in files:
            with open_safetensors(file) as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    tensor = tensor.to(cast) if cast is not None else tensor
                    if name == "embed_tokens.weight":  # the dtype transformers should load in by default
                        config["torch_dtype"] = _dtype_name(tensor.dtype)
                    writer.add(fmt.to_hf(name), tensor)
        shards = writer.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copied = _copy_tokenizer(checkpoint, tmp)
    return ExportSummary(fmt.name, len(headers), shards, writer.total, copied)
