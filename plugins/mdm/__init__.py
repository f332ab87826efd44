"""Masked diffusion (MDM): the `mdm` objective, and the samplers `ar` (autoregressive) and `mdm`.

This module only registers (configs and small builders), so `hyloom ls` imports no torch."""

from hyloom.hookspecs import hookimpl
from hyloom.plugins.mdm.config import ArSamplerConfig, MdmObjectiveConfig, MdmSamplerConfig


def _mdm_objective(cfg):
    from hyloom.plugins.mdm.objective import MdmObjective

    return MdmObjective(cfg)


def _ar_sampler(cfg):
    from hyloom.plugins.mdm.sampler import ArSampler

    return ArSampler(cfg)


def _mdm_sampler(cfg):
    from hyloom.plugins.mdm.sampler import MdmSampler

    return MdmSampler(cfg)


@hookimpl
def hyloom_register_objectives(register):
    register("mdm", _mdm_objective, config=MdmObjectiveConfig,
             summary="masked diffusion: mask each token with p = (1-eps)t + eps, cross-entropy on masks weighted 1/p",
             example={"type": "mdm", "eps": 1e-3})


@hookimpl
def hyloom_register_samplers(register):
    register("ar", _ar_sampler, config=ArSamplerConfig,
             summary="autoregressive: one token a forward pass (the default for causal models)",
             example={"type": "ar", "max_new_tokens": 32, "temperature": 0.8})
    register("mdm", _mdm_sampler, config=MdmSamplerConfig,
             summary="masked diffusion: prompt + N masks, semi-autoregressive blocks, low-confidence or random "
                     "remasking or a confidence threshold (the default for bidirectional models)",
             example={"type": "mdm", "max_new_tokens": 32, "block_length": 8, "steps": 8})
