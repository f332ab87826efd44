"""Hugging Face import/export: tiny random Llama and Qwen3 models round-trip through `import-hf` and
`export-hf` with the same logits and greedy generations as transformers."""

import json
import os
import shutil

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

from hyloom.blueprint import load_blueprint, validate  # noqa: E402
from hyloom.blueprint.load import Loaded  # noqa: E402
from hyloom.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from hyloom.cli import main  # noqa: E402
from hyloom.model import build_model  # noqa: E402
from hyloom.plugins.hf import LLAMA, QWEN3, hf_config_for  # noqa: E402

# A wide init gives logits large enough that greedy generations vary; no eos, so HF never stops early.
SHAPES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=300, max_position_embeddings=128, rms_norm_eps=1e-6,
              initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None)
PROMPT = [5, 17, 250, 3, 99, 42, 7]


def tiny_hf(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(**SHAPES, rope_theta=500000.0, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen3Config(**SHAPES, head_dim=16, rope_theta=1e6, tie_word_embeddings=True)
        model = transformers.Qwen3ForCausalLM(config)
    with torch.no_grad():  # norms start at 1; random ones make the key map matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def load_blueprint_dict(data):
    return validate(Loaded(data, "<test>"))


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def hf_greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def hf_dir(request, tmp_path_factory):
    """A saved tiny HF model: Llama sharded (index + several files), Qwen3 in one file."""
    model = tiny_hf(request.param)
    folder = tmp_path_factory.mktemp(f"hf-{request.param}")
    model.save_pretrained(folder, max_shard_size="100KB" if request.param == "llama" else "1GB")
    (folder / "tokenizer.json").write_bytes(b'{"version": "1.0", "note": "\xc3\xa9"}')
    return request.param, model, folder


def test_import_matches_transformers_then_export_round_trips(hf_dir, tmp_path, capsys):
    kind, hf_model, folder = hf_dir
    assert (folder / "model.safetensors.index.json").exists() == (kind == "llama")

    assert main(["import-hf", str(folder), str(tmp_path / "ckpt")]) == 0
    assert f"as {kind}: 3 layers" in capsys.readouterr().out
    assert (tmp_path / "ckpt" / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    model, bp = load_checkpoint(tmp_path / "ckpt")
    model.eval()
    assert bp.model.tie_embeddings == (kind == "qwen3") and bp.model.layers[0].qk_norm == (kind == "qwen3")

    with torch.no_grad():
        ours = model(torch.tensor([PROMPT]))[0]
    assert (ours - hf_logits(hf_model, PROMPT)).abs().max() <= 1e-4
    assert model.generate([PROMPT], max_new_tokens=8) == [hf_greedy(hf_model, PROMPT, 8)]

    assert main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "back"), "--max-shard-size", "60KB"]) == 0
    assert f"as {kind}" in capsys.readouterr().out
    assert (tmp_path / "back" / "model.safetensors.index.json").exists()
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == kind
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(again) is type(hf_model)
    assert (hf_logits(again, PROMPT) - hf_logits(hf_model, PROMPT)).abs().max() <= 1e-5

    # a run directory means its newest checkpoint, as for generate and eval
    run = tmp_path / "run"
    shutil.copytree(tmp_path / "ckpt", run / "checkpoint-000005")
    (run / "latest").write_text("checkpoint-000005")
    assert main(["export-hf", str(run), str(tmp_path / "from_run")]) == 0
    assert "checkpoint-000005" in capsys.readouterr().err
    assert (tmp_path / "from_run" / "config.json").read_text() == (tmp_path / "back" / "config.json").read_text()


def test_key_map_both_ways():
    assert LLAMA.to_ours("model.layers.12.self_attn.q_proj.weight") == "layers.12.mixer.q_proj.weight"
    assert LLAMA.to_ours("model.layers.0.mlp.gate_proj.weight") == "layers.0.ffn.gate_proj.weight"
    assert LLAMA.to_ours("model.layers.3.input_layernorm.weight") == "layers.3.mixer_norm.weight"
    assert LLAMA.to_ours("model.layers.3.post_attention_layernorm.weight") == "layers.3.ffn_norm.weight"
    assert LLAMA.to_ours("model.layers.0.self_attn.q_norm.weight") is None  # Llama has no QK-norm
    assert QWEN3.to_hf("layers.7.mixer.k_norm.weight") == "model.layers.7.self_attn.k_norm.weight"
    for hf, ours in QWEN3.key_map:
        assert QWEN3.to_hf(QWEN3.to_ours(hf.format(n=4))) == hf.format(n=4)


def test_config_for_builtin_blueprints():
    qwen = hf_config_for(load_blueprint("builtin:qwen3-1.7b"))
    assert qwen["model_type"] == "qwen3" and qwen["num_key_value_heads"] == 8 and qwen["tie_word_embeddings"]
    assert qwen["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e6}
    llama = hf_config_for(load_blueprint("builtin:llama3-8b"))
    assert llama["model_type"] == "llama" and llama["intermediate_size"] == 14336
    assert hf_config_for(load_blueprint("builtin:hypenet-2b")) is None
    # the blueprint a Qwen3 config imports as gives that config back
    assert QWEN3.hf_config(load_blueprint("builtin:qwen3-1.7b"))["head_dim"] == 128


def test_docs_export_example_is_exportable_and_the_tiny_hybrid_is_not():
    # docs/hf.md trains the tiny model as a plain transformer with these overrides, then exports it
    plain = ["model.layout=AAAA", "model.mixers={A: {type: attention, heads: 4, kv_heads: 2}}",
             "model.position={type: rope}"]
    assert hf_config_for(load_blueprint("builtin:tiny", plain))["model_type"] == "llama"
    assert hf_config_for(load_blueprint("builtin:tiny")) is None


# The published config.json of Qwen3-1.7B (4.x style: top-level rope_theta) and of Meta-Llama-3-8B.
QWEN3_1_7B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2048,
              "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
              "head_dim": 128, "max_position_embeddings": 40960, "max_window_layers": 28, "rms_norm_eps": 1e-06,
              "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "use_sliding_window": False,
              "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 151936, "hidden_act": "silu",
              "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645}
LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0,
             "tie_word_embeddings": False, "vocab_size": 128256, "hidden_act": "silu", "pretraining_tp": 1}


@pytest.mark.parametrize("config, builtin", [(QWEN3_1_7B, "qwen3-1.7b"), (LLAMA3_8B, "llama3-8b")])
def test_published_configs_give_the_builtin_blueprints(config, builtin):
    fmt = QWEN3 if config["model_type"] == "qwen3" else LLAMA
    imported = load_blueprint_dict(fmt.blueprint(config)).model
    reference = load_blueprint(f"builtin:{builtin}").model
    assert [c.model_dump(exclude={"norm_eps"}) for c in imported.layers] == \
        [c.model_dump(exclude={"norm_eps"}) for c in reference.layers]
    assert imported.model_dump(exclude={"mixers", "overrides"}) == reference.model_dump(exclude={"mixers", "overrides"})
    for key in ("hidden_size", "intermediate_size", "num_key_value_heads", "rms_norm_eps", "vocab_size"):
        assert fmt.hf_config(reference)[key] == config[key]


@pytest.mark.parametrize("change, field", [
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope_parameters.rope_type"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_parameters": None}, "rope_scaling.type"),
    ({"use_sliding_window": True, "sliding_window": 64}, "use_sliding_window"),
    ({"model_type": "mistral"}, "model_type"),
])
def test_unsupported_config_fields_are_named(tmp_path, capsys, change, field):
    config = {"model_type": "qwen3", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 300,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
              "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, **change}
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_old_style_rope_theta_is_read():
    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 300,
              "num_attention_heads": 4, "intermediate_size": 128, "rope_theta": 5e5}
    model = LLAMA.blueprint(config)["model"]
    assert model["position"] == {"type": "rope", "rope_theta": 5e5}
    assert model["mixers"]["A"] == {"type": "attention", "heads": 4, "kv_heads": 4, "head_dim": 16}


def test_exporting_a_hybrid_fails_clearly(tmp_path, capsys):
    bp = load_blueprint("builtin:hypenet-2b", [
        "model.d_model=64", "model.n_layers=4", "model.layout=LALL", "model.vocab_size=300", "model.ffn.hidden=96",
        "model.mixers.A.heads=4", "model.mixers.A.kv_heads=2", "model.mixers.A.head_dim=16",
        "model.mixers.L.heads=4", "model.mixers.L.head_dim=16"])
    save_checkpoint(tmp_path / "ckpt", build_model(bp), bp.model_dump(mode="json"))
    assert main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "no Hugging Face format can express this blueprint" in err
    assert "mixer 'lightning'" in err and "model.position.type" in err
    assert main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--format", "llama"]) == 2
    assert "qk_norm must be false" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_replaces_only_earlier_outputs(hf_dir, tmp_path, capsys):
    _, _, folder = hf_dir
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    assert main(["import-hf", str(folder), str(precious)]) == 2
    assert "refusing to replace it" in capsys.readouterr().err
    assert (precious / "notes.txt").read_text() == "keep me"
    for _ in range(2):  # a second import replaces the first in one rename
        assert main(["import-hf", str(folder), str(tmp_path / "ckpt"), "--dtype", "bfloat16"]) == 0
    model, _ = load_checkpoint(tmp_path / "ckpt")
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "ckpt")]) == 2
    assert "must differ" in capsys.readouterr().err


# ---- matching transformers where a config and its weights disagree ---------------------------------------

def _edit_config(folder, drop=(), **changes):
    config = json.loads((folder / "config.json").read_text())
    for key in drop:
        del config[key]
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def _import_matches_transformers(folder, out, capsys, *args):
    """Import `folder`, then compare our logits with those of transformers loading the same folder."""
    assert main(["import-hf", str(folder), str(out), *args]) == 0
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    model, bp = load_checkpoint(out)
    with torch.no_grad():
        ours = model.eval()(torch.tensor([PROMPT]))[0]
    assert (ours - hf_logits(reference, PROMPT)).abs().max() <= 1e-4
    return bp, capsys.readouterr()


def _untied_llama(folder):
    torch.manual_seed(1)
    config = transformers.LlamaConfig(**{**SHAPES, "num_hidden_layers": 1}, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return model


def test_a_head_that_differs_from_the_embedding_is_not_tied(tmp_path, capsys):
    _untied_llama(tmp_path / "hf")
    _edit_config(tmp_path / "hf", tie_word_embeddings=True)  # but the file holds a distinct lm_head.weight
    bp, out = _import_matches_transformers(tmp_path / "hf", tmp_path / "ckpt", capsys)
    assert not bp.model.tie_embeddings
    assert "lm_head.weight differs from model.embed_tokens.weight: imported untied" in out.err


def test_a_tied_config_with_only_the_head_stored_uses_it_as_the_embedding(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    _untied_llama(tmp_path / "hf")
    _edit_config(tmp_path / "hf", tie_word_embeddings=True)
    file = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.embed_tokens.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    bp, _ = _import_matches_transformers(tmp_path / "hf", tmp_path / "ckpt", capsys)
    assert bp.model.tie_embeddings


def test_model_safetensors_wins_over_an_index(tmp_path, capsys):
    tiny_hf("llama").save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    other = _untied_llama(tmp_path / "single")  # other weights (and one layer) in a single file beside it
    (tmp_path / "single" / "model.safetensors").rename(tmp_path / "hf" / "model.safetensors")
    (tmp_path / "single" / "config.json").replace(tmp_path / "hf" / "config.json")
    bp, _ = _import_matches_transformers(tmp_path / "hf", tmp_path / "ckpt", capsys)
    assert bp.model.n_layers == other.config.num_hidden_layers == 1


def test_a_qwen3_config_without_head_dim_or_kv_heads_takes_transformers_defaults(tmp_path, capsys):
    torch.manual_seed(0)  # Qwen3Config's defaults: head_dim 128 and 32 kv heads, whatever the hidden size
    shapes = {**SHAPES, "num_hidden_layers": 1, "num_attention_heads": 32, "num_key_value_heads": 32}
    transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**shapes, head_dim=128)).save_pretrained(tmp_path / "hf")
    _edit_config(tmp_path / "hf", drop=("head_dim", "num_key_value_heads"))
    bp, _ = _import_matches_transformers(tmp_path / "hf", tmp_path / "ckpt", capsys)
    attention = bp.model.layers[0]
    assert (attention.head_dim, attention.kv_heads) == (128, 32)


@pytest.mark.parametrize("change, field", [
    ({"architectures": ["GraniteForCausalLM"]}, "architectures: names 'GraniteForCausalLM'"),
    ({"logits_scaling": 8.0}, "logits_scaling: is not a field of transformers' LlamaConfig"),
    ({"embedding_multiplier": 12.0}, "embedding_multiplier: is not a field"),
    ({"hidden_activation": "gelu_pytorch_tanh"}, "hidden_activation: 'gelu_pytorch_tanh' is not supported"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping: is not a field"),
    ({"head_dim": None, "model_type": "qwen3"}, "head_dim: is null"),
    ({"mlp_bias": True}, "mlp_bias: biases are not supported"),
])
def test_fields_that_change_the_math_are_refused_by_name(tmp_path, capsys, change, field):
    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 300,
              "num_attention_heads": 4, "intermediate_size": 128, **change}
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "out"), "--format", config["model_type"]]) == 2
    assert field in capsys.readouterr().err


def test_inert_fields_are_accepted():
    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 300,
              "num_attention_heads": 4, "intermediate_size": 128, "_name_or_path": "x", "unsloth_version": "1",
              "torch_dtype": "bfloat16", "pretraining_tp": 1, "use_cache": True, "architectures": ["LlamaForCausalLM"],
              "hidden_activation": "silu"}
    assert LLAMA.unsupported(config) == []


# ---- broken folders and checkpoints --------------------------------------------------------------------------

def _first_shard(folder):
    return sorted(folder.glob("model-*.safetensors"))[0]


def _truncate(folder):
    data = _first_shard(folder).read_bytes()
    _first_shard(folder).write_bytes(data[:100])
    return f"{_first_shard(folder).name}: not a readable safetensors file"


def _garbage(folder):
    _first_shard(folder).write_bytes(b"\x00garbage" * 50)
    return f"{_first_shard(folder).name}: not a readable safetensors file"


def _shard_missing(folder):
    name = _first_shard(folder).name
    _first_shard(folder).unlink()
    return f"model.safetensors.index.json: weight_map: lists {name}, which does not exist"


def _no_weight_map(folder):
    (folder / "model.safetensors.index.json").write_text("{}")
    return "model.safetensors.index.json: weight_map: missing"


def _config_not_json(folder):
    (folder / "config.json").write_text("{'model_type': 'llama'}")
    return "config.json: is not valid JSON"


def _folder_missing(folder):
    shutil.rmtree(folder)
    return f"{folder}: does not exist"


def _too_many_layers(folder):  # 37 layers' worth of tensors missing: summarised
    _edit_config(folder, num_hidden_layers=40)
    return f"... and {37 * 9 - 5} more: missing, but config.json implies it"


@pytest.mark.parametrize("damage", [_truncate, _garbage, _shard_missing, _no_weight_map, _config_not_json,
                                    _folder_missing, _too_many_layers])
def test_broken_hf_folders_are_refused_naming_the_file(tmp_path, capsys, damage):
    tiny_hf("llama").save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    needle = damage(tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.splitlines()) < 12
    assert not (tmp_path / "out").exists()


def test_exporting_a_truncated_checkpoint_names_the_shard(tmp_path, capsys):
    bp = load_blueprint_dict({"model": {"d_model": 32, "n_layers": 1, "vocab_size": 50, "mixers": {
        "A": {"type": "attention", "heads": 2, "head_dim": 16}}, "layout": "A", "ffn": {"type": "swiglu", "hidden": 64}}})
    save_checkpoint(tmp_path / "ckpt", build_model(bp), bp.model_dump(mode="json"))
    needle = _truncate(tmp_path / "ckpt")
    assert main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
