"""`hyloom import-hf` and `hyloom export-hf`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hyloom.cli.parser import command_parser
from hyloom.plugins.hf.formats import DTYPE_NAMES, formats  # torch-free: building the parser stays cheap


def _common(p: argparse.ArgumentParser, default_shard: str) -> None:
    p.add_argument("--format", default="auto", choices=["auto", *formats()],
                   help="checkpoint format (default: auto — from model_type on import, from the blueprint on export)")
    p.add_argument("--dtype", default="auto", choices=list(DTYPE_NAMES),
                   help="cast the weights (default: auto — keep the stored dtype)")
    p.add_argument("--max-shard-size", default=default_shard, metavar="SIZE",
                   help=f"largest safetensors shard, e.g. 5GB or 500MB (default: {default_shard})")


def cmd_import_hf(args) -> int:
    from hyloom.plugins.hf.convert import import_hf, parse_size

    s = import_hf(args.source, args.out, format=args.format, dtype=args.dtype,
                  max_shard_bytes=parse_size(args.max_shard_size))
    spec = s.blueprint.model
    attn = spec.layers[0]
    print(f"imported {args.source} as {s.format}: {spec.n_layers} layers, d_model {spec.d_model}, "
          f"{attn.heads} heads ({attn.kv_heads} kv) of {attn.head_dim}, vocab {spec.vocab_size}, "
          f"tied embeddings: {'yes' if spec.tie_embeddings else 'no'}")
    print(f"  {s.parameters:,} parameters ({', '.join(s.dtypes)}) from {s.shards_read} shard(s)")
    print(f"  copied: {', '.join(s.tokenizer_files) or 'none'}")
    for note in s.notes:
        print(f"hyloom: warning: {note}", file=sys.stderr)
    print(f"wrote {args.out}")
    return 0


def add_import_hf(sub):
    p = command_parser(sub, "import-hf", "convert a Hugging Face Llama/Qwen3 directory into a hyloom checkpoint",
                       "  hyloom import-hf ~/models/Qwen3-1.7B ckpt/qwen3-1.7b\n"
                       "  hyloom import-hf ~/models/Llama-3-8B ckpt/llama3 --dtype bfloat16\n"
                       "  hyloom import-hf ./my-llama ckpt/mine --format llama --max-shard-size 500MB\n")
    p.add_argument("source", help="HF model directory: config.json + model.safetensors or sharded with an index")
    p.add_argument("out", help="checkpoint directory to write (replaced atomically if it exists)")
    _common(p, "2GiB")
    p.set_defaults(func=cmd_import_hf)


def cmd_export_hf(args) -> int:
    from hyloom.plugins.hf.convert import export_hf, parse_size
    from hyloom.train import checkpoint_dir

    checkpoint = checkpoint_dir(args.checkpoint)
    if checkpoint != Path(args.checkpoint):
        print(f"checkpoint: {checkpoint}", file=sys.stderr)
    s = export_hf(checkpoint, args.out, format=args.format, dtype=args.dtype,
                  max_shard_bytes=parse_size(args.max_shard_size))
    print(f"exported {checkpoint} as {s.format}: {s.tensors} tensors, {s.total_bytes / 1e6:.1f} MB "
          f"in {s.shards} shard(s); copied: {', '.join(s.tokenizer_files) or 'none'}")
    print(f"wrote {args.out} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def add_export_hf(sub):
    p = command_parser(sub, "export-hf", "write a plain-transformer hyloom checkpoint as a Hugging Face Llama/Qwen3 directory",
                       "  hyloom export-hf runs/plain hf/plain      a run of a plain transformer (its latest checkpoint)\n"
                       "  hyloom export-hf ckpt/qwen3-1.7b hf/qwen3 --format qwen3 --dtype bfloat16\n")
    p.add_argument("checkpoint", help="hyloom checkpoint directory (blueprint.yaml + safetensors), or a run directory (its latest)")
    p.add_argument("out", help="HF directory to write (replaced atomically if it exists)")
    _common(p, "5GB")
    p.set_defaults(func=cmd_export_hf)
