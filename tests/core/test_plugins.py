"""Plugins: a real third-party distribution, broken ones, disabling, strict mode, conflicts, every hook."""

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

import hyloom
from hyloom.cli import main
from hyloom.hookspecs import KINDS
from hyloom.registry import PluginError, registry

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
    logits, cache = model.prefill(ids[:, :5])
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
