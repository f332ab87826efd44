"""The built-in evaluation tasks (kind `eval_task`) and the `hyloom eval` command.

This module only registers: it holds configs and small build functions that import each task's
implementation on first use, so `hyloom ls` never pays for torch (tests/core/test_startup.py)."""

from hyloom.hookspecs import hookimpl


@hookimpl
def hyloom_register_eval_tasks(register):
    pass
