"""TokenLoader: windows of seq_len + 1 tokens, a seeded order per epoch, exact resume, rank slicing, eval order."""

import numpy as np
import pytest
import torch

from hyloom.data import DataError, TokenLoader


def stream(prepared, split):
    info = prepared.manifest["splits"][split]
    return np.concatenate([np.fromfile(prepared.dir / s["file"], dtype=prepared.manifest["dtype"])
                           for s in info["shards"]]).astype(np.int64)


def test_batches_are_windows_of_the_stream(prepared):
    loader = TokenLoader(prepared.dir, "train", seq_len=16, batch_size=4, seed=3)
    tokens = stream(prepared, "train")
    assert loader.n_windows == (len(tokens) - 1) // 16
    batch = loader.next_batch()
    assert batch.dtype == torch.long and batch.shape == (4, 17)
    order = loader.order(0)
    for row, window in zip(batch, order[:4]):
        assert row.tolist() == tokens[window * 16: window * 16 + 17].tolist()


def test_order_is_seeded_and_changes_each_epoch(prepared):
    a = TokenLoader(prepared.dir, "train", seq_len=16, batch_size=4, seed=0)
    b = TokenLoader(prepared.dir, "train", seq_len=16, batch_size=4, seed=0)
    c = TokenLoader(prepared.dir, "train", seq_len=16, batch_size=4, seed=1)
    assert all(torch.equal(a.next_batch(), b.next_batch()) for _ in range(5))
    assert not np.array_equal(a.order(0), c.order(0))
    assert not np.array_equal(a.order(0), a.order(1))
    assert sorted(a.order(1)) == list(range(a.n_windows))  # a permutation: each window once an epoch


def test_an_epoch_visits_every_window_and_runs_into_the_next(prepared):
    loader = TokenLoader(prepared.dir, "train", seq_len=64, batch_size=6, seed=0)
    n = loader.n_windows
    batches = [loader._take_global() for _ in range(n // 6 + 2)]
    seen = np.concatenate(batches)
    assert sorted(seen[:n]) == list(range(n))
    assert seen[n:].tolist() == loader.order(1)[:len(seen) - n].tolist()
    assert loader.epoch == 1


def test_resume_gives_the_same_batches(prepared):
    straight = TokenLoader(prepared.dir, "train", seq_len=128, batch_size=8, seed=5)
    for _ in range(7):
        straight.next_batch()
    state = straight.state_dict()
    expected = [straight.next_batch() for _ in range(straight.n_windows // 8 + 3)]
    assert straight.epoch == 1  # the continuation crossed an epoch boundary
    resumed = TokenLoader(prepared.dir, "train", seq_len=128, batch_size=8, seed=5)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch(), e) for e in expected)


def test_resume_refuses_a_state_of_other_windows(prepared):
    state = TokenLoader(prepared.dir, "train", seq_len=32, batch_size=8).state_dict()
    with pytest.raises(DataError, match="seq_len=32"):
        TokenLoader(prepared.dir, "train", seq_len=16, batch_size=8).load_state_dict(state)


def test_ranks_split_the_global_batch(prepared):
    single = TokenLoader(prepared.dir, "train", seq_len=16, batch_size=8, seed=2)
    ranks = [TokenLoader(prepared.dir, "train", seq_len=16, batch_size=8, rank=r, world_size=2, seed=2) for r in (0, 1)]
    for _ in range(30):
        parts = [r.next_batch() for r in ranks]
        assert parts[0].shape == (4, 17)
        assert torch.equal(torch.cat(parts), single.next_batch())
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_eval_goes_in_order(prepared):
    loader = TokenLoader(prepared.dir, "eval", seq_len=16, batch_size=2)
    tokens = stream(prepared, "eval")
    assert not loader.shuffle
    first = loader.next_batch()
    assert first[1].tolist() == tokens[16:33].tolist()
    batches = list(loader.iter_eval())
    assert sum(len(b) for b in batches) == loader.n_windows
    assert torch.equal(batches[0], first)
    assert len(list(loader.iter_eval(max_batches=1))) == 1
    assert prepared.loader("eval", batch_size=2).seq_len == prepared.manifest["seq_len"] == 256
    halves = [list(TokenLoader(prepared.dir, "eval", seq_len=16, batch_size=2, rank=r, world_size=2).iter_eval())
              for r in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == len(batches)
    assert all(torch.equal(torch.cat([a, b]), whole) for a, b, whole in zip(*halves, batches))


def test_clear_errors(prepared, tmp_path):
    n = prepared.manifest["splits"]["eval"]["tokens"]
    with pytest.raises(DataError, match=f"the eval split of .* has {n} tokens, fewer than one window"):
        TokenLoader(prepared.dir, "eval", seq_len=n, batch_size=1)
    with pytest.raises(DataError, match="not a prepared data folder"):
        TokenLoader(tmp_path, "train", seq_len=8, batch_size=1)
    with pytest.raises(DataError, match="no split 'test'"):
        TokenLoader(prepared.dir, "test", seq_len=8, batch_size=1)
    with pytest.raises(ValueError, match="multiple of world_size"):
        TokenLoader(prepared.dir, "train", seq_len=8, batch_size=3, world_size=2)


def test_windows_span_shard_files(prepared, tmp_path, monkeypatch):
    """A split written as several files reads exactly like one stream."""
    from hyloom.data import pipeline, prepare, shards

    monkeypatch.setattr(shards, "SHARD_TOKENS", 1000)
    spec = dict(pipeline.data_spec(prepared.manifest["spec"]).model_dump(), cache_dir=str(tmp_path))
    many = prepare(spec, progress=False)
    assert len(many.manifest["splits"]["train"]["shards"]) > 3
    one = TokenLoader(prepared.dir, "train", seq_len=50, batch_size=4, seed=9)
    split = TokenLoader(many.dir, "train", seq_len=50, batch_size=4, seed=9)
    assert all(torch.equal(one.next_batch(), split.next_batch()) for _ in range(20))
