"""Built-in trainers: `lm` (next-token prediction)."""

from hyloom.hookspecs import hookimpl
from hyloom.plugins.train.lm import LMTrainer, LMTrainerConfig


@hookimpl
def hyloom_register_trainers(register):
    register("lm", LMTrainer, config=LMTrainerConfig,
             summary="next-token language modelling: AdamW, warmup + cosine/WSD, accumulation, clipping, resume",
             example={"type": "lm", "steps": 10, "batch_size": 4})
