"""`generate` refuses sampling settings that would mean something else, and stops at stop strings."""

import pytest
import torch

import hyloom
from hyloom.generate import cut_at_stop

OVERRIDES = ["model.n_layers=1", "model.layout=L", "model.d_model=32", "model.vocab_size=300",
             "model.mixers.L.heads=2", "model.mixers.L.head_dim=16", "model.ffn.hidden=64"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return hyloom.build_model(hyloom.load_blueprint("builtin:tiny", OVERRIDES)).eval()


@pytest.mark.parametrize("kwargs, message", [
    ({"top_p": 2.0}, "top_p must be in"), ({"top_p": 0.0}, "top_p must be in"),
    ({"temperature": -1.0}, "temperature must be"), ({"temperature": float("nan")}, "temperature must be"),
    ({"top_k": 0}, "top_k must be"), ({"max_new_tokens": -1}, "max_new_tokens must be"),
])
def test_bad_sampling_settings_are_refused(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.generate([[1, 2]], **kwargs)


def test_stop_strings_end_a_row_and_the_others_go_on(model):
    decode = lambda ids: "".join(chr(97 + i % 26) for i in ids)  # noqa: E731 (a toy tokenizer: one letter a token)
    free = model.generate([[1, 2], [3]], max_new_tokens=12)
    stop = decode(free[0])[4]
    stopped = model.generate([[1, 2], [3]], max_new_tokens=12, stop_strings=[stop], decode=decode)
    text = decode(free[0])
    assert decode(stopped[0]) == text[:text.index(stop) + 1]  # ends on the token that completed the stop string
    assert cut_at_stop(decode(stopped[0]), [stop]) == text[:text.index(stop)]
    other = decode(free[1])
    assert decode(stopped[1]) == (other[:other.index(stop) + 1] if stop in other else other)
    assert model.generate([[1]], max_new_tokens=0) == [[]]
    with pytest.raises(ValueError, match="needs decode"):
        model.generate([[1]], stop_strings=["x"])
