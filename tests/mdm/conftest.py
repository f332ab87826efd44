"""A small Lightning + attention MDM blueprint, trained from the CLI by the tests."""

import pytest
import yaml


def blueprint(tmp_path, *, mixer="lightning", mask_id=None, causal=False):
    objective = {"type": "mdm"} | ({"mask_id": mask_id} if mask_id is not None else {})
    mixers = {"A": {"type": "attention", "heads": 2, "kv_heads": 1},
              "L": {"type": "lightning", "heads": 2, "decay": "alibi", "bidirectional_decay": "symmetric"},
              "S": {"type": "infllm_v2", "heads": 2, "kv_heads": 1, "head_dim": 16}}
    data = {
        "model": {"d_model": 32, "n_layers": 2, "vocab_size": 512, "causal": causal,
                  "mixers": {"A": mixers["A"], "X": mixers["L" if mixer == "lightning" else "S"]},
                  "layout": "XA", "ffn": {"type": "swiglu", "hidden": 64}},
        "data": {"source": {"type": "stdlib", "max_bytes": 200_000},
                 "tokenizer": {"type": "bpe", "vocab_size": 512}, "seq_len": 32,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"type": "lm", "steps": 4, "batch_size": 4, "warmup": 1, "eval_every": 2, "eval_batches": 1,
                  "save_every": 4, "log_every": 1, "out_dir": str(tmp_path / "run"), "sample_tokens": 8,
                  "objective": objective},
    }
    path = tmp_path / "bp.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture
def mdm_blueprint():
    return blueprint
