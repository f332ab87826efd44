import pytest
import torch

from hyloom.kernels.infllm_v2 import ops as infllm_v2_ops


@pytest.fixture
def nan_poisoned_outputs(monkeypatch):
    """Every InfLLM-V2 kernel output starts as NaN (-12345 for indices), so a cell a kernel forgets to write fails.
    The InfLLM-V2 test modules use it for every test (pytestmark)."""
    def nan_empty(*shape, device=None, dtype=None):
        shape = shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape
        poison = float("nan") if dtype is None or dtype.is_floating_point else -12345
        return torch.full(tuple(shape), poison, device=device, dtype=dtype)
    monkeypatch.setattr(infllm_v2_ops, "_empty", nan_empty)


@pytest.fixture(params=[
    pytest.param(("test_schema", "test_autograd_registration", "test_faketensor"), id="schema-fake"),
    # about half of an opcheck's time in the interpreter; test_custom_ops' torch.compile test covers AOT dispatch
    # of the fixed-length ops in CI
    pytest.param(("test_aot_dispatch_dynamic",), id="aot-dispatch", marks=pytest.mark.slow)])
def opcheck(request):
    """torch.library.opcheck(op, args) asserting every check passed: schema, autograd registration and fake
    tensors in CI, AOT dispatch with dynamic shapes in the slow run (-m slow)."""
    def check(op, args):
        results = torch.library.opcheck(op, args, test_utils=request.param)
        assert set(results.values()) == {"SUCCESS"}, results
    return check
