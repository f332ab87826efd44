"""Plugins: a real third-party distribution, broken ones, disabling, strict mode, conflicts, every hook."""

import importlib.util
import inspect
import json
import re
import sys
import warnings
from pathlib import Path

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn

import hyloom
from hyloom.cli import main
from hyloom.cli.parser import command_parser
from hyloom.blueprint import Problem
from hyloom.hookspecs import KINDS
from hyloom.mixer import CapabilityError, Mixer, MixerCapabilities
from hyloom.registry import PluginError, registry
from hyloom.testing import check_checkpoint_round_trip, check_decode, check_left_padding, check_mixer, check_packed, tiny_model

ROOT = Path(__file__).resolve().parents[2]

BLUEPRINT = """
model:
  d_model: 32
  n_layers: 3
  vocab_size: 50
  mixers:
    C: {type: short_conv, kernel: 3}
    A: {type: attention, heads: 2, head_dim: 16}
  layout: CAC
  ffn: {type: swiglu, hidden: 64}
requires: ["hyloom-example-plugin>=0.2"]
"""


def _plugin(name):
    return next(p for p in registry().plugins if p.name == name)


def test_example_plugin_mixer_used_from_a_blueprint(example_plugin_dir, on_path, tmp_path):
    on_path(example_plugin_dir)
    info = _plugin("example")
    assert (info.dist, info.version, info.status) == ("hyloom-example-plugin", "0.2.0", "ok")
    assert registry().get("mixer", "short_conv").dist == "hyloom-example-plugin"
    path = tmp_path / "conv.yaml"
    path.write_text(BLUEPRINT)
    model = hyloom.build_model(hyloom.load_blueprint(str(path)))
    ids = torch.randint(0, 50, (2, 9))
    full = model(ids)
    logits, cache = model.prefill(ids[:, :5], logits_at="all")
    steps = [model.decode_step(ids[:, t], cache) for t in range(5, 9)]
    torch.testing.assert_close(torch.cat([logits, torch.stack(steps, 1)], 1), full, rtol=1e-5, atol=1e-5)


def test_example_plugin_in_cli_and_schema(example_plugin_dir, on_path, capsys):
    on_path(example_plugin_dir)
    assert main(["plugins", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert listed["example"]["registered"] == ["mixer:short_conv"]
    assert main(["schema"]) == 0
    assert "short_conv" in capsys.readouterr().out
    assert main(["--no-plugins", "plugins", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert listed["example"]["status"] == "disabled"


def test_requires_fails_fast_without_the_plugin(tmp_path):
    path = tmp_path / "conv.yaml"
    path.write_text(BLUEPRINT)
    with pytest.raises(hyloom.BlueprintError, match="hyloom-example-plugin is not installed"):
        hyloom.load_blueprint(str(path))


BROKEN = "raise RuntimeError('this plugin is broken on purpose')\n"


def test_broken_plugin_is_reported_and_the_rest_work(make_distribution, example_plugin_dir, on_path, tmp_path, capsys):
    on_path(make_distribution(tmp_path / "b", "broken-plugin", "1.0", "broken_mod", BROKEN, "broken"),
            example_plugin_dir)
    with pytest.warns(UserWarning, match="plugin 'broken'.*broken on purpose"):
        registry()
    assert _plugin("broken").status == "failed"
    assert _plugin("example").status == "ok"
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"failed\s+broken", out) and "broken on purpose" in out


def test_strict_mode_makes_a_broken_plugin_fatal(make_distribution, on_path, tmp_path, monkeypatch, capsys):
    on_path(make_distribution(tmp_path / "b", "broken-plugin", "1.0", "broken_mod", BROKEN, "broken"))
    monkeypatch.setenv("HYLOOM_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="broken-plugin"):
        registry()
    assert main(["ls"]) == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("name", ["broken", "broken-plugin", "all"])
def test_disabled_plugins_are_not_imported(make_distribution, on_path, tmp_path, monkeypatch, name):
    on_path(make_distribution(tmp_path / "b", "broken-plugin", "1.0", "broken_mod", BROKEN, "broken"))
    monkeypatch.setenv("HYLOOM_DISABLE_PLUGINS", f"something_else,{name}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _plugin("broken").status == "disabled"


MISSPELLED = """
from hyloom.hookspecs import hookimpl

@hookimpl
def hyloom_register_mixer(register):  # the hook is hyloom_register_mixers
    pass
"""

BAD_ARGUMENT = """
def hyloom_register_norms(registr):
    pass
"""


@pytest.mark.parametrize("source, needle", [(MISSPELLED, "hyloom_register_mixer"), (BAD_ARGUMENT, "registr")])
def test_misspelled_hooks_are_caught(make_distribution, on_path, tmp_path, source, needle):
    on_path(make_distribution(tmp_path / "m", "typo-plugin", "0.1", "typo_mod", source, "typo"))
    with pytest.warns(UserWarning, match="typo"):
        registry()
    info = _plugin("typo")
    assert info.status == "failed" and needle in info.error


CONFLICT = """
from hyloom.hookspecs import hookimpl
from hyloom.plugins.transformer import AttentionConfig

@hookimpl
def hyloom_register_mixers(register):
    register("attention", lambda cfg, layer, model: None, config=AttentionConfig, summary="mine",
             capabilities=__import__("hyloom.mixer").mixer.MixerCapabilities(family="softmax"){override})
"""


def test_two_providers_of_one_name_fail_naming_both(make_distribution, on_path, tmp_path):
    on_path(make_distribution(tmp_path / "c", "conflict-plugin", "3.1", "conflict_mod",
                              CONFLICT.format(override=""), "conflict"))
    with pytest.raises(PluginError, match=r"mixer 'attention' .* hyloom 0\.1\.0 and conflict-plugin 3\.1"):
        registry()


def test_override_replaces_a_registration(make_distribution, on_path, tmp_path):
    on_path(make_distribution(tmp_path / "c", "conflict-plugin", "3.1", "conflict_mod",
                              CONFLICT.format(override=", override=True"), "conflict"))
    assert registry().get("mixer", "attention").dist == "conflict-plugin"


RAISES_MIDWAY = """
from hyloom.hookspecs import hookimpl

@hookimpl
def hyloom_register_positions(register):
    register("midway_position", lambda cfg: None, summary="registered before the failure")

@hookimpl
def hyloom_register_ffns(register):
    register("Bad Name", lambda cfg, d: None, summary="not a valid name")
"""


def test_a_plugin_failing_while_registering_leaves_nothing_behind(make_distribution, on_path, tmp_path):
    on_path(make_distribution(tmp_path / "r", "midway-plugin", "0.1", "midway_mod", RAISES_MIDWAY, "midway"))
    with pytest.warns(UserWarning, match="Bad Name"):
        registry()
    assert _plugin("midway").status == "failed"
    assert "midway_position" not in registry().names("position")


EVERY_KIND = """
from hyloom.hookspecs import hookimpl
from hyloom.mixer import MixerCapabilities

def _noop(*args):
    return None

{hooks}
"""


def test_every_hook_registers_through_a_plugin(make_distribution, on_path, tmp_path):
    hooks = []
    for kind, hook in KINDS.items():
        caps = "MixerCapabilities(family='linear')" if kind == "mixer" else "None"
        hooks.append(f"@hookimpl\ndef {hook}(register):\n"
                     f"    register('probe_{kind}', _noop, summary='probe', capabilities={caps})\n")
    source = EVERY_KIND.format(hooks="\n".join(hooks))
    on_path(make_distribution(tmp_path / "e", "every-kind", "0.1", "every_kind_mod", source, "every"))
    for kind in KINDS:
        assert registry().get(kind, f"probe_{kind}").dist == "every-kind"


def test_every_hook_is_documented():
    # (every hook is exercised by test_every_hook_registers_through_a_plugin, which implements all of KINDS)
    docs = "\n".join(p.read_text() for p in (ROOT / "docs").rglob("*.md"))
    for hook in KINDS.values():
        assert hook in docs, f"{hook} is not documented in docs/"


# ---- in-process registration, capabilities and hyloom.testing ----------------------------------------------

class MeanConfig(BaseModel):
    # each switch breaks one contract, to show that the matching check in hyloom.testing catches it
    mask_padding: bool = True
    use_cache: bool = True
    pack: bool = True
    random_constant: bool = False
    largest_d_model: int = 1024  # checked in build, which sees the whole model


def _build_mean(cfg, layer, model):
    if model.d_model > cfg.largest_d_model:
        raise ValueError(f"d_model {model.d_model} is more than largest_d_model {cfg.largest_d_model}")
    return RunningMean(cfg, model.d_model)


class RunningMean(Mixer):
    """The mean of the (gated) inputs so far: decodes with a running sum, honours padding and packing, and
    keeps a constant of its config in a non-persistent buffer (not saved; checkpoint loading must remake it)."""

    def __init__(self, cfg: MeanConfig, d_model: int):
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(d_model, d_model, bias=False)
        gate = torch.rand(d_model) if cfg.random_constant else torch.linspace(0.5, 1.5, d_model)
        self.register_buffer("gate", gate, persistent=False)

    def forward(self, x_BTD, ctx):
        T = x_BTD.shape[1]
        keep = torch.ones_like(x_BTD[..., :1])
        if ctx.valid_BS is not None and self.cfg.mask_padding:
            keep = ctx.valid_BS[:, -T:, None].to(x_BTD.dtype)
        total, count = (self.proj(x_BTD) * self.gate * keep).cumsum(1), keep.cumsum(1)
        if ctx.cu_seqlens is not None and self.cfg.pack:  # subtract what came before each sequence's start
            start = ctx.cu_seqlens[torch.bucketize(torch.arange(T), ctx.cu_seqlens[1:], right=True)].long()
            total = total - F.pad(total, (0, 0, 1, 0))[:, start]
            count = count - F.pad(count, (0, 0, 1, 0))[:, start]
        if ctx.cache is not None and self.cfg.use_cache:
            total, count = total + ctx.cache["total"], count + ctx.cache["count"]
            ctx.cache["total"], ctx.cache["count"] = total[:, -1:], count[:, -1:]
        return total / count.clamp_min(1)

    def new_cache(self, batch, device, dtype):
        return {"total": torch.zeros(batch, 1, self.gate.shape[0], device=device, dtype=dtype),
                "count": torch.zeros(batch, 1, 1, device=device, dtype=dtype)}


class MeanPlugin:
    """A plugin given in-process: the hook functions are plain attributes of any object."""

    def hyloom_register_mixers(register):
        register("mean", _build_mean, config=MeanConfig, summary="running mean",
                 capabilities=MixerCapabilities(family="linear", varlen=True), example={"type": "mean"})
        register("mean_plain", _build_mean, config=MeanConfig, summary="running mean, no packing, no decoding",
                 capabilities=MixerCapabilities(family="linear", decode=False), example={"type": "mean_plain"})


@pytest.fixture
def mean_plugin():
    name = hyloom.register_plugin(MeanPlugin)
    yield name
    hyloom.unregister_plugin(name)


def test_register_plugin_in_process(mean_plugin, capsys):
    assert mean_plugin == "MeanPlugin"
    assert registry().get("mixer", "mean").dist == "<in-process>"
    hyloom.registry.reset()  # like an installed plugin, it stays registered when the registry is rebuilt
    assert "mean" in registry().names("mixer")
    assert main(["plugins"]) == 0
    assert re.search(r"ok\s+MeanPlugin\s+<in-process>", capsys.readouterr().out)
    assert main(["--no-plugins", "plugins", "--json"]) == 0
    assert {p["name"]: p["status"] for p in json.loads(capsys.readouterr().out)}["MeanPlugin"] == "disabled"
    hyloom.registry.reset()
    hyloom.register_plugin(MeanPlugin)  # again (a re-run notebook cell): replaces, no conflict
    hyloom.unregister_plugin("MeanPlugin")
    assert "mean" not in registry().names("mixer")
    hyloom.register_plugin(MeanPlugin)  # for the fixture to remove


def test_register_plugin_refuses_mistakes_and_leaves_nothing_behind():
    conflict = SimpleNamespace(hyloom_register_mixers=lambda register: register(
        "attention", _build_mean, summary="taken", capabilities=MixerCapabilities(family="linear")))
    with pytest.raises(PluginError, match="mixer 'attention' is provided by two distributions"):
        hyloom.register_plugin(conflict, name="conflict")
    misspelled = SimpleNamespace(hyloom_register_mixer=lambda register: None)
    with pytest.raises(PluginError, match="hyloom_register_mixer"):
        hyloom.register_plugin(misspelled, name="typo")
    with pytest.raises(TypeError, match="pass name="):
        hyloom.register_plugin(misspelled)
    assert not {"conflict", "typo"} & {p.name for p in registry().plugins}
    assert registry().get("mixer", "attention").dist == "hyloom"


def test_config_errors_of_a_plugin_are_blueprint_problems(mean_plugin, tmp_path, capsys):
    path = tmp_path / "mean.yaml"
    path.write_text("model: {d_model: 32, n_layers: 2, vocab_size: 50, mixers: {M: {type: mean}}, layout: MM,\n"
                    "        ffn: {type: swiglu, hidden: 64}}\n")
    assert main(["validate", str(path), "model.mixers.M.largest_d_model=16"]) == 2  # raised in build
    err = capsys.readouterr().err
    assert "model.mixers.M: cannot build mixer 'mean' for layer 0: d_model 32 is more than largest_d_model 16" in err
    assert "Traceback" not in err
    assert main(["validate", str(path), "model.mixers.M.pack=maybe"]) == 2  # pydantic, in the config
    assert "model.mixers.M.pack: Input should be a valid boolean" in capsys.readouterr().err


def test_a_plugin_mixer_passes_every_check_of_hyloom_testing(mean_plugin, tmp_path):
    check_mixer(tiny_model({"type": "mean"}), tmp_path)  # includes the round trip of a non-persistent buffer


def test_capabilities_a_mixer_lacks_are_refused_naming_the_layer(mean_plugin, tmp_path):
    model = tiny_model({"type": "mean_plain"}, n_layers=3, layout="AMA", mixers={"A": {"type": "attention", "heads": 2}})
    ids = torch.randint(0, 61, (1, 8))
    with pytest.raises(CapabilityError, match=r"'varlen' capability; layers\.1 \(mean_plain\) does not"):
        model(ids, cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32))
    with pytest.raises(CapabilityError, match=r"'decode' capability; layers\.1 \(mean_plain\) does not"):
        model.generate([[1, 2, 3]], max_new_tokens=2)
    check_mixer(model, tmp_path)  # the refusals are what the checks expect of such a mixer


def _add_generate_plain(sub):  # a command that decodes with a model that cannot
    p = command_parser(sub, "generate-plain", "generate with a mixer that cannot decode", "  hyloom generate-plain\n")
    p.set_defaults(func=lambda args: tiny_model({"type": "mean_plain"}).generate([[1, 2]], max_new_tokens=1))


def test_the_cli_reports_a_missing_capability_without_a_traceback(mean_plugin, capsys):
    plugin = SimpleNamespace(hyloom_register_commands=lambda register: register(
        "generate-plain", _add_generate_plain, summary="decode without the capability"))
    hyloom.register_plugin(plugin, name="generate_plain")
    try:
        assert main(["generate-plain"]) == 2
    finally:
        hyloom.unregister_plugin("generate_plain")
    err = capsys.readouterr().err
    assert "layers.0 (mean_plain), layers.1 (mean_plain) do not declare it" in err and "Traceback" not in err


@pytest.mark.parametrize("broken, check", [
    ({"mask_padding": False}, check_left_padding),
    ({"use_cache": False}, check_decode),
    ({"pack": False}, check_packed),
    ({"random_constant": True}, "round trip"),
])
def test_each_check_catches_the_defect_it_is_for(mean_plugin, tmp_path, broken, check):
    model = tiny_model({"type": "mean", **broken})
    with pytest.raises(AssertionError):
        if check == "round trip":
            check_checkpoint_round_trip(model, tmp_path / "ckpt")
        else:
            check(model)



def test_the_example_plugins_own_tests_pass(example_plugin_dir, on_path, tmp_path):
    """The tests shipped in docs/examples/hyloom-example-plugin/tests, run against the installed plugin."""
    on_path(example_plugin_dir)
    path = ROOT / "docs" / "examples" / "hyloom-example-plugin" / "tests" / "test_short_conv.py"
    spec = importlib.util.spec_from_file_location("example_plugin_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tests = [(name, fn) for name, fn in vars(module).items() if name.startswith("test_")]
    assert len(tests) == 3
    for name, fn in tests:
        args = {"tmp_path": tmp_path / name} if "tmp_path" in inspect.signature(fn).parameters else {}
        fn(**args)


def _cmd_hello(args):
    if args.name == "nobody":  # bad input: one line on stderr, status 2
        print("hyloom hello: nobody to greet", file=sys.stderr)
        return 2
    if args.name == "file":  # a blueprint problem raised: hyloom prints it and exits with 2
        raise hyloom.BlueprintError([Problem("model.d_model", "must be positive", "file.yaml")])
    print(f"hello {args.name}")
    return 3 if args.name == "three" else 0


def _add_hello(sub):
    p = command_parser(sub, "hello", "say hello", "  hyloom hello world\n")
    p.add_argument("name")
    p.set_defaults(func=_cmd_hello)


def test_a_plugin_command_gets_examples_and_its_exit_status(capsys):
    plugin = SimpleNamespace(hyloom_register_commands=lambda register: register("hello", _add_hello, summary="hi"))
    hyloom.register_plugin(plugin, name="hello_plugin")
    try:
        assert main(["hello", "world"]) == 0
        assert "hello world" in capsys.readouterr().out
        assert main(["hello", "three"]) == 3
        assert main(["hello", "nobody"]) == 2
        assert "nobody to greet" in capsys.readouterr().err
        assert main(["hello", "file"]) == 2
        assert "file.yaml: model.d_model: must be positive" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            main(["hello", "--help"])
        assert "examples:\n  hyloom hello world" in capsys.readouterr().out
    finally:
        hyloom.unregister_plugin("hello_plugin")
