"""Weight transfer teacher → student (SPEC §6 step 0) and the teacher loader: exactness with every layer kept,
twins made from the teacher's projections (K/V repeated per query head), refusals that name both values."""

import pytest
import torch

from hyloom.blueprint import BlueprintError
from hyloom.checkpoint import load_checkpoint
from hyloom.errors import SetupError
from hyloom.plugins.convert.teacher import check_fits, load_teacher, teacher_spec
from hyloom.plugins.convert.transfer import student_spec, transfer
from tiny_teacher import TEACHER, build, make_teacher, student


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("teacher") / "checkpoint")


def ids(n=2, t=24):
    return torch.randint(0, TEACHER["vocab_size"], (n, t), generator=torch.Generator().manual_seed(0))


def test_with_every_layer_kept_the_student_is_the_teacher(teacher_dir):
    teacher = load_teacher(teacher_dir, device="cpu")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    student_model = build(TEACHER, seed=7)  # same layout and position policy, other random weights
    x = ids()
    assert not torch.allclose(student_model(x), teacher(x), atol=1e-3)
    check_fits(teacher.spec, student_model.spec, teacher_dir)
    transfer(teacher, student_model)
    torch.testing.assert_close(student_model(x), teacher(x), rtol=0, atol=1e-5)


def test_a_neutral_gate_keeps_the_teachers_function_and_a_random_one_does_not(teacher_dir):
    """Kept attention layers gain an output gate the teacher lacks. gate "neutral" (zero gate weights, o_proj
    doubled) starts each such layer as exactly the teacher's: with every layer kept and the teacher's RoPE, the
    student's logits are the teacher's; the SPEC's random gate (sigmoid ≈ 0.5 with noise) changes them."""
    teacher = load_teacher(teacher_dir, device="cpu")
    gated = {**TEACHER, "mixers": {"A": {**TEACHER["mixers"]["A"], "gate": True}}}
    x = ids()
    for gate, equal in (("neutral", True), ("random", False)):
        s = build(gated, seed=7)
        transfer(teacher, s, gate)
        assert torch.allclose(s(x), teacher(x), rtol=0, atol=1e-5) == equal, gate
        if equal:
            assert all(not block.mixer.g_proj.weight.any() for block in s.layers)
            assert torch.equal(s.layers[0].mixer.o_proj.weight, 2 * teacher.layers[0].mixer.o_proj.weight)


def test_twins_start_from_the_teacher_projections_and_kept_layers_copy_it(teacher_dir):
    teacher = load_teacher(teacher_dir, device="cpu")
    s = build(student("LAL"), seed=7)
    transfer(teacher, s)
    G, D = 2, 8  # 4 query heads share 2 K/V heads
    for i in (0, 2):
        t, twin = teacher.layers[i].mixer, s.layers[i].mixer
        assert torch.equal(twin.q_proj.weight, t.q_proj.weight) and torch.equal(twin.o_proj.weight, t.o_proj.weight)
        for h in range(4):  # query head h read K/V head h // G in the teacher
            for name in ("k_proj", "v_proj"):
                mine = getattr(twin, name).weight[h * D:(h + 1) * D]
                theirs = getattr(t, name).weight[(h // G) * D:(h // G + 1) * D]
                assert torch.equal(mine, theirs), (i, h, name)
        assert torch.equal(twin.q_norm.weight, t.q_norm.weight) and torch.equal(twin.k_norm.weight, t.k_norm.weight)
        assert torch.equal(twin.o_norm.weight, torch.ones_like(twin.o_norm.weight))  # fresh
        assert twin.z_proj.weight.std().item() == pytest.approx(0.02, rel=0.2)  # fresh gate (init_std)
    kept, t = s.layers[1].mixer, teacher.layers[1].mixer
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
        assert torch.equal(getattr(kept, name).weight, getattr(t, name).weight), name
    assert kept.g_proj.weight.std().item() == pytest.approx(0.02, rel=0.2)
    for name, tensor in s.state_dict().items():  # embedding, norms, FFNs
        if ".mixer." not in name:
            assert torch.equal(tensor, teacher.state_dict()[name]), name
    # HyPE: the twins rotate (RoPE), the kept layer does not
    assert type(s.layers[0].position).__name__ == "Rotary" and type(s.layers[1].position).__name__ == "NoPosition"


@pytest.mark.parametrize("changes, said", [
    ({"d_model": 48}, "model.d_model: 48, but the teacher's is 32"),
    ({"vocab_size": 600}, "model.vocab_size: 600, but the teacher's is 512"),
    ({"n_layers": 2, "layout": "LL"}, "model.n_layers: 2, but the teacher's is 3"),
    ({"mixers": {"L": {"type": "lightning", "heads": 2, "head_dim": 8}}},
     "model.mixers.L (layer 0).heads: 2, but the teacher's layer 0 has heads 4"),
    ({"mixers": {"L": {"type": "lightning", "heads": 4, "head_dim": 16}}},
     "model.mixers.L (layer 0).head_dim: 16, but the teacher's layer 0 has head_dim 8"),
    ({"layout": "ALL", "mixers": {"A": {"type": "attention", "heads": 4, "kv_heads": 4, "head_dim": 8,
                                        "qk_norm": True}, "L": {"type": "lightning", "heads": 4, "head_dim": 8}}},
     "model.mixers.A (layer 0).kv_heads: 4, but the teacher's layer 0 has 2"),
    ({"position": {"type": "hype", "rope_theta": 1e6}},
     "rope_theta: 1000000.0, but the teacher's RoPE base is 10000.0"),
])
def test_students_that_do_not_fit_are_refused_naming_both_values(teacher_dir, changes, said):
    with pytest.raises(BlueprintError) as exc:
        check_fits(teacher_spec(teacher_dir), student_spec(student(**changes)), teacher_dir)
    assert said in str(exc.value) and str(teacher_dir) in str(exc.value)


def test_a_missing_or_wrong_teacher_path_is_refused(tmp_path):
    with pytest.raises(SetupError, match="teacher .*nope: does not exist"):
        teacher_spec(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SetupError, match="empty: neither a hyloom checkpoint .* nor a Hugging Face directory"):
        teacher_spec(tmp_path / "empty")


def test_a_hugging_face_teacher_loads_through_the_import(teacher_dir, tmp_path):
    from hyloom.plugins.hf import export_hf

    export_hf(teacher_dir, tmp_path / "hf")
    assert teacher_spec(tmp_path / "hf").layout == ["A"] * 3  # read from config.json, no weights
    hf = load_teacher(tmp_path / "hf", device="cpu")
    ours, _ = load_checkpoint(teacher_dir)
    assert not any(p.requires_grad for p in hf.parameters()) and not hf.training
    torch.testing.assert_close(hf(ids()), ours(ids()), rtol=0, atol=0)
