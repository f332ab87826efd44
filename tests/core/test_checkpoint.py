"""Checkpoints: a plugin mixer's non-persistent buffer survives the meta-device load `generate` uses, and every
broken checkpoint is refused with the file named (exit 2 from the CLI), long lists summarised."""

import json

import pytest
import torch
from pydantic import BaseModel
from torch import nn

import hyloom
from hyloom.blueprint import Loaded, validate
from hyloom.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from hyloom.cli import main
from hyloom.mixer import Mixer, MixerCapabilities
from hyloom.model import build_model


class ScaledConfig(BaseModel):
    from_weights: bool = False  # derive the buffer from a parameter: what a meta-device load cannot redo


class Scaled(Mixer):
    """A projection times a per-channel constant computed in __init__ and kept in a non-persistent buffer."""

    def __init__(self, cfg: ScaledConfig, layer: int, d_model: int):
        super().__init__()
        self.proj = nn.Linear(d_model, d_model, bias=False)
        scale = self.proj.weight.detach().sum(0) if cfg.from_weights else torch.linspace(0.5, 2.0, d_model) * (layer + 1)
        self.register_buffer("scale", scale, persistent=False)

    def forward(self, x_BTD, ctx):
        return self.proj(x_BTD).cumsum(1) * self.scale


class ScaledPlugin:
    def hyloom_register_mixers(register):
        register("scaled_test", lambda cfg, layer, model: Scaled(cfg, layer, model.d_model), config=ScaledConfig,
                 summary="test mixer with a non-persistent buffer", capabilities=MixerCapabilities(family="linear"))


@pytest.fixture
def scaled_plugin():
    name = hyloom.register_plugin(ScaledPlugin)
    yield
    hyloom.unregister_plugin(name)


def blueprint(mixer=None, n_layers=2):
    return {"model": {"d_model": 16, "n_layers": n_layers, "vocab_size": 40, "layout": "M" * n_layers,
                      "mixers": {"M": mixer or {"type": "attention", "heads": 2, "head_dim": 8}},
                      "ffn": {"type": "swiglu", "hidden": 32}}}


def saved(path, data, seed=0):
    torch.manual_seed(seed)
    model = build_model(validate(Loaded(data, "<test>"))).eval()
    save_checkpoint(path, model, data)
    return model


def test_non_persistent_buffers_are_rebuilt_by_a_meta_load(scaled_plugin, tmp_path):
    model = saved(tmp_path / "ckpt", blueprint({"type": "scaled_test"}))
    assert "layers.1.mixer.scale" not in model.state_dict()  # not in the checkpoint: the constructor remakes it
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(loaded.layers[1].mixer.scale, model.layers[1].mixer.scale)
    ids = torch.randint(0, 40, (2, 7))
    torch.testing.assert_close(loaded.eval()(ids), model(ids), rtol=0, atol=0)


def test_a_buffer_derived_from_weights_is_refused_by_name(scaled_plugin, tmp_path):
    saved(tmp_path / "ckpt", blueprint({"type": "scaled_test", "from_weights": True}))
    with pytest.raises(CheckpointError, match=r"layers\.0\.mixer\.scale: still on the meta device"):
        load_checkpoint(tmp_path / "ckpt")


def _shard(path):
    return next(path.glob("model-*.safetensors"))


def _truncate(path):
    data = _shard(path).read_bytes()
    _shard(path).write_bytes(data[: len(data) // 2])
    return _shard(path).name


def _garbage(path):
    _shard(path).write_bytes(b"not safetensors at all" * 10)
    return _shard(path).name


def _shard_missing(path):
    _shard(path).unlink()
    return "model.safetensors.index.json: weight_map: lists model-00001-of-00001.safetensors, which does not exist"


def _no_weight_map(path):
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    return "model.safetensors.index.json: weight_map: missing"


def _index_not_json(path):
    (path / "model.safetensors.index.json").write_text("{ truncated")
    return "model.safetensors.index.json: is not valid JSON"


def _no_blueprint(path):
    (path / "blueprint.yaml").unlink()
    return "not a hyloom checkpoint (no blueprint.yaml)"


def _shape(path):
    narrower = blueprint()
    narrower["model"]["ffn"]["hidden"] = 24
    (path / "blueprint.yaml").write_text(json.dumps(narrower))
    return "layers.0.ffn.gate_proj.weight: shape (32, 16) but blueprint.yaml implies (24, 16)"


@pytest.mark.parametrize("damage", [_truncate, _garbage, _shard_missing, _no_weight_map, _index_not_json,
                                    _no_blueprint, _shape])
def test_broken_checkpoints_name_the_file(tmp_path, damage):
    saved(tmp_path / "ckpt", blueprint())
    needle = damage(tmp_path / "ckpt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "ckpt")
    assert needle in str(info.value) and str(tmp_path / "ckpt") in str(info.value)


def test_generate_refuses_a_truncated_checkpoint_with_exit_2(tmp_path, capsys):
    saved(tmp_path / "ckpt", blueprint())
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")  # generate looks for it before loading
    name = _truncate(tmp_path / "ckpt")
    assert main(["generate", str(tmp_path / "ckpt"), "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert f"{name}: not a readable safetensors file" in err and "Traceback" not in err


def test_a_missing_folder_says_so(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere: does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_long_lists_of_tensors_are_summarised(tmp_path):
    saved(tmp_path / "ckpt", blueprint(n_layers=2))
    (tmp_path / "ckpt" / "blueprint.yaml").write_text(json.dumps(blueprint(n_layers=40)))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "ckpt")
    lines = str(info.value).splitlines()
    assert len(lines) < 10  # 38 layers × 9 tensors missing
    assert "layers.2.mixer_norm.weight: missing from the checkpoint" in lines[1]
    assert lines[-1].strip() == f"... and {38 * 9 - 5} more: missing from the checkpoint"
