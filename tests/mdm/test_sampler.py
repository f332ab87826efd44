"""The mdm sampler: exactly k commits a step, every mask filled, the prompt unchanged, seed determinism, the
threshold mode, bad input refused; and a Lightning + attention MDM that trains and samples from the CLI."""

import pytest
import torch

import hyloom
import hyloom.checkpoint
from hyloom.cli import main
from hyloom.generate import run_sampler
from hyloom.plugins.mdm.config import MdmSamplerConfig
from hyloom.plugins.mdm.sampler import denoise, transfer_counts

MASK = 299
OVERRIDES = ["model.n_layers=2", "model.layout=LA", "model.d_model=32", "model.vocab_size=300",
             "model.causal=false", "model.mixers={L: {type: lightning, heads: 2, head_dim: 16, decay: alibi, "
             "bidirectional_decay: symmetric}, A: {type: attention, heads: 2, head_dim: 16}}",
             "model.ffn.hidden=64"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return hyloom.build_model(hyloom.load_blueprint("builtin:tiny", OVERRIDES)).eval()


def test_transfer_counts_split_a_block_evenly():
    assert transfer_counts(10, 4) == [3, 3, 2, 2] and transfer_counts(8, 8) == [1] * 8


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_each_step_commits_exactly_k_and_fills_every_mask(model, remasking):
    prompt = torch.tensor([[5, 6, 7], [8, 9, 10]])
    cfg = MdmSamplerConfig(max_new_tokens=12, block_length=6, steps=4, remasking=remasking, temperature=1.0)
    x, nfe, commits = denoise(model, prompt, mask_id=MASK, cfg=cfg, generator=torch.Generator().manual_seed(0))
    assert nfe == 8 and commits == [[k, k] for k in [2, 2, 1, 1] * 2]
    assert torch.equal(x[:, :3], prompt) and not bool((x == MASK).any())


class _Sure(torch.nn.Module):
    """A stand-in MDM over 4 tokens (3 is the mask): predicts token 0 with a confidence that grows with the
    position, and never looks at its input."""

    spec = type("Spec", (), {"vocab_size": 4})

    def forward(self, ids):
        B, T = ids.shape
        logits = torch.zeros(B, T, 4)
        logits[..., 0] = torch.arange(T, dtype=torch.float)
        return logits


def test_low_confidence_commits_the_most_confident_first():
    seen = []
    model = _Sure()
    spy = lambda ids: (seen.append((ids[0] == 3).tolist()), model(ids))[1]  # noqa: E731
    x, _, _ = denoise(spy, torch.tensor([[1]]), mask_id=3, cfg=MdmSamplerConfig(max_new_tokens=4))
    # most confident = rightmost: the masks are filled right to left
    assert seen == [[False, True, True, True, True], [False, True, True, True, False],
                    [False, True, True, False, False], [False, True, False, False, False]]
    assert x.tolist() == [[1, 0, 0, 0, 0]]


def test_blocks_are_decoded_left_to_right(model):
    seen = []

    def spy(ids):
        seen.append((ids[0, 2:] == MASK).tolist())
        return model(ids)

    spy.spec = model.spec
    cfg = MdmSamplerConfig(max_new_tokens=4, block_length=2, steps=2)
    denoise(spy, torch.tensor([[1, 2]]), mask_id=MASK, cfg=cfg)
    # the second block stays masked until the first is full; one mask filled a step
    assert [sum(s) for s in seen] == [4, 3, 2, 1]
    assert all(s[2:] == [True, True] for s in seen[:3]) and seen[2][:2] == [False, False]


def test_a_seed_makes_sampling_repeatable(model):
    options = dict(sampler="mdm", max_new_tokens=8, block_length=4, temperature=1.0, mask_id=MASK)
    a, b = (run_sampler(model, [[1, 2, 3]], seed=3, **options).tokens for _ in range(2))
    c = run_sampler(model, [[1, 2, 3]], seed=4, **options).tokens
    assert a == b and a != c
    greedy = {**options, "temperature": 0.0}  # no noise: the seed does not matter
    assert run_sampler(model, [[1, 2, 3]], seed=3, **greedy).tokens == run_sampler(model, [[1, 2, 3]], seed=4,
                                                                                  **greedy).tokens


def test_threshold_commits_at_least_one_a_step(model):
    prompt = torch.tensor([[5, 6, 7]])
    # an untrained model is never sure: only the one forced commit a step
    x, nfe, commits = denoise(model, prompt, mask_id=MASK, cfg=MdmSamplerConfig(max_new_tokens=6, threshold=0.9))
    assert commits == [[1]] * 6 and nfe == 6 and not bool((x == MASK).any())
    # a low threshold commits several at once
    x, nfe, commits = denoise(model, prompt, mask_id=MASK,
                              cfg=MdmSamplerConfig(max_new_tokens=6, threshold=1e-9))
    assert nfe == 1 and commits == [[6]] and torch.equal(x[:, :3], prompt)


def test_run_sampler_reports_nfe_and_speed(model):
    got = run_sampler(model, [[1, 2], [3, 4, 5]], max_new_tokens=8, block_length=4, steps=2, mask_id=MASK)
    assert [len(t) for t in got.tokens] == [8, 8] and got.nfe == 8  # two prompt lengths: two batches of 4 steps
    assert got.produced == 16 and got.tokens_per_s > 0


@pytest.mark.parametrize("options, message", [
    ({"steps": 0}, "steps"), ({"max_new_tokens": 10, "block_length": 4}, "must divide"),
    ({"max_new_tokens": 4, "steps": 5}, "exceeds block_length"), ({"mask_id": 300}, "outside the model's vocab"),
])
def test_bad_sampler_options_are_refused(model, options, message):
    with pytest.raises(ValueError, match=message):
        run_sampler(model, [[1]], **{"mask_id": MASK, **options})


def test_a_hybrid_mdm_trains_and_samples_from_the_cli(tmp_path, mdm_blueprint, capsys):
    path = mdm_blueprint(tmp_path)
    assert main(["train", path, "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "loss     mdm, mask id 1, eps 0.001" in out
    # the checkpoint's blueprint names the mask id it was trained with (here the tokenizer's <|mask|>)
    assert hyloom.checkpoint.load_checkpoint(tmp_path / "run" / "checkpoint-000004")[1].train.objective.mask_id == 1
    run = str(tmp_path / "run")
    argv = ["generate", run, "--prompt", "def ", "--max-new-tokens", "8", "--block-length", "4", "--steps", "2"]
    assert main(argv) == 0  # a bidirectional checkpoint: the mdm sampler by default
    got = capsys.readouterr()
    assert got.out.startswith("def ") and "sampler mdm: 4 forward passes (NFE), 8 tokens" in got.err
    assert main(argv + ["--seed", "0"]) == 0 and capsys.readouterr().out == got.out
    assert main(argv + ["--threshold", "0.5", "--remasking", "random"]) == 2
    assert "threshold commits by confidence" in capsys.readouterr().err
    for bad, message in [(["--steps", "0"], "expected an integer >= 1"), (["--top-k", "3"], "--top-k: not an option"),
                         (["--block-length", "3"], "must divide"), (["--sampler", "ar"], "use --sampler mdm"),
                         (["--compile"], "the mdm sampler has none")]:
        try:
            code = main(argv + bad)
        except SystemExit as exc:  # argparse refuses --steps 0 itself
            code = exc.code
        assert code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
