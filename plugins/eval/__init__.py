"""The built-in evaluation tasks (kind `eval_task`) and the `hyloom eval` command.

This module only registers: it holds configs and small build functions that import each task's
implementation on first use, so `hyloom ls` never pays for torch (tests/core/test_startup.py)."""

from hyloom.hookspecs import hookimpl
from hyloom.plugins.eval import loss_config, mqar_config, retrieval_config


def _passkey_task(cfg):
    from hyloom.plugins.eval.retrieval import PasskeyTask

    return PasskeyTask(cfg)


def _niah_task(cfg):
    from hyloom.plugins.eval.retrieval import NiahTask

    return NiahTask(cfg)


def _passkey_source(cfg):
    from hyloom.plugins.eval.retrieval import PasskeySource

    return PasskeySource(cfg)


def _niah_source(cfg):
    from hyloom.plugins.eval.retrieval import NiahSource

    return NiahSource(cfg)


def _mqar_task(cfg):
    from hyloom.plugins.eval.mqar import MqarTask

    return MqarTask(cfg)


def _mqar_source(cfg):
    from hyloom.plugins.eval.mqar import MqarSource

    return MqarSource(cfg)


def _loss_by_position(cfg):
    from hyloom.plugins.eval.loss import LossByPosition

    return LossByPosition(cfg)


@hookimpl
def hyloom_register_eval_tasks(register):
    register("mqar", _mqar_task, config=mqar_config.MqarTaskConfig,
             summary="multi-query associative recall (Zoology) over seq_len x key-value pairs, teacher-forced",
             example={"type": "mqar", "seq_lens": [64, 128], "num_kv_pairs": [4, 8], "cases": 4, "vocab_size": 64})
    register("loss_by_position", _loss_by_position, config=loss_config.LossByPositionConfig,
             summary="held-out next-token loss per log-spaced position bucket, for each sequence length",
             example={"type": "loss_by_position", "lengths": [64, 256], "sequences": 2})
    register("passkey", _passkey_task, config=retrieval_config.PasskeyTaskConfig,
             summary="passkey retrieval over lengths x depths: greedy answer, exact match of the digits",
             example={"type": "passkey", "lengths": [256, 512], "depths": [0.0, 0.5, 1.0], "cases": 2})
    register("niah", _niah_task, config=retrieval_config.NiahTaskConfig,
             summary="RULER-style needles (single, multikey, multivalue, multiquery) over lengths x depths",
             example={"type": "niah", "lengths": [512], "variants": ["single", "multikey"], "cases": 2})


@hookimpl
def hyloom_register_data_sources(register):
    register("mqar", _mqar_source, config=mqar_config.MqarSourceConfig,
             summary="synthetic MQAR examples, pre-tokenized in their own vocabulary (ids above the tokenizer's)",
             example={"type": "mqar", "documents": 200, "seq_len": 64, "num_kv_pairs": [4, 8], "vocab_size": 64})
    register("passkey", _passkey_source, config=retrieval_config.PasskeySourceConfig,
             summary="synthetic passkey examples with their answers, in filler text from another source",
             example={"type": "passkey", "documents": 200, "filler": {"type": "stdlib", "max_bytes": 200_000}})
    register("niah", _niah_source, config=retrieval_config.NiahSourceConfig,
             summary="synthetic RULER-style needle examples with their answers, in filler text from another source",
             example={"type": "niah", "documents": 200, "filler": {"type": "stdlib", "max_bytes": 200_000}})


@hookimpl
def hyloom_register_commands(register):
    from hyloom.plugins.eval.cli import add_eval

    register("eval", add_eval, summary="evaluate a checkpoint on registered tasks")
