"""Reinforcement learning: the `grpo` trainer, the built-in verifiers (kind `verifier`), the sandbox that runs
untrusted code, the prompt sets (`hyloom.plugins.rl.prompts`) and the `arithmetic` data source (the prompt set as
supervised training text). docs/rl.md is the user guide.

This module only registers; each build imports its implementation (and torch) on first use."""

from hyloom.hookspecs import hookimpl
from hyloom.plugins.rl import config


def _verifier(class_name):
    def build(cfg):
        from hyloom.plugins.rl import verifiers

        return getattr(verifiers, class_name)(cfg)

    return build


@hookimpl
def hyloom_register_verifiers(register):
    register("math", _verifier("MathVerifier"), config=config.MathConfig,
             summary="final answer (last \\boxed{} or #### n) equals the record's answer, numerically when both parse",
             example={"type": "math"})
    register("exact", _verifier("ExactVerifier"), config=config.ExactConfig,
             summary="the completion, whitespace- and case-normalised, equals the record's answer",
             example={"type": "exact", "ignore_case": False})
    register("regex", _verifier("RegexVerifier"), config=config.RegexConfig,
             summary="a pattern matches (search or fullmatch) the completion or a field of the record",
             example={"type": "regex", "pattern": "\\\\boxed\\{.+\\}", "correct": 0.1, "wrong": 0.0})
    register("python_tests", _verifier("PythonTestsVerifier"), config=config.PythonTestsConfig,
             summary="the completion's code passes the record's tests, run in a limited, isolated process",
             example={"type": "python_tests", "timeout_s": 2.0})


def _grpo(cfg):
    from hyloom.plugins.rl.trainer import GrpoTrainer

    return GrpoTrainer(cfg)


def _arithmetic_source(cfg):
    from hyloom.plugins.rl.prompts import ArithmeticSource

    return ArithmeticSource(cfg)


@hookimpl
def hyloom_register_trainers(register):
    register("grpo", _grpo, config=config.GrpoConfig,
             summary="GRPO (JustRL): G sampled completions per prompt, verifier rewards, clipped token-mean updates",
             example={"type": "grpo", "steps": 10, "prompts_per_step": 8, "group_size": 4,
                      "prompts": {"type": "arithmetic", "steps": 2}})


@hookimpl
def hyloom_register_data_sources(register):
    register("arithmetic", _arithmetic_source, config=config.ArithmeticSourceConfig,
             summary="the arithmetic prompt set as prompt + worked solution documents (SFT before RL, offline)",
             example={"type": "arithmetic", "count": 2000, "steps": 3})
