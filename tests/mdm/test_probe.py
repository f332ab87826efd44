"""The attention-floating probe: reconstructed maps equal the layers' real outputs, known anchors are found, the
AR and MDM paths run, the CLI writes its files and refuses bad input."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from hyloom.cli import main
from hyloom.mixer import MixerContext
from hyloom.plugins.mdm.probe import anchors, layer_map, lightning_weights, probe_attention, softmax_weights
from hyloom.testing import tiny_model

ATTN = {"type": "attention", "heads": 4, "kv_heads": 2, "head_dim": 8}
LIGHT = {"type": "lightning", "heads": 2, "decay": "alibi", "bidirectional_decay": "symmetric"}


def captured(model, ids):
    """Each layer's (input, context), captured as the probe does."""
    seen = {}
    hooks = [b.mixer.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, (a[0], a[1], o)))
             for i, b in enumerate(model.layers)]
    model(ids)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 3])
def test_softmax_reconstruction_times_v_is_the_layer_output(causal, window):
    model = tiny_model(ATTN | {"window": window}, causal=causal, n_layers=1)
    x, ctx, out = captured(model, torch.randint(0, 61, (2, 9)))[0]
    mixer = model.layers[0].mixer
    probs, v = softmax_weights(mixer, x, ctx)
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
    o = (probs @ v).transpose(1, 2)
    torch.testing.assert_close(mixer.output(o, x), out, rtol=1e-4, atol=1e-5)


def test_infllm_v2_short_context_map_is_its_dense_output():
    model = tiny_model({"type": "infllm_v2", "heads": 2, "kv_heads": 1, "head_dim": 16}, n_layers=1)
    x, ctx, out = captured(model, torch.randint(0, 61, (1, 9)))[0]
    mixer = model.layers[0].mixer
    assert x.shape[1] < mixer.sparse.dense_len  # below dense_len the layer is dense: the map is exact
    probs, v = softmax_weights(mixer, x, ctx)
    torch.testing.assert_close(mixer.output((probs @ v).transpose(1, 2), x), out, rtol=1e-4, atol=1e-5)
    assert layer_map(mixer, x, ctx)[1].endswith("(exact: below dense_len)")


@pytest.mark.parametrize("causal,decay", [(True, "symmetric"), (False, "symmetric"), (False, "none")])
def test_lightning_implicit_attention_times_v_is_the_recurrence(causal, decay):
    model = tiny_model(LIGHT | {"bidirectional_decay": decay, "output_norm": False, "gate": False},
                       causal=causal, n_layers=1)
    x, ctx, out = captured(model, torch.randint(0, 61, (2, 11)))[0]
    mixer = model.layers[0].mixer
    weights, v = lightning_weights(mixer, x, ctx)
    o = (weights @ v).transpose(1, 2).reshape(*x.shape[:2], -1)
    torch.testing.assert_close(mixer.o_proj(o), out, rtol=1e-4, atol=1e-5)
    map_BTT = layer_map(mixer, x, ctx)[0]  # the probe's view: |weights|, each query row summing to 1
    torch.testing.assert_close(map_BTT.sum(-1), torch.ones(map_BTT.shape[:2]))


def test_anchors_are_mean_plus_three_std_outliers():
    T = 12
    every_query_to_0 = torch.zeros(T, T)
    every_query_to_0[:, 0] = 1
    assert anchors(every_query_to_0)[:2] == ([0], 1.0)
    assert anchors(torch.full((T, T), 1 / T))[:2] == ([], 0.0)  # uniform: no outlier


def sink_at_start(causal):
    """Layer 0 attends (every head, every query) to the token 0 and nothing else: NoPE, q constant, k large only
    for token 0, whose embedding alone has a component on dimension 1 (all share one on dimension 0)."""
    model = tiny_model(ATTN, layout="AM", mixers={"A": ATTN}, causal=causal, position={"type": "nope"})
    with torch.no_grad():
        emb = model.embed_tokens.weight
        emb[:, :2] = 0
        emb[:, 0] = 3.0
        emb[0, 1] = 3.0
        mixer = model.layers[0].mixer
        mixer.q_proj.weight.zero_()
        mixer.k_proj.weight.zero_()
        mixer.q_proj.weight[:, 0] = 10.0
        mixer.k_proj.weight[:, 1] = 10.0
    return model


@pytest.mark.parametrize("causal", [True, False])
def test_a_hand_built_sink_is_the_only_anchor(causal):
    model = sink_at_start(causal)
    prompt = [0] + list(range(5, 16))
    report = probe_attention(model, prompt, steps=4, mask_id=60)
    assert report["mode"] == ("ar" if causal else "mdm") and len(report["steps"]) == 4
    for step in report["steps"]:
        if 0 in step["ids"][1:]:  # the model generated the sink token again: its position draws attention too
            continue
        got = step["layers"]["0"]
        assert got["anchors"] == [0] and got["share"] > 0.99
    # the last step still has the sink; the model decoded every mask
    assert report["steps"][-1]["layers"]["0"]["anchors"][0] == 0 and 60 not in report["final_ids"]
    assert report["steps"][1]["layers"]["0"]["jaccard_prev"] is not None


def test_hybrid_mdm_probe_runs_every_layer_kind():
    model = tiny_model(LIGHT, layout="MA", mixers={"A": ATTN}, causal=False)
    report = probe_attention(model, list(range(3, 10)), steps=2, new_tokens=4, mask_id=1)
    assert set(report["layers"]) == {"0", "1"} and report["layers"]["0"].startswith("lightning")
    assert [len(s["ids"]) for s in report["steps"]] == [11, 11]
    assert sum(s["ids"].count(1) for s in report["steps"]) == 4 + 2  # masks seen: 4, then 2


def test_probe_cli_on_a_causal_checkpoint_decodes_greedily(tmp_path, mdm_blueprint, capsys):
    bp = Path(mdm_blueprint(tmp_path, causal=True))
    data = yaml.safe_load(bp.read_text())
    data["train"]["objective"] = {"type": "next_token"}
    bp.write_text(yaml.safe_dump(data))
    assert main(["train", str(bp), "--no-progress", "--device", "cpu"]) == 0
    out = tmp_path / "probe"
    assert main(["probe", "attention", str(tmp_path / "run"), "--prompt", "def f(x):", "--steps", "3",
                 "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "probe.json").read_text())
    lengths = [len(s["ids"]) for s in report["steps"]]
    assert report["mode"] == "ar" and lengths == [lengths[0], lengths[0] + 1, lengths[0] + 2]


def test_probe_cli_on_a_trained_checkpoint(tmp_path, mdm_blueprint, capsys):
    assert main(["train", mdm_blueprint(tmp_path), "--no-progress", "--device", "cpu"]) == 0
    capsys.readouterr()
    out = tmp_path / "probe"
    assert main(["probe", "attention", str(tmp_path / "run"), "--prompt", "def f(x):", "--steps", "2",
                 "--new-tokens", "4", "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "probe.json").read_text())
    assert report["mode"] == "mdm" and len(report["steps"]) == 2
    assert {p.name for p in out.iterdir()} >= {"probe.json", "anchors.png", "share.png", "anchors-layer0.png"}
    for bad in (["--prompt", ""], ["--prompt", "x", "--steps", "0"], ["--prompt", "x", "--steps", "4",
                                                                      "--new-tokens", "2"]):
        assert main(["probe", "attention", str(tmp_path / "run"), *bad, "--device", "cpu"]) == 2
    assert "--new-tokens (2) is fewer than --steps (4)" in capsys.readouterr().err
    assert main(["probe", "attention", str(tmp_path), "--prompt", "x"]) == 2  # no checkpoint there
    assert "neither a checkpoint" in capsys.readouterr().err
