"""Layer selectors: the scoring and choosing rules on synthetic score tables, the even and fixed layouts, the
refusals, the swap harness, and halo and kl end to end on a tiny random teacher whose twins are rigged so that
the right answer is known."""

import copy
import json
from dataclasses import replace as dataclasses_replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pydantic import BaseModel, TypeAdapter

from hyloom.blueprint import BlueprintError
from hyloom.eval import EvalContext, EvalResult
from hyloom.hookspecs import hookimpl
from hyloom.mixer import Mixer, MixerCapabilities
from hyloom.plugins.convert.selection import (SelectionContext, SelectionError, drop_errors, even_layers,
                                              halo_scores, resolve_pins, standard_error, top_layers)
from hyloom.plugins.convert.selectors import sequence_losses, swapped
from hyloom.registry import register_plugin, registry, unregister_plugin
from hyloom.testing import tiny_model

ATTENTION = {"type": "attention", "heads": 4, "kv_heads": 2, "head_dim": 8, "qk_norm": True}
L = 4


def selector(name, **cfg):
    reg = registry().get("selector", name)
    return reg.build(TypeAdapter(reg.config).validate_python({"type": name, **cfg}))


def teacher(**model):
    return tiny_model(ATTENTION, n_layers=L, vocab_size=128, **model)


def twins_of():
    """An all-Lightning model of the teacher's shape: its layers' mixers are the twins (what `align` trains)."""
    return tiny_model({"type": "lightning", "heads": 2, "head_dim": 16}, n_layers=L, vocab_size=128, seed=1)


class Zero(Mixer):
    """A twin that drops the layer's mixer altogether."""

    capabilities = MixerCapabilities(family="linear")

    def forward(self, x_BTD, ctx):
        return torch.zeros_like(x_BTD)


def eval_ctx(heldout, tokenizer_vocab=64):
    return EvalContext(model=None, tokenizer=SimpleNamespace(vocab_size=tokenizer_vocab, eos_id=0), device="cpu",
                       heldout_ids=lambda: heldout, train_len=64, batch_size=4)


HELDOUT = np.random.default_rng(0).integers(0, 64, 2000).astype(np.uint16)


# ---- the pure rules -----------------------------------------------------------------------------------------

def test_top_layers_takes_the_highest_scores_and_breaks_ties_by_the_lower_index():
    assert top_layers([1.0, 3.0, 3.0, 0.0, 3.0], 2, []) == [1, 2]
    assert top_layers([1.0, 3.0, 3.0, 0.0, 3.0], 3, []) == [1, 2, 4]
    assert top_layers([0.0] * 5, 2, []) == [0, 1]  # all tied: the first ones


def test_top_layers_budgets_of_zero_and_all_and_pins_count_toward_the_budget():
    scores = [5.0, 1.0, 4.0, 2.0]
    assert top_layers(scores, 0, []) == []
    assert top_layers(scores, 4, []) == [0, 1, 2, 3]
    assert top_layers(scores, 2, [1]) == [0, 1]  # the pinned low scorer stays; one slot left
    assert top_layers(scores, 2, [1, 3]) == [1, 3]
    with pytest.raises(SelectionError, match="layer 2"):
        top_layers([1.0, 2.0, float("nan")], 1, [])


def test_halo_score_formula_cap_and_eps():
    # R drop / (C drop + eps): layer 0 is the best at both (0), layer 1 loses recall cheaply, layer 2 costly
    s = halo_scores([1.0, 0.5, 0.5], [-2.0, -2.1, -3.0], eps=1e-3, cap=50.0)
    assert s == pytest.approx([0.0, 0.5 / 0.101, 0.5 / 1.001])
    # no quality lost: the eps keeps it finite, the cap bounds it
    assert halo_scores([1.0, 0.0], [-1.0, -1.0], eps=0.1, cap=50.0) == pytest.approx([0.0, 10.0])
    assert halo_scores([1.0, 0.0], [-1.0, -1.0], eps=1e-3, cap=50.0) == [0.0, 50.0]
    assert halo_scores([0.3] * 3, [-1.0, -2.0, -3.0], 1e-3, 50.0) == [0.0] * 3  # no recall anywhere
    with pytest.raises(SelectionError, match="recall of layer 1"):
        halo_scores([1.0, None], [0.0, 0.0], 1e-3, 50.0)


def test_halo_noise_option_reads_each_drop_against_its_standard_error():
    recall, quality = [1.0, 0.95, 0.5, 1.0], [-2.0, -2.0, -2.3, -2.001]
    spec = halo_scores(recall, quality, eps=0.01, cap=50.0)  # the default: SPEC's formula, noise and all
    assert spec == pytest.approx([0.0, 0.05 / 0.01, 0.5 / 0.31, 0.0])
    assert halo_scores(recall, quality, 0.01, 50.0, noise_sigmas=0.0, recall_drop_se=[None] * 4,
                       quality_drop_se=[None] * 4) == spec  # k = 0 ignores the errors
    # layer 1's recall drop (0.05) is within 2 s.e. (0.03 each): none; layer 2's quality drop is raised to 2 s.e.
    noisy = halo_scores(recall, quality, 0.01, 50.0, noise_sigmas=2.0, recall_drop_se=[0.0, 0.03, 0.03, 0.0],
                        quality_drop_se=[0.0, 0.01, 0.2, 0.01])
    assert noisy == pytest.approx([0.0, 0.0, 0.5 / (0.4 + 0.01), 0.0])
    with pytest.raises(SelectionError, match="noise_sigmas 2.0 needs the standard error of every quality drop"):
        halo_scores(recall, quality, 0.01, 50.0, noise_sigmas=2.0, recall_drop_se=[0.0] * 4,
                    quality_drop_se=[0.0, None, 0.0, 0.0])


def test_standard_errors_of_values_and_of_paired_drops():
    assert standard_error([1.0, 3.0]) == pytest.approx(1.0)  # sd sqrt(2), over sqrt(2)
    assert standard_error([2.0]) is None and standard_error(None) is None
    # layer 1 is layer 0 shifted down by 0.5 on every case: a drop of exactly 0.5, no noise once paired
    cases = [[1.0, 3.0, 5.0], [0.5, 2.5, 4.5], [3.0, 1.0, 5.0]]
    assert drop_errors(cases) == pytest.approx([0.0, 0.0, standard_error([-2.0, 2.0, 0.0])])
    assert standard_error(cases[1]) == pytest.approx(2 / 3 ** 0.5)  # unpaired: the spread between cases
    assert drop_errors([[1.0], None]) == [None, None]
    with pytest.raises(SelectionError, match="different numbers of cases"):
        drop_errors([[1.0, 2.0], [1.0]])


def test_even_spacing_ends_on_the_last_layer_and_spreads_around_pins():
    assert even_layers(28, 7, []) == [3, 7, 11, 15, 19, 23, 27]
    assert even_layers(4, 2, []) == [1, 3]
    assert even_layers(5, 2, []) == [1, 4]
    assert even_layers(4, 0, []) == []
    assert even_layers(4, 4, []) == [0, 1, 2, 3]
    assert even_layers(8, 4, [0, 7]) == [0, 3, 6, 7]  # two more over the free layers 1..6


def test_pins_resolve_negative_indices_and_are_refused_outside_the_model():
    assert resolve_pins([0, -1], 4) == [0, 3]
    with pytest.raises(SelectionError, match="layer 4 does not exist"):
        resolve_pins([4], 4)
    with pytest.raises(SelectionError, match="names one layer twice"):
        resolve_pins([0, -4], 4)


# ---- even and fixed through the registry -------------------------------------------------------------------

def test_even_and_fixed_selections():
    assert selector("even").select(SelectionContext(8, 2)).kept == [3, 7]
    assert selector("even", pin=[0, -1]).select(SelectionContext(8, 2)).kept == [0, 7]
    assert selector("even", pin=[0]).select(SelectionContext(8, 3)).kept == [0, 3, 7]
    assert selector("fixed", layers=[2, -1]).select(SelectionContext(4, 2)).kept == [2, 3]
    assert selector("fixed", layers=[1], pin=[0]).select(SelectionContext(4, 2)).kept == [0, 1]
    assert selector("fixed", layers=[]).select(SelectionContext(4, 0)).kept == []


@pytest.mark.parametrize("name,cfg,n,budget,message", [
    ("even", {}, 4, -1, r"budget -1 is outside \[0, 4\]"),
    ("even", {}, 4, 5, r"budget 5 is outside \[0, 4\]"),
    ("kl", {}, 4, 5, r"budget 5 is outside \[0, 4\]"),
    ("even", {"pin": [0, -1]}, 4, 1, "smaller than the 2 pinned layers"),
    ("even", {"pin": [6]}, 4, 1, "layer 6 does not exist"),
    ("fixed", {"layers": [0, 4]}, 4, 2, "layer 4 does not exist"),
    ("fixed", {"layers": [1, -3]}, 4, 2, "names one layer twice"),
    ("fixed", {"layers": [1, 2]}, 4, 3, "keep 2 layers, but the budget is 3"),
    ("fixed", {"layers": [1, 2], "pin": [0]}, 4, 2, "keep 3 layers, but the budget is 2"),
])
def test_bad_input_is_refused_before_any_work(name, cfg, n, budget, message):
    with pytest.raises(SelectionError, match=message):
        selector(name, **cfg).check(n, budget)
    with pytest.raises(SelectionError, match=message):  # a teacher that raises if touched: nothing ran
        selector(name, **cfg).select(SelectionContext(n, budget, teacher=SimpleNamespace(layers=[None] * n),
                                                      twin=_untouchable, eval=_untouchable))


def _untouchable(*args):
    raise AssertionError("measured before the input was checked")


def test_measuring_selectors_refuse_without_eval_data_or_teacher():
    for name in ("halo", "kl"):
        with pytest.raises(SelectionError, match="held-out data, and none is given"):
            selector(name).check(4, 1, heldout=False)
        with pytest.raises(SelectionError, match="held-out data, and none is given"):
            selector(name).select(SelectionContext(L, 1, teacher=teacher(), twin=lambda i: Zero()))
        with pytest.raises(SelectionError, match="needs the teacher and the twins"):
            selector(name).select(SelectionContext(L, 1, eval=eval_ctx(HELDOUT)))
    selector("even").check(4, 1, heldout=False)  # even and fixed need nothing


def test_halo_task_configs_are_checked_when_it_is_built():
    with pytest.raises(BlueprintError, match="selector.recall.lengths"):
        selector("halo", recall={"type": "passkey", "lengths": "long"})
    with pytest.raises(BlueprintError, match="selector.quality.bogus"):
        selector("halo", quality={"type": "loss_by_position", "bogus": 1})


def test_every_registered_example_validates_and_builds():
    for reg in registry().all("selector"):
        assert reg.example is not None, reg.name
        selector(reg.name, **{k: v for k, v in reg.example.items() if k != "type"})


# ---- the swap harness --------------------------------------------------------------------------------------

def test_swap_replaces_one_mixer_and_its_position_encoding_and_restores_them_exactly():
    from hyloom.plugins.position.rotary import Rotary

    model = teacher(position={"type": "hype", "rope_theta": 10000})  # attention: no rotation; linear: RoPE
    twins = twins_of()
    ids = torch.randint(0, 128, (2, 12))
    before = model(ids)
    block = model.layers[2]
    saved = block.mixer, block.position, block.capabilities
    with swapped(model, 2, twins.layers[2].mixer):
        assert block.mixer is twins.layers[2].mixer
        assert isinstance(block.position, Rotary) and not isinstance(saved[1], Rotary)
        assert block.capabilities.family == "linear"
        assert not torch.equal(model(ids), before)
    assert all(now is was for now, was in zip((block.mixer, block.position, block.capabilities), saved))
    assert torch.equal(model(ids), before)
    with pytest.raises(RuntimeError, match="measurement failed"), swapped(model, 1, Zero()):
        raise RuntimeError("measurement failed")
    assert torch.equal(model(ids), before)
    assert dict(model.named_parameters()).keys() == dict(teacher().named_parameters()).keys()


# ---- kl, rigged: a twin equal to the teacher's own mixer costs nothing, a zero twin costs something ----------

def test_kl_drops_the_layer_whose_twin_changes_nothing():
    model = teacher()
    reference = model(torch.from_numpy(HELDOUT[:64].astype(np.int64))[None])
    free = 2  # its twin is a copy of the teacher's own mixer: swapping it changes nothing
    twin = {i: copy.deepcopy(model.layers[i].mixer) if i == free else Zero() for i in range(L)}
    selection = selector("kl", seq_len=32, sequences=6).select(
        SelectionContext(L, L - 1, teacher=model, twin=twin.__getitem__, eval=eval_ctx(HELDOUT)))
    kl = [row["kl"] for row in selection.layers]
    assert kl[free] == pytest.approx(0.0, abs=1e-7) and min(kl[:free] + kl[free + 1:]) > 1e-4
    assert selection.kept == [0, 1, 3]
    assert [row["score"] for row in selection.layers] == kl
    assert torch.equal(model(torch.from_numpy(HELDOUT[:64].astype(np.int64))[None]), reference)
    # pins win over the measurement: the free layer is kept when pinned
    pinned = selector("kl", seq_len=32, sequences=6, pin=[free]).select(
        SelectionContext(L, 1, teacher=model, twin=twin.__getitem__, eval=eval_ctx(HELDOUT)))
    assert pinned.kept == [free]


def test_kl_refuses_too_little_heldout_text():
    with pytest.raises(SelectionError, match="fewer than 6 sequences of 512"):
        selector("kl", seq_len=512, sequences=6).select(
            SelectionContext(L, 1, teacher=teacher(), twin=lambda i: Zero(), eval=eval_ctx(HELDOUT)))


# ---- halo, rigged with probe tasks that read which twins are in the model ----------------------------------

class Probe(Mixer):
    """A twin marked with what swapping it in costs; the probe tasks below read the marks."""

    capabilities = MixerCapabilities(family="linear")

    def __init__(self, recall_cost, loss_cost):
        super().__init__()
        self.recall_cost, self.loss_cost = recall_cost, loss_cost

    def forward(self, x_BTD, ctx):
        return torch.zeros_like(x_BTD)


class ProbeConfig(BaseModel):
    pass


def _probe(attribute, metric, base):
    class Task:
        def run(self, ctx):
            total = base + sum(getattr(b.mixer, attribute, 0.0) for b in ctx.model.layers)
            return EvalResult({metric: total, "other": 0.0})

    return lambda cfg: Task()


class ProbePlugin:
    @staticmethod
    @hookimpl
    def hyloom_register_eval_tasks(register):
        register("probe_recall", _probe("recall_cost", "probe/acc", 1.0), config=ProbeConfig, summary="test")
        register("probe_loss", _probe("loss_cost", "loss/probe", 2.0), config=ProbeConfig, summary="test")


@pytest.fixture
def probes():
    name = register_plugin(ProbePlugin, name="selector-probes")
    yield
    unregister_plugin(name)


def test_halo_scores_recall_lost_per_quality_lost(probes, tmp_path):
    # layer: recall lost, loss gained when swapped. Layer 1 loses recall for little loss: it must stay.
    costs = [(-0.1, 0.5), (-0.6, 0.1), (0.0, 0.0), (-0.6, 0.1)]
    twins = [Probe(r, c) for r, c in costs]
    halo = selector("halo", recall={"type": "probe_recall"}, quality={"type": "probe_loss"}, cap=5.0)
    selection = halo.select(SelectionContext(L, 1, teacher=teacher(), twin=twins.__getitem__,
                                             eval=eval_ctx(HELDOUT)))
    rows = selection.layers
    assert [r["R"] for r in rows] == pytest.approx([0.9, 0.4, 1.0, 0.4])
    assert [r["C"] for r in rows] == pytest.approx([-2.5, -2.1, -2.0, -2.1])  # loss/...: C is minus the loss
    assert [r["score"] for r in rows] == pytest.approx([0.1 / 0.501, 5.0, 0.0, 5.0])  # 0.6 / 0.101 capped at 5
    assert selection.kept == [1]  # tied with layer 3 at the cap: the lower index
    assert selection.info["teacher"] == {"R": 1.0, "C": -2.0, "R_se": None, "C_se": None}  # no per-case values
    assert all(r["R_se"] is None and r["dC_se"] is None for r in rows)
    assert halo.select(SelectionContext(L, 2, teacher=teacher(), twin=twins.__getitem__,
                                        eval=eval_ctx(HELDOUT))).kept == [1, 3]

    other = selector("halo", recall={"type": "probe_recall"}, quality={"type": "probe_loss"},
                     recall_metric="other").select(SelectionContext(L, 1, teacher=teacher(), twin=twins.__getitem__,
                                                                    eval=eval_ctx(HELDOUT)))
    assert [r["R"] for r in other.layers] == [0.0] * L  # the named metric, not the first

    selection.write(tmp_path)
    written = json.loads((tmp_path / "selection.json").read_text())
    assert written["kept"] == [1] and written["selector"] == "halo" and written["config"]["cap"] == 5.0
    assert [r["score"] for r in written["layers"]] == pytest.approx([r["score"] for r in rows])
    assert (tmp_path / "selection.png").read_bytes()[:4] == b"\x89PNG"


def test_halo_noise_option_is_refused_for_tasks_without_per_case_values(probes):
    with pytest.raises(SelectionError, match="needs per-case values; these tasks give none: selector.recall: "
                                             "probe_recall, selector.quality: probe_loss"):
        selector("halo", recall={"type": "probe_recall"}, quality={"type": "probe_loss"}, noise_sigmas=2.0)
    selector("halo", noise_sigmas=2.0)  # the defaults (passkey, loss_by_position) give them
    # loss_by_position gives per-sequence values for its loss/nll@N metrics only
    with pytest.raises(SelectionError, match="these tasks give none: selector.quality: loss_by_position"):
        selector("halo", noise_sigmas=2.0, quality_metric="loss/nll_first_half")
    selector("halo", noise_sigmas=2.0, quality_metric="loss/nll@512")


def test_halo_refuses_a_metric_its_task_does_not_report(probes):
    halo = selector("halo", recall={"type": "probe_recall"}, quality={"type": "probe_loss"}, recall_metric="nope")
    with pytest.raises(SelectionError, match="'nope' is not a metric of task 'probe_recall'.*probe/acc, other"):
        halo.select(SelectionContext(L, 1, teacher=teacher(), twin=lambda i: Probe(0, 0), eval=eval_ctx(HELDOUT)))


def test_halo_with_the_builtin_tasks_on_a_tiny_teacher():
    """mqar for R, held-out loss for C: a twin that is the teacher's own mixer measures exactly as the teacher."""
    model = teacher()
    twins = twins_of()
    same = 1
    twin = {i: copy.deepcopy(model.layers[i].mixer) if i == same else twins.layers[i].mixer for i in range(L)}
    halo = selector("halo", recall={"type": "mqar", "seq_lens": [32], "num_kv_pairs": [4], "cases": 4,
                                    "vocab_size": 64},
                    quality={"type": "loss_by_position", "lengths": [32], "sequences": 4})
    selection = halo.select(SelectionContext(L, 2, teacher=model, twin=twin.__getitem__, eval=eval_ctx(HELDOUT)))
    row, teacher_scores = selection.layers[same], selection.info["teacher"]
    assert [row[k] for k in ("R", "C", "R_se", "C_se")] == [teacher_scores[k] for k in ("R", "C", "R_se", "C_se")]
    assert all(np.isfinite([r["C"] for r in selection.layers])) and len(selection.kept) == 2
    assert selection.info["cases"] == {"R": 4 * 4, "C": 4}  # mqar: one case per query; the loss: per sequence
    assert all(r["R_se"] >= 0 and r["C_se"] > 0 and r["dC_se"] >= 0 for r in selection.layers)  # a random teacher's
    # mqar hits may all be 0 (no spread); its held-out losses differ by sequence
    best = max(range(L), key=lambda i: selection.layers[i]["C"])
    assert selection.layers[best]["dC_se"] == 0.0  # the best layer's drop from itself


def test_halo_with_answer_logprob_recall_and_the_noise_option(tmp_path):
    """mqar scored by answer log-probability: R moves continuously; with noise_sigmas each drop is read against its
    paired standard error, and the figure shows the drops with their error bars."""
    model = teacher()
    twin = {i: copy.deepcopy(model.layers[i].mixer) if i == 1 else Zero() for i in range(L)}.__getitem__
    recall = {"type": "mqar", "seq_lens": [32], "num_kv_pairs": [4], "cases": 8, "vocab_size": 64,
              "score": "answer_logprob"}
    quality = {"type": "loss_by_position", "lengths": [32], "sequences": 6}
    plain = selector("halo", recall=recall, quality=quality).select(
        SelectionContext(L, 1, teacher=model, twin=twin, eval=eval_ctx(HELDOUT)))
    assert all(r["R"] <= 0 for r in plain.layers)  # a mean log-probability
    same = plain.layers[1]  # the twin that is the teacher's own mixer measures as the teacher, exactly
    assert (same["R"], same["C"]) == (plain.info["teacher"]["R"], plain.info["teacher"]["C"])
    noisy = selector("halo", recall=recall, quality=quality, noise_sigmas=2.0).select(
        SelectionContext(L, 1, teacher=model, twin=twin, eval=eval_ctx(HELDOUT)))
    rows = noisy.layers
    assert [r["R"] for r in rows] == [r["R"] for r in plain.layers]  # the same measurement, another score
    best_r, best_c = max(r["R"] for r in rows), max(r["C"] for r in rows)
    for r in rows:
        drop_r = best_r - r["R"] if best_r - r["R"] > 2 * r["dR_se"] else 0.0
        assert r["score"] == pytest.approx(min(50.0, drop_r / (max(best_c - r["C"], 2 * r["dC_se"]) + 1e-3)))
    noisy.write(tmp_path)
    written = json.loads((tmp_path / "selection.json").read_text())
    assert {"R_se", "dR_se", "C_se", "dC_se"} <= set(written["layers"][0]) and written["config"]["noise_sigmas"] == 2
    assert (tmp_path / "selection.png").stat().st_size > 10_000


def test_sequence_losses_are_the_sequences_loss_by_position_averages():
    from hyloom.eval import run_tasks, validate_tasks

    model = teacher().eval()
    cfg = validate_tasks([{"type": "loss_by_position", "lengths": [32, 64], "sequences": 5}])[0]
    ectx = dataclasses_replace(eval_ctx(HELDOUT), model=model)
    metrics = run_tasks([cfg], ectx)["tasks"]["loss_by_position"]["metrics"]
    for length in (32, 64):
        losses = sequence_losses(ectx, cfg, f"loss/nll@{length}")
        assert len(losses) == 5 and np.mean(losses) == pytest.approx(metrics[f"loss/nll@{length}"], rel=1e-5)
    assert sequence_losses(ectx, cfg, "loss/other") is None


def test_a_forced_choice_measures_nothing_and_even_writes_its_layout(tmp_path):
    everything = selector("halo").select(SelectionContext(L, L, teacher=teacher(), twin=_untouchable,
                                                          eval=eval_ctx(HELDOUT)))
    assert everything.kept == list(range(L)) and everything.info == {"measured": False}
    pins_only = selector("kl", pin=[-1]).select(SelectionContext(L, 1, teacher=teacher(), twin=_untouchable,
                                                                 eval=eval_ctx(HELDOUT)))
    assert pins_only.kept == [L - 1]

    even = selector("even").select(SelectionContext(8, 2))
    assert even.layout("A", "L") == ["L", "L", "L", "A", "L", "L", "L", "A"]
    even.write(tmp_path)
    written = json.loads((tmp_path / "selection.json").read_text())
    assert [r["layer"] for r in written["layers"] if r["kept"]] == [3, 7]
    assert all(r["score"] is None for r in written["layers"])
    assert (tmp_path / "selection.png").stat().st_size > 1000
