"""Masked diffusion (MDM): the `mdm` objective, the samplers `ar` (autoregressive) and `mdm`, and `hyloom probe`.

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


def _cmd_probe(args):
    from hyloom.plugins.mdm.probe import cmd_probe

    return cmd_probe(args)


PROBE_EXAMPLES = """examples:
  hyloom probe attention runs/tiny-mdm --prompt 'def add(a, b):' --steps 4 --new-tokens 8
  hyloom probe attention runs/tiny --prompt 'import ' --steps 16 --out probe-ar   a causal model: greedy steps
"""


def add_probe(sub) -> None:
    import argparse

    text = ("attention-floating probe: per step (greedy decoding, or mdm denoising) and layer, the head-averaged "
            "attention, its anchors (incoming attention > mean + 3 std) and their share; writes probe.json and PNGs")
    p = sub.add_parser("probe", help=text, description=text, epilog=PROBE_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["attention"], help="what to probe")
    p.add_argument("checkpoint", help="a checkpoint or run directory")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--out", default="probe", help="output folder (default: ./probe)")
    p.add_argument("--steps", type=int, default=8, help="decoding steps (causal) or denoising steps (mdm)")
    p.add_argument("--new-tokens", type=int, default=None,
                   help="mdm: masks appended to the prompt, one block (default: --steps)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.set_defaults(func=_cmd_probe)


@hookimpl
def hyloom_register_commands(register):
    register("probe", add_probe, summary="attention-floating probe: anchors of attention per step and layer")
