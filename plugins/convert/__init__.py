"""Transformer → hybrid conversion: layer selectors (kind `selector`) and the conversion trainers.

This module only registers: it holds configs and small build functions that import each implementation on
first use, so `hyloom ls` never pays for torch (tests/core/test_startup.py)."""

from hyloom.hookspecs import hookimpl
from hyloom.plugins.convert import config as trainer_config
from hyloom.plugins.convert import selection_config


def _selector(name):
    def build(cfg):
        from hyloom.plugins.convert import selectors

        return selectors.SELECTORS[name](cfg)

    return build


@hookimpl
def hyloom_register_selectors(register):
    register("even", _selector("even"), config=selection_config.EvenConfig,
             summary="attention layers evenly spaced over the depth (every n-th layer, ending at the last)",
             example={"type": "even", "pin": [0]})
    register("fixed", _selector("fixed"), config=selection_config.FixedConfig,
             summary="explicit attention layer indices",
             example={"type": "fixed", "layers": [1, -1]})
    register("halo", _selector("halo"), config=selection_config.HaloConfig,
             summary="HALO: keep the layers whose swap to a linear twin costs most recall per unit of quality",
             example={"type": "halo", "recall": {"type": "mqar", "seq_lens": [64], "num_kv_pairs": [4],
                                                 "cases": 4, "vocab_size": 64},
                      "quality": {"type": "loss_by_position", "lengths": [64], "sequences": 4}})
    register("kl", _selector("kl"), config=selection_config.KlConfig,
             summary="KL-guided: keep the layers whose swap to a linear twin moves the output distribution most",
             example={"type": "kl", "seq_len": 64, "sequences": 4, "pin": [0, -1]})


def _trainer(module, cls):
    def build(cfg):
        import importlib

        return getattr(importlib.import_module(f"hyloom.plugins.convert.{module}"), cls)(cfg)

    return build


@hookimpl
def hyloom_register_trainers(register):
    register("align", _trainer("align", "AlignTrainer"), config=trainer_config.AlignConfig,
             summary="conversion stage 1: each layer's linear twin learns its teacher layer's mixer output (MSE)",
             example={"type": "align", "teacher": "runs/teacher", "steps": 100})
    register("select", _trainer("select", "SelectTrainer"), config=trainer_config.SelectConfig,
             summary="conversion step between align and distill: a selector picks the layers that stay attention; "
                     "saves the hybrid",
             example={"type": "select", "teacher": "runs/teacher", "selector": {"type": "halo"}, "budget": 0.25})
    register("distill", _trainer("distill", "DistillTrainer"), config=trainer_config.DistillConfig,
             summary="conversion stage 2: the whole student learns the teacher's logits (forward KL)",
             example={"type": "distill", "teacher": "runs/teacher", "steps": 100})
