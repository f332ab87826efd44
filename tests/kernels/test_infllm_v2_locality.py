"""bench/infllm_v2_locality.py: its overlap and tile-union numbers on hand-made picks, its forced blocks against
the reference selection's, and the q/k capture on a tiny hybrid (the GPU run is in its docstring)."""

import math

import pytest
import torch
from bench_scripts import load_bench

from hyloom.kernels.infllm_v2 import SparseConfig, naive


@pytest.fixture(scope="module")
def bench():
    return load_bench("infllm_v2_locality")


def as_idx(rows, width):
    """int32 [1, 1, T, width] from one list of blocks per token (ascending, padded with -1)."""
    return torch.tensor([sorted(r) + [-1] * (width - len(r)) for r in rows], dtype=torch.int32)[None, None]


def test_identical_picks_overlap_fully(bench):
    sets = bench.pick_sets(as_idx([[1, 3, 5]] * 10, 4), 8)
    assert bench.pick_overlap(sets) == 1.0
    assert bench.tile_union(sets, 5) == (3.0, 15.0)  # 3 distinct blocks per tile, 5 tokens x 3 picks


def test_disjoint_picks_do_not_overlap(bench):
    sets = bench.pick_sets(as_idx([[t] for t in range(8)], 2), 8)
    assert bench.pick_overlap(sets) == 0.0
    assert bench.tile_union(sets, 4) == (4.0, 4.0)


def test_tokens_without_picks_are_left_out(bench):
    sets = bench.pick_sets(as_idx([[], [2], [2], []], 1), 4)
    assert bench.pick_overlap(sets) == 0.5  # t=0 picks nothing: left out; t=1 -> 2 shares all, t=2 -> 3 nothing
    sets = bench.pick_sets(as_idx([[], []], 1), 4)
    assert math.isnan(bench.pick_overlap(sets))


def test_forced_blocks_are_excluded(bench):
    # block 2 of 2 tokens, 1 init block, 1 window block, k_total 4: token t picks its forced blocks {0, own-1,
    # own} (own = t // 2) and block 2, which stops being forced once own >= 4, i.e. from t = 8 = k_total * 2 on
    T, k_total = 72, 4
    rows = [sorted({0, 2, t // 2 - 1, t // 2}) if t >= 8 else list(range(t // 2 + 1)) for t in range(T)]
    got = bench.locality(as_idx(rows, k_total), block_size=2, init_blocks=1, window_blocks=1, k_total=k_total)
    assert got["tokens_counted"] == T - 8
    assert got["pick_overlap_nonforced"] == 1.0 and got["nonforced_picks_per_token"] == 1.0
    # all picks: 3 of 4 shared where t + 1 starts a new block (t odd: 31 of the 63 pairs), else all 4
    assert got["pick_overlap"] == pytest.approx((32 + 31 * 0.75) / 63)
    assert got["tile16_nonforced_union_over_k_total"] == 0.25 and got["tile16_load_ratio"] == 16.0
    assert got["tile16_union_over_k_total"] == pytest.approx(11 / 4)  # {0, 2} and own blocks 3 .. 11
    assert got["tile64_union_over_k_total"] == pytest.approx(35 / 4)  # {0, 2} and 3 .. 35


def test_forced_blocks_match_the_reference_selection(bench):
    cfg = SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, topk=3, window=32, dense_len=64)
    T, n_blocks = 150, cfg.n_blocks(150)
    scores = naive.block_scores_ref(torch.zeros(1, 1, T, cfg.n_kernels(T)), cfg, n_blocks)
    forced = bench.forced_blocks(T, n_blocks, cfg.block_size, cfg.init_blocks, cfg.window // cfg.block_size)
    assert torch.equal(forced, scores[0, 0] == float("inf"))


def test_capture_sees_what_the_attention_core_sees(bench):
    from hyloom.blueprint import load_blueprint
    from hyloom.mixer import MixerContext
    from hyloom.model import build_model
    from hyloom.plugins.infllm_v2.mixer import InfLLMv2

    torch.manual_seed(0)
    model = build_model(load_blueprint("builtin:tiny", []), device="cpu")
    ids = torch.randint(2, 4096, (1, 200))
    mixer = model.layers[0].mixer
    with torch.no_grad():
        x = model.layers[0].mixer_norm(model.embed(ids))
    got, loss = bench.capture_qk(model, ids, torch.device("cpu"))
    assert sorted(got) == [0, 3] and math.isfinite(loss)
    assert all("decode_core" not in vars(m) for m in model.modules() if isinstance(m, InfLLMv2))  # unwrapped
    ctx = MixerContext(pos_BT=torch.arange(200)[None], position=model.layers[0].position, causal=True)
    with torch.no_grad():
        q, k, v = mixer.decode_pre(x, ctx)
    assert torch.equal(got[0][0], q) and torch.equal(got[0][1], k) and torch.equal(got[0][2], v)
    assert got[0][3] == mixer.sparse


@pytest.mark.parametrize("quick", [False, True])
def test_blueprint_trains_and_captures_sparse(bench, quick):
    bp = bench.load(bench.QUICK if quick else [])
    length = 1024 if quick else 32768  # the script's default capture lengths
    sparse = [m for m in bp.model.mixers.values() if m.type == "infllm_v2"]
    assert sparse and "S" in bp.model.layout
    for mixer in sparse:  # sparse in training and at the capture, with blocks to spare beyond k_total
        cfg = mixer.sparse()
        assert cfg.dense_len <= bp.data.seq_len and 4 * cfg.k_total * cfg.block_size <= length


def test_forward_rows_check_time_and_count_the_tile_kernel(bench):
    """time_forward in smoke mode (the Triton interpreter, single calls): the tile forward equals the per-token
    one, peers missing here (no cuDNN, no fla) are reported, not fatal, and the load counts add up."""
    cfg = SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, topk=3, window=32, dense_len=64)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 80, h, 16, generator=gen) for h in (4, 2, 2))
    idx = naive.select_blocks_ref(q, naive.compress_keys_ref(k, cfg), cfg)
    rows = bench.time_forward(q, k, v, idx, cfg, [8, 16], peers_too=True, smoke=True)
    assert [r["tile_tokens"] for r in rows] == [8, 16]
    for row in rows:
        assert row["case"] == "fwd_tile" and row["max_rel_err"] < 1e-5 and row["ours_ms"] > 0
        assert row["peers"]["per_token"] > 0 and "sdpa.cudnn" in row["peer_errors"]
        assert row["union_prep_ms"] > 0 and row["union_prep_ref_ms"] > 0
        loads = row["blocks_loaded"]
        assert 0 < loads["tile"] <= loads["per_token"] and loads["ratio"] == loads["per_token"] / loads["tile"]
