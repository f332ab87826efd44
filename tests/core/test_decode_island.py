"""The decode runner's island path (hyloom.decode: a mixer without static_decode, split with decode_pre /
decode_core / decode_post) on the CPU, with the test-only plugin mixer of tests/island_mixer.py: decoding equals a
full pass, and the runner cuts such a layer so that only its core is an island between static pieces. Graphs
against eager decoding on CUDA: tests/gpu/test_cuda_decode.py."""

import pytest
import torch
from island_mixer import island_plugin

from hyloom.testing import check_decode, check_left_padding, check_mixer, tiny_model

ISLAND = {"type": "island_attention", "heads": 2, "kv_heads": 1, "head_dim": 16}
STATIC = {"A": {"type": "attention", "heads": 2, "kv_heads": 1, "head_dim": 16}}


@pytest.fixture(autouse=True)
def registered():
    with island_plugin():
        yield


def test_the_island_mixer_passes_every_check_of_hyloom_testing(tmp_path):
    check_mixer(tiny_model(ISLAND), tmp_path)  # decode, left padding (prefill and decode), packing, round trip


def test_a_hybrid_decodes_like_a_full_pass_with_only_the_cores_as_islands():
    model = tiny_model(ISLAND, n_layers=4, layout="MAMA", mixers=STATIC)
    check_decode(model, steps=6)
    check_left_padding(model, lengths=(7, 3, 5), steps=4)
    _, cache = model.prefill(torch.randint(0, 61, (2, 5)))
    model.decode_step(torch.randint(0, 61, (2,)), cache)
    runner = cache.runner
    segments = runner._segments()
    assert [segment[0] for segment in segments] == [True, False, True, False, True]
    for segment, layer in zip(segments[1::2], (0, 2)):
        _, core, keep = segment
        assert (core.func, core.args, keep) == (runner._core, (layer,), 2)  # x and the normed input pass it by
    static_names = [[fn.func.__name__ if hasattr(fn, "func") else fn.__name__ for fn in s[1]] for s in segments[::2]]
    assert static_names == [["_begin", "_pre"], ["_post", "_layer", "_pre"], ["_post", "_layer", "_end"]]
