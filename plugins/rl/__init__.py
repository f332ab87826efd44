"""Reinforcement learning: the built-in verifiers (kind `verifier`), the sandbox that runs untrusted code, and
the prompt sets (`hyloom.plugins.rl.prompts`). docs/rl.md is the user guide.

This module only registers; each build imports its verifier on first use."""

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
