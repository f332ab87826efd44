"""`loss_by_position`: per-bucket held-out NLL equal to a direct computation, at lengths past max_seq_len,
with its figure; too little held-out text is refused."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hyloom.eval import EvalContext
from hyloom.plugins.eval.loss import LossByPosition, buckets
from hyloom.plugins.eval.loss_config import LossByPositionConfig
from hyloom.testing import tiny_model


def ctx(model, heldout, batch_size=3):
    return EvalContext(model=model, tokenizer=SimpleNamespace(vocab_size=61), device=torch.device("cpu"),
                       heldout_ids=lambda: heldout, train_len=16, batch_size=batch_size)


def test_buckets_are_log_spaced():
    assert buckets(1) == [(0, 1)]
    assert buckets(8) == [(0, 1), (1, 2), (2, 4), (4, 8)]
    assert buckets(20) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 20)]


def test_per_bucket_nll_equals_a_direct_computation(tmp_path):
    torch.manual_seed(0)
    model = tiny_model({"type": "lightning", "heads": 2}, max_seq_len=16).eval()
    heldout = np.random.default_rng(0).integers(0, 61, 300).astype(np.uint16)
    # 40 > max_seq_len 16: positions past the training length are measured (and flagged)
    result = LossByPosition(LossByPositionConfig(lengths=[40, 8], sequences=5)).run(ctx(model, heldout))

    for length, n in ((8, 5), (40, 5)):
        windows = torch.from_numpy(np.stack([heldout[i * length:i * length + length + 1] for i in range(n)])).long()
        with torch.no_grad():
            nll = F.cross_entropy(model(windows[:, :-1]).transpose(1, 2), windows[:, 1:], reduction="none")
        assert result.metrics[f"loss/nll@{length}"] == pytest.approx(nll.mean().item(), rel=1e-5)
        rows = [r for r in result.rows if r["length"] == length]
        assert [(r["start"], r["end"]) for r in rows] == buckets(length)
        for r in rows:
            assert np.isfinite(r["nll"])
            assert r["nll"] == pytest.approx(nll[:, r["start"]:r["end"]].mean().item(), rel=1e-5)
            assert r["extrapolated"] == (length > 16) and r["past_train_len"] == (r["start"] >= 16)
    path = tmp_path / "loss.png"
    result.plot(path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_fewer_sequences_when_short_and_refused_when_too_short():
    model = tiny_model({"type": "attention", "heads": 2}).eval()
    heldout = np.arange(50) % 61
    result = LossByPosition(LossByPositionConfig(lengths=[16], sequences=8)).run(ctx(model, heldout))
    assert {r["sequences"] for r in result.rows} == {3}  # 49 targets hold three windows of 16
    with pytest.raises(ValueError, match="has 50 tokens, fewer than one sequence of length 64"):
        LossByPosition(LossByPositionConfig(lengths=[16, 64])).run(ctx(model, heldout))
    model.spec.causal = False  # refused before anything runs
    with pytest.raises(ValueError, match="non-causal"):
        LossByPosition(LossByPositionConfig(lengths=[16])).run(ctx(model, heldout))
