"""Blueprint mistakes the schema alone cannot see (models that cannot run, wrong container kinds, unreadable
files, plugin exceptions), defaulted sections, `~key` helpers, `show --yaml` and the schema's coverage."""

import json
import textwrap
from types import SimpleNamespace

import pytest
import torch
from pydantic import BaseModel

import hyloom
from hyloom.blueprint import load_blueprint
from hyloom.cli import main
from hyloom.mixer import Mixer, MixerCapabilities

GOOD = """
model:
  d_model: 64
  n_layers: 4
  vocab_size: 100
  position: {type: rope}
  mixers:
    A: {type: attention, heads: 4, kv_heads: 2}
    W: {type: attention, heads: 4, window: 8}
  layout: AWAW
  ffn: {type: swiglu, hidden: 128}
"""


def write(tmp_path, text, name="bp.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def refused(capsys, argv):
    """Run the CLI; it must exit 2 with a one-screen message and no traceback. Returns the message."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) < 25, err
    return err


# ---- models that validate field by field but cannot run -------------------------------------------------

CANNOT_RUN = [
    # (what, overrides, key path, fragment)
    ("heads do not divide d_model", ["model.mixers.A.heads=3", "model.mixers.A.kv_heads=1"],
     "model.mixers.A", "heads (3) must divide d_model (64)"),
    ("more heads than d_model (head_dim 0)", ["model.mixers.W.heads=128"], "model.mixers.W", "must divide d_model"),
    ("odd head_dim under RoPE", ["model.mixers.A.head_dim=7"], "model.mixers.A", "head_dim must be even, got 7"),
    ("odd head_dim in one layer's override", ["model.overrides={2: {head_dim: 5}}"], "model.overrides.2",
     "head_dim must be even"),
    ("kv_heads do not divide heads", ["model.mixers.A.kv_heads=3"], "model.mixers.A", "multiple of kv_heads"),
    ("lightning heads do not divide d_model", ["model.mixers.L={type: lightning, heads: 5}", "model.layout=ALAL"],
     "model.mixers.L", "heads (5) must divide d_model"),
    ("lightning odd head_dim under hype", ["model.position={type: hype}", "model.layout=ALAL",
                                           "model.mixers.L={type: lightning, heads: 2, head_dim: 9}"],
     "model.mixers.L", "head_dim must be even, got 9"),
    ("lightning head_dim beyond the kernel", ["model.mixers.L={type: lightning, heads: 2, head_dim: 300}",
                                             "model.layout=ALAL"], "model.mixers.L", "head dim up to 256"),
    ("infllm_v2 heads do not divide d_model", ["model.mixers.A={type: infllm_v2, heads: 6, kv_heads: 2}"],
     "model.mixers.A", "heads (6) must divide d_model"),
    ("infllm_v2 kv_heads do not divide heads", ["model.mixers.A={type: infllm_v2, heads: 4, kv_heads: 3}"],
     "model.mixers.A", "multiple of kv_heads"),
    ("infllm_v2 odd head_dim under RoPE", ["model.mixers.A={type: infllm_v2, heads: 4, kv_heads: 2, head_dim: 3}"],
     "model.mixers.A", "head_dim must be even"),
]


@pytest.mark.parametrize("case, overrides, path, fragment", CANNOT_RUN, ids=[c[0] for c in CANNOT_RUN])
@pytest.mark.parametrize("command", ["validate", "show"])
def test_models_that_cannot_run_are_refused(tmp_path, capsys, case, overrides, path, fragment, command):
    err = refused(capsys, [command, write(tmp_path, GOOD), *overrides])
    assert f"{path}: " in err and fragment in err, err


class _Cfg(BaseModel):
    fail: str = "none"  # where the plugin breaks: build, forward or nowhere


class _Broken(Mixer):
    capabilities = MixerCapabilities(family="softmax")

    def __init__(self, cfg):
        super().__init__()
        self.fail = cfg.fail

    def forward(self, x_BTD, ctx):
        if self.fail == "forward":
            return x_BTD.reshape(-1)[:3]  # a bug: the wrong shape breaks the residual add
        return x_BTD


def _build_broken(cfg, layer, model):
    if cfg.fail == "build":
        raise KeyError("wiring")
    return _Broken(cfg)


@pytest.fixture
def broken_plugin():
    plugin = SimpleNamespace(hyloom_register_mixers=lambda register: register(
        "broken", _build_broken, config=_Cfg, capabilities=_Broken.capabilities, summary="breaks on demand"))
    name = hyloom.register_plugin(plugin, name="broken_plugin")
    yield name
    hyloom.unregister_plugin(name)


@pytest.mark.parametrize("fail", ["build", "forward"])
def test_a_plugins_exception_is_a_blueprint_problem_at_its_key(tmp_path, capsys, broken_plugin, fail):
    path = write(tmp_path, GOOD)
    err = refused(capsys, ["validate", path, f"model.mixers.B={{type: broken, fail: {fail}}}", "model.layout=ABAB"])
    assert "<command line>: model.mixers.B: " in err and "layer 1" in err
    if fail == "build":
        assert "KeyError: 'wiring'" in err and f"raised at {__file__}" in err  # for the plugin's author
    else:
        assert "mixer 'broken' failed in layer 1 (a one-token forward on the meta device)" in err
    assert main(["validate", path, "model.mixers.B={type: broken}", "model.layout=ABAB"]) == 0


# ---- wrong container kinds, unreadable files ---------------------------------------------------------------

WRONG_KIND = [
    # (what, file text (extends good.yaml unless it says otherwise), overrides, key path)
    ("model a list", "model: [1, 2]\n", [], "model"),
    ("mixers a list", "model: {mixers: [1, 2]}\n", [], "model.mixers"),
    ("a mixer a list", "model: {mixers: {A: [heads, 4]}}\n", [], "model.mixers.A"),
    ("a mixer a string", "model: {mixers: {A: attention}}\n", [], "model.mixers.A"),
    ("layout a wrong mapping", "model: {layout: {A: 2}}\n", [], "model.layout"),
    ("overrides a list", "model: {overrides: [1, 2]}\n", [], "model.overrides"),
    ("one override a list", "model: {overrides: {1: [window]}}\n", [], "model.overrides.1"),
    ("position a list", "model: {position: [rope]}\n", [], "model.position"),
    ("ffn a string", "model: {ffn: swiglu}\n", [], "model.ffn"),
    ("heads a mapping", "model: {mixers: {A: {heads: {n: 4}}}}\n", [], "model.mixers.A.heads"),
    ("train a number", "train: 3\n", [], "train"),
    ("train a list", "train: [lm]\n", [], "train"),
    ("data a list", "data: [1]\n", [], "data"),
    ("tiers a mapping", "data: {tiers: {a: 1}}\n", [], "data.tiers"),
    ("requires a mapping", "requires: {a: 1}\n", [], "requires"),
    ("extends a mapping", "extends: {a: 1}\n", [], "extends"),
    ("extends a list of mappings", "extends: [{a: 1}]\n", [], "extends"),
    ("a null key", "model: {mixers: {null: 2}}\n", [], "model.mixers"),
    ("a date value", "model: {d_model: 2024-01-01}\n", [], "model.d_model"),
    ("a duplicate key", "model: {d_model: 64, d_model: 32}\n", [], "duplicate key 'd_model'"),
    ("override: model a list", "", ["model=[1, 2]"], "model"),
    ("override: mixers a list", "", ["model.mixers=[A]"], "model.mixers"),
    ("override: layout a wrong mapping", "", ["model.layout={x: 1}"], "model.layout"),
    ("override: overrides a list", "", ["model.overrides=[1]"], "model.overrides"),
    ("override: train a number", "", ["train=3"], "train"),
    ("override: through a list", "", ["model.layout=[A, W, A, W]", "model.layout.x=1"], "model.layout.x"),
    ("override: key through a value", "", ["model.d_model.x=1"], "model.d_model"),
]


@pytest.mark.parametrize("case, text, overrides, key", WRONG_KIND, ids=[c[0] for c in WRONG_KIND])
def test_wrong_container_kinds_are_refused_naming_file_and_key(tmp_path, capsys, case, text, overrides, key):
    write(tmp_path, GOOD, "good.yaml")
    text = text if text.startswith("extends") else "extends: good.yaml\n" + text
    path = write(tmp_path, text)
    err = refused(capsys, ["validate", path, *overrides])
    assert key in err, err
    assert ("<command line>" if overrides else path) in err, err


BAD_FILES = [
    ("binary", b"\x00\x01\x02model", "a binary file"),
    ("latin-1", "model: {d_model: 64}\n# café\n".encode("latin-1"), "not UTF-8 text: byte 0xe9 on line 2"),
    ("empty", b"", "the file is empty"),
    ("only comments", b"# nothing yet\n", "the file is empty"),
    ("a list", b"- model\n", "must be a mapping of keys"),
    ("a string", b"model\n", "must be a mapping of keys"),
    ("invalid YAML", b"model: {d_model: 64\n", "not valid YAML (line"),
]


@pytest.mark.parametrize("case, content, fragment", BAD_FILES, ids=[c[0] for c in BAD_FILES])
@pytest.mark.parametrize("as_parent", [False, True])
def test_unreadable_files_are_refused_naming_the_file(tmp_path, capsys, case, content, fragment, as_parent):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)
    path = write(tmp_path, "extends: bad.yaml\n", "child.yaml") if as_parent else str(bad)
    err = refused(capsys, ["validate", path])
    assert f"{bad}: " in err and fragment in err, err


def test_a_folder_is_not_a_blueprint(tmp_path, capsys):
    assert "is a folder" in refused(capsys, ["validate", str(tmp_path)])


# ---- defaulted sections, where values came from, ~key helpers ------------------------------------------

def test_one_key_of_a_defaulted_section_can_be_overridden(tmp_path):
    path = write(tmp_path, GOOD)
    bp = load_blueprint(path, ["train.steps=600", "data.source.max_bytes=1000", "model.norm.eps=1e-5"])
    assert (bp.train.type, bp.train.steps) == ("lm", 600)
    assert (bp.data.source.type, bp.data.source.max_bytes) == ("stdlib", 1000)
    assert (bp.data.tokenizer.type, bp.model.norm.type, bp.model.norm.eps) == ("bpe", "rmsnorm", 1e-5)
    assert load_blueprint(path).train is None  # nothing asked: no section
    assert load_blueprint(write(tmp_path, GOOD + "train: {steps: 5}\n", "t.yaml")).train.type == "lm"


@pytest.mark.parametrize("overrides, expected", [
    (["model.overrides.3.window=-1"], "<command line>: model.overrides.3.window: "),
    (["model.mixers.B.heads=4", "model.layout=ABAB"], "<command line>: model.mixers.B: "),
    (["model.mixers.A.heads=3"], "bp.yaml and <command line>: model.mixers.A: "),
    (["model.overrides={1: {windw: 2}}"], "<command line>: model.overrides.1.windw: "),
])
def test_errors_name_the_command_line_for_keys_it_set(tmp_path, overrides, expected):
    with pytest.raises(hyloom.BlueprintError) as info:
        load_blueprint(write(tmp_path, GOOD), overrides)
    assert expected in str(info.value), str(info.value)


HELPER = """
extends: good.yaml
width: 96
model:
  d_model: ${width}
  ffn: {hidden: "${oc.env:NO_SUCH_VARIABLE_FOR_TEST,256}"}
"""


def test_a_helper_key_feeds_interpolation_and_is_then_deleted(tmp_path):
    write(tmp_path, GOOD, "good.yaml")
    child = write(tmp_path, HELPER)
    assert load_blueprint(child, ["~width"]).model.d_model == 96
    assert load_blueprint(child, ["width=128", "~width"]).model.d_model == 128
    with pytest.raises(hyloom.BlueprintError, match="unknown key 'width'"):
        load_blueprint(child)


def test_setting_a_deleted_key_again_starts_from_nothing(tmp_path):
    path = write(tmp_path, GOOD + "  overrides: {3: {window: 2}}\n")
    bp = load_blueprint(path, ["~model.overrides", "model.overrides.1.window=4"])
    assert [c.window for c in bp.model.layers] == [None, 4, None, 8]
    bp = load_blueprint(path, ["~model.overrides.3", "model.overrides={2: {window: 3}}"])
    assert [c.window for c in bp.model.layers] == [None, 8, 3, 8]


# ---- show --yaml, schema -------------------------------------------------------------------------------

@pytest.mark.parametrize("ref", ["builtin:tiny", "builtin:minicpm-sala", "GOOD"])
def test_show_yaml_prints_only_yaml_that_loads_back(tmp_path, capsys, ref):
    ref = write(tmp_path, GOOD) if ref == "GOOD" else ref
    assert main(["show", ref, "--yaml", "--tree", "train.steps=7"]) == 0
    captured = capsys.readouterr()
    assert "parameters:" in captured.err and "layers.0" in captured.err
    again = write(tmp_path, captured.out, "again.yaml")
    assert load_blueprint(again).model_dump() == load_blueprint(ref, ["train.steps=7"]).model_dump()


def test_schema_accepts_extends_and_says_what_it_describes(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["properties"]["extends"]["anyOf"][1] == {"type": "array", "items": {"type": "string"}}
    assert "extends" in schema["description"]


def _enums(prop, defs):
    if "$ref" in prop:
        prop = defs[prop["$ref"].rsplit("/", 1)[-1]]
    yield from prop.get("enum", [])
    for option in prop.get("anyOf", []):
        yield from _enums(option, defs)


def test_the_reference_lists_the_values_of_every_enum_field():
    from hyloom.blueprint.reference import markdown
    from hyloom.registry import registry

    text, checked = markdown(), 0
    for kind in ("position", "mixer", "ffn", "norm", "data_source", "data_tier", "tokenizer", "trainer"):
        for reg in registry().all(kind):
            schema = reg.config.model_json_schema()
            for name, prop in schema["properties"].items():
                values = list(_enums(prop, schema.get("$defs", {})))
                if name != "type" and values:
                    row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
                    assert all(f"`{v}`" in row for v in values), row
                    checked += 1
    assert checked >= 4  # lightning decay, bidirectional_decay, the trainer's schedule and precision


def test_meta_check_costs_no_memory():
    bp = load_blueprint("builtin:llama3-8b")
    from hyloom.blueprint import load
    from hyloom.blueprint.check import build_checked

    model = build_checked(bp, load("builtin:llama3-8b"))
    assert model.embed_tokens.weight.device == torch.device("meta")
