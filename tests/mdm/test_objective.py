"""The mdm objective: 1/p weighting on a hand-computed example, loss only on masked positions, SFT prompts
untouched, and the lm trainer's refusals (objective vs model.causal, mask id outside the vocabulary)."""

import math
import re

import pytest
import torch

from hyloom.blueprint import BlueprintError, load_blueprint
from hyloom.cli import main
from hyloom.errors import SetupError
from hyloom.plugins.mdm.config import MdmObjectiveConfig
from hyloom.plugins.mdm.objective import MdmObjective, mask_tokens, masked_loss, prompt_lengths


def test_the_weighting_matches_a_hand_computed_example():
    # B=2, T=3, V=2. Row 0 (p=0.5) has positions 0 and 2 masked, row 1 (p=0.25) position 1.
    logits = torch.tensor([[[0.0, 0.0], [5.0, -5.0], [math.log(3), 0.0]],
                           [[9.0, 9.0], [0.0, math.log(3)], [1.0, 2.0]]])
    ids = torch.tensor([[1, 0, 0], [0, 0, 1]])
    masked = torch.tensor([[True, False, True], [False, True, False]])
    p = torch.tensor([0.5, 0.25])
    # CE: row 0 pos 0 uniform -> ln 2; pos 2 target 0 with probs (3/4, 1/4) -> ln(4/3); row 1 pos 1 target 0
    # with probs (1/4, 3/4) -> ln 4. Weighted 1/p, summed, divided by B*T = 6.
    expected = ((math.log(2) + math.log(4 / 3)) / 0.5 + math.log(4) / 0.25) / 6
    assert masked_loss(logits, ids, masked, p).item() == pytest.approx(expected, rel=1e-6)


def test_the_mask_ratio_follows_t_and_eps():
    ids = torch.zeros(3, 4000, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    noisy, masked, p = mask_tokens(ids, mask_id=7, eps=0.1, t_B=torch.tensor([0.0, 0.5, 1.0]), generator=g)
    assert p.tolist() == pytest.approx([0.1, 0.55, 1.0])
    assert masked.float().mean(1).tolist() == pytest.approx([0.1, 0.55, 1.0], abs=0.03)
    assert torch.equal(noisy == 7, masked) and bool((ids[~masked] == noisy[~masked]).all())


def test_loss_comes_only_from_masked_positions():
    ids = torch.randint(0, 5, (2, 6))
    masked = torch.tensor([[True, False, False, True, False, False], [False] * 5 + [True]])
    logits = torch.randn(2, 6, 5, requires_grad=True)
    masked_loss(logits, ids, masked, torch.tensor([0.3, 0.9])).backward()
    touched = logits.grad.abs().sum(-1) > 0
    assert torch.equal(touched, masked)


class _Recorder(torch.nn.Module):
    """A stand-in model: uniform logits over V tokens; remembers the ids it was given."""

    def __init__(self, V):
        super().__init__()
        self.V, self.seen = V, None

    def forward(self, ids):
        self.seen = ids
        return torch.zeros(*ids.shape, self.V)


class _Tok:
    mask_id = 9

    class hf:
        @staticmethod
        def token_to_id(text):
            return {"<|response|>": 8}.get(text)


def test_sft_never_masks_the_prompt():
    objective = MdmObjective(MdmObjectiveConfig(eps=1.0, sft=True, prompt_end="<|response|>"))  # eps 1: p = 1
    objective.bind(_Tok, vocab_size=10)
    ids = torch.tensor([[1, 2, 8, 3, 4, 5], [1, 8, 2, 8, 3, 4], [1, 2, 3, 4, 5, 6]])
    assert prompt_lengths(ids, 8).tolist() == [3, 2, 0]
    model = _Recorder(10)
    loss = objective(model, ids)
    assert model.seen.tolist() == [[1, 2, 8, 9, 9, 9], [1, 8, 9, 9, 9, 9], [9] * 6]
    assert loss.item() == pytest.approx((3 + 4 + 6) * math.log(10) / 18)


def test_a_mask_id_outside_the_vocabulary_is_refused():
    objective = MdmObjective(MdmObjectiveConfig(mask_id=10))
    with pytest.raises(Exception, match="outside the vocabulary"):
        objective.bind(_Tok, vocab_size=10)
    with pytest.raises(Exception, match="sft: true needs prompt_end"):
        MdmObjectiveConfig(sft=True)
    with pytest.raises(SetupError, match=re.escape("'<|nope|>' is not a token of the tokenizer")):
        MdmObjective(MdmObjectiveConfig(sft=True, prompt_end="<|nope|>")).bind(_Tok, vocab_size=10)


def test_objectives_and_samplers_are_listed(capsys):
    assert main(["ls", "sampler"]) == 0 and main(["ls", "objective"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("ar ", "mdm ", "next_token "))


@pytest.mark.parametrize("kwargs, overrides, message", [
    ({"mixer": "infllm_v2"}, [], "mixers.X.type: mixer 'infllm_v2' cannot run bidirectionally"),
    ({"causal": True}, [], "model.causal: true, but train.objective is mdm"),
    ({"mask_id": 512}, [], "train.objective.mask_id: 512 is outside the vocabulary"),
    ({"causal": True}, ["train.objective.type=next_token", "model.causal=false"],
     "the lm trainer predicts each next token"),
])
def test_bad_mdm_blueprints_exit_2_before_any_work(tmp_path, mdm_blueprint, kwargs, overrides, message, capsys):
    assert main(["train", mdm_blueprint(tmp_path, **kwargs), "--no-progress", *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists()


def test_objective_defaults_to_next_token_and_rejects_unknown_types():
    assert load_blueprint("builtin:tiny").train.objective.type == "next_token"
    with pytest.raises(BlueprintError, match="train.objective"):
        load_blueprint("builtin:tiny", ["train.objective.type=nope"])
