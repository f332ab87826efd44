"""Built-in trainers: `lm` (next-token prediction).

Registering imports only the config; the trainer (and torch) loads when one is built."""

from hyloom.hookspecs import hookimpl
from hyloom.plugins.train.config import LMTrainerConfig, NextTokenConfig


def build_lm(cfg: LMTrainerConfig):
    from hyloom.plugins.train.lm import LMTrainer

    return LMTrainer(cfg)


def build_next_token(cfg):
    from hyloom.plugins.train.lm import NextTokenObjective

    return NextTokenObjective(cfg)


@hookimpl
def hyloom_register_objectives(register):
    register("next_token", build_next_token, config=NextTokenConfig,
             summary="next-token cross-entropy (the lm trainer's default; causal models)",
             example={"type": "next_token"})


@hookimpl
def hyloom_register_trainers(register):
    register("lm", build_lm, config=LMTrainerConfig,
             summary="next-token language modelling: AdamW, warmup + cosine/WSD, accumulation, clipping, resume",
             example={"type": "lm", "steps": 10, "batch_size": 4})
