"""Blueprints: loading, extends, interpolation, overrides, layouts, and the messages bad ones get."""

import textwrap

import pytest

import hyloom
from hyloom.blueprint import builtin_names, load_blueprint, to_yaml
from hyloom.cli import main

GOOD = """
model:
  d_model: 64
  n_layers: 4
  vocab_size: 100
  position: {type: rope, theta: 10000}
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


def test_builtin_blueprints_validate_and_build_on_meta():
    assert {"tiny", "qwen3-1.7b", "llama3-8b"} <= set(builtin_names())
    sizes = {}
    for name in builtin_names():
        bp = load_blueprint(f"builtin:{name}")
        sizes[name] = hyloom.build_model(bp, device="meta").num_parameters()
    assert sizes["tiny"] < 5e6
    assert abs(sizes["qwen3-1.7b"] - 1.72e9) < 0.01e9  # tied embeddings: 1.41B in blocks + 0.31B embedding
    assert abs(sizes["llama3-8b"] - 8.03e9) < 0.01e9


def test_layout_forms_expand_to_the_same_per_layer_list(tmp_path):
    base = load_blueprint(write(tmp_path, GOOD))
    as_list = load_blueprint(write(tmp_path, GOOD), ["model.layout=[A, W, A, W]"])
    repeat = load_blueprint(write(tmp_path, GOOD), ["model.layout={repeat: AW, times: 2}"])
    for bp in (base, as_list, repeat):
        assert bp.model.layout == ["A", "W", "A", "W"]
        assert [c.window for c in bp.model.layers] == [None, 8, None, 8]


def test_overrides_change_one_layer_only(tmp_path):
    bp = load_blueprint(write(tmp_path, GOOD), ["model.overrides={3: {window: 2}}"])
    assert [c.window for c in bp.model.layers] == [None, 8, None, 2]
    assert bp.model.mixers["W"].window == 8


def test_extends_interpolation_and_command_line(tmp_path):
    write(tmp_path, GOOD, "parent.yaml")
    child = write(tmp_path, """
        extends: parent.yaml
        width: 96
        model:
          d_model: ${width}
          ffn: {hidden: "${oc.env:HIDDEN_FOR_TEST,256}"}
    """, "child.yaml")
    with pytest.raises(hyloom.BlueprintError, match="unknown key 'width'"):
        load_blueprint(child)
    bp = load_blueprint(child, ["~width", "model.d_model=80"])
    assert (bp.model.d_model, bp.model.ffn.hidden, bp.model.n_layers) == (80, 256, 4)


def test_interpolation_inside_one_file(tmp_path):
    path = write(tmp_path, GOOD.replace("n_layers: 4", "n_layers: 4\n  max_seq_len: ${model.d_model}"))
    assert load_blueprint(path).model.max_seq_len == 64


def test_extends_a_builtin_and_resolved_dump_round_trips(tmp_path):
    path = write(tmp_path, "extends: builtin:tiny\nmodel: {n_layers: 2, layout: SL}\n")
    bp = load_blueprint(path)
    again = write(tmp_path, to_yaml(bp.model_dump(mode="json")), "resolved.yaml")
    assert load_blueprint(again).model_dump() == bp.model_dump()


BAD = [
    # (what is wrong, blueprint edit as overrides or full text, expected fragments of the message)
    ("unknown mixer type", ["model.mixers.A.type=attn"],
     ["model.mixers.A.type", "'attn' is not a registered mixer", "did you mean 'attention'"]),
    ("misspelled key", ["model.mixers.A.hedas=4"], ["model.mixers.A.hedas", "unknown key 'hedas'", "'heads'"]),
    ("missing key", ["~model.d_model"], ["model.d_model", "required key is missing"]),
    ("wrong value type", ["model.mixers.A.heads=four"], ["model.mixers.A.heads", "valid integer", "'four'"]),
    ("layout too short", ["model.layout=AWA"], ["model.layout", "expands to 3 layers, but n_layers is 4"]),
    ("undefined symbol", ["model.layout=AWAX"], ["model.layout", "layer 3 uses symbol 'X'", "defined: A, W"]),
    ("override out of range", ["model.overrides={9: {window: 2}}"], ["model.overrides.9", "expected 0..3"]),
    ("override misspelled", ["model.overrides={1: {windw: 2}}"], ["model.overrides.1.windw", "did you mean 'window'"]),
    ("override changes type", ["model.overrides={1: {type: attention}}"], ["model.overrides.1.type", "cannot change"]),
    ("GQA mismatch", ["model.mixers.A.kv_heads=3"], ["model.mixers.A", "multiple of kv_heads"]),
    ("unknown position", ["model.position.type=rop"], ["model.position.type", "did you mean 'rope'"]),
    ("mixer without type", ["~model.mixers.A.type"], ["model.mixers.A", "'type' key", "attention"]),
    ("top-level typo", ["modle=1"], ["modle", "unknown key 'modle'", "did you mean 'model'"]),
    ("negative size", ["model.d_model=-8"], ["model.d_model", "greater than 0"]),
    ("layout not a list", ["model.layout=7"], ["model.layout", "string of one-letter symbols"]),
    ("bad layout repeat", ["model.layout={repeat: AW, times: 0}"], ["model.layout", "positive integer"]),
    ("missing requirement", ["requires=[hyloom-nonexistent>=1]"], ["requires.0", "hyloom-nonexistent is not installed"]),
    ("too old", ["requires=[hyloom>=99]"], ["requires.0", "hyloom 0.1.0 is installed"]),
    ("bad requirement", ["requires=[not a requirement!]"], ["requires.0", "not a valid requirement"]),
    ("bad interpolation", ["model.d_model=${model.nothing_here}"], ["model.d_model", "cannot resolve interpolation"]),
    ("bad override syntax", ["model.d_model"], ["<command line>", "must look like key.path=value"]),
    ("delete missing key", ["~model.nothing"], ["model.nothing", "cannot delete"]),
    ("bad norm", ["model.norm={type: layernorm}"], ["model.norm.type", "not a registered norm"]),
]


@pytest.mark.parametrize("case, overrides, fragments", BAD, ids=[c[0] for c in BAD])
def test_bad_blueprint_messages(tmp_path, case, overrides, fragments):
    path = write(tmp_path, GOOD)
    with pytest.raises(hyloom.BlueprintError) as info:
        load_blueprint(path, overrides)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    if "<command line>" not in message and "requires" not in overrides[0]:
        assert path in message or "<command line>" in message


BAD_FILES = [
    ("invalid YAML", "model: {d_model: 64\n", ["bp.yaml", "not valid YAML (line"]),
    ("not a mapping", "- a\n- b\n", ["bp.yaml", "must be a mapping"]),
    ("missing parent", "extends: nowhere.yaml\n", ["nowhere.yaml", "blueprint file not found"]),
    ("unknown builtin", "extends: builtin:tinny\n", ["builtin:tinny", "did you mean 'tiny'"]),
    ("bad extends", "extends: {a: 1}\n", ["bp.yaml", "extends", "a path or 'builtin:NAME'"]),
]


@pytest.mark.parametrize("case, text, fragments", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_blueprint_files(tmp_path, case, text, fragments):
    with pytest.raises(hyloom.BlueprintError) as info:
        load_blueprint(write(tmp_path, text))
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_cycle_in_extends(tmp_path):
    write(tmp_path, "extends: b.yaml\n", "a.yaml")
    write(tmp_path, "extends: a.yaml\n", "b.yaml")
    with pytest.raises(hyloom.BlueprintError, match="cycle"):
        load_blueprint(str(tmp_path / "a.yaml"))


def test_error_names_the_file_that_set_the_bad_value(tmp_path):
    parent = write(tmp_path, GOOD.replace("heads: 4, kv_heads: 2", "heads: four, kv_heads: 2"), "parent.yaml")
    child = write(tmp_path, "extends: parent.yaml\nmodel: {d_model: 32}\n", "child.yaml")
    with pytest.raises(hyloom.BlueprintError) as info:
        load_blueprint(child)
    assert f"{parent}: model.mixers.A.heads" in str(info.value)


@pytest.mark.parametrize("overrides, quoted", [
    (["model.mixers.S.window=8"], "window must be a multiple of block_size (block_size: 16, window: 8)"),
    (["train.batch_size=10", "train.grad_accum=3"], "batch_size (10) must be a multiple of grad_accum (3)\n"),
])
def test_a_component_check_quotes_the_values_it_names_not_the_whole_mapping(overrides, quoted):
    with pytest.raises(hyloom.BlueprintError) as info:
        load_blueprint("builtin:tiny", overrides)
    message = str(info.value) + "\n"
    assert quoted in message and "{" not in message, message


def test_cli_reports_bad_blueprints_with_status_2_and_no_traceback(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    assert main(["validate", path, "model.mixers.A.type=infllm"]) == 2
    err = capsys.readouterr().err
    assert "model.mixers.A.type: 'infllm' is not a registered mixer" in err
    assert "Traceback" not in err


def test_blueprint_reference_in_docs_is_current():
    from pathlib import Path

    from hyloom.blueprint.reference import markdown
    from hyloom.registry import reset

    reset(no_plugins=True)
    committed = (Path(__file__).resolve().parents[2] / "docs" / "blueprint-reference.md").read_text()
    assert committed == markdown(), "regenerate it with `make docs`"


def test_real_architectures_are_built_exactly():
    sala = load_blueprint("builtin:minicpm-sala").model
    assert [i for i, s in enumerate(sala.layout) if s == "S"] == [0, 9, 16, 17, 22, 29, 30, 31]
    sparse, linear = sala.layers[0], sala.layers[1]
    assert (sparse.type, sparse.heads, sparse.kv_heads, sparse.head_dim, sparse.topk, sparse.dense_len) == \
        ("infllm_v2", 32, 2, 128, 64, 8192)
    assert not sparse.qk_norm and sparse.gate and linear.qk_norm and linear.output_norm and linear.gate
    assert (linear.type, linear.heads, linear.head_dim, linear.decay) == ("lightning", 32, 128, "alibi")
    assert (sala.scale_emb, sala.scale_depth, sala.dim_model_base, sala.position.type) == (12, 1.4, 256, "hype")
    model = hyloom.build_model(load_blueprint("builtin:minicpm-sala"), device="meta")
    families = [b.mixer.capabilities.family for b in model.layers]
    positions = [type(b.position).__name__ for b in model.layers]
    assert all((f == "linear") == (p == "Rotary") for f, p in zip(families, positions))
    assert 9.0e9 < model.num_parameters() < 9.6e9

    hype = load_blueprint("builtin:hypenet-2b").model
    assert [i for i, s in enumerate(hype.layout) if s == "A"] == [2, 3, 6, 8, 9, 21, 25]
    assert (hype.position.type, hype.position.rope_theta, hype.position.a) == ("hype", 1e6, 500)
    assert {c.type for c in load_blueprint("builtin:minicpm4-8b").model.layers} == {"infllm_v2"}


def test_changing_a_component_type_in_a_child_replaces_the_mapping(tmp_path):
    write(tmp_path, GOOD, "parent.yaml")
    child = write(tmp_path, "extends: parent.yaml\nmodel: {position: {type: hype, a: 500}}\n", "child.yaml")
    assert load_blueprint(child).model.position.model_dump() == {"rope_theta": 10000.0, "scaling": None, "a": 500.0,
                                                                 "type": "hype"}
