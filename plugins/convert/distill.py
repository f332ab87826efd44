"""The `distill` trainer (SPEC §6 stage 2): the whole student learns the teacher's next-token distributions.

Loss: forward KL(teacher ‖ student) over the vocabulary at every position, both softened by the temperature τ
and scaled by τ² (so the gradients keep their size as τ changes), averaged over positions; `lm_weight` w mixes in
the next-token loss on the data, (1 − w)·KL + w·CE, as distillation toolkits offer. Held-out evaluations report
the KL alone. Every student weight trains; the teacher is frozen beside it on the same device (bf16 autocast on
CUDA). The student is the stage's model: an earlier stage's checkpoint, or (in a first stage) the blueprint's
model made from the teacher by weight transfer. The next-token loss of both is logged alongside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hyloom.blueprint import BlueprintError, Problem
from hyloom.plugins.convert.config import DistillConfig
from hyloom.plugins.convert.loop import fit_loop
from hyloom.plugins.convert.teacher import check_fits, check_tokenizer, load_teacher, teacher_spec
from hyloom.plugins.convert.transfer import transfer
from hyloom.plugins.train.lm import compile_blocks, use_compile


def forward_kl(student_logits, teacher_logits, temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of KL(softmax(t/τ) ‖ softmax(s/τ)) · τ², in fp32."""
    V = student_logits.shape[-1]
    log_s = F.log_softmax(student_logits.float().reshape(-1, V) / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float().reshape(-1, V) / temperature, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature ** 2


def next_token_loss(logits_BTV, batch_BT1) -> torch.Tensor:
    return F.cross_entropy(logits_BTV.float().reshape(-1, logits_BTV.shape[-1]), batch_BT1[:, 1:].reshape(-1))


class DistillTrainer:
    def __init__(self, cfg: DistillConfig):
        self.cfg = cfg

    def _check(self, spec, transferring: bool) -> None:
        teacher = teacher_spec(self.cfg.teacher)
        if transferring:
            check_fits(teacher, spec, self.cfg.teacher)
        elif spec.vocab_size != teacher.vocab_size:  # the two distributions must be over one vocabulary
            raise BlueprintError([Problem("model.vocab_size", f"{spec.vocab_size}, but the teacher's is "
                                                              f"{teacher.vocab_size}", f"teacher {self.cfg.teacher}")])

    def check(self, blueprint) -> None:
        """The teacher exists and fits the student: refused before any data is prepared."""
        self._check(blueprint.model, self.cfg.transfer is not False)

    def fit(self, model, data, run) -> dict:
        cfg, env = self.cfg, run.env
        # the model is fresh unless the stage runner loaded an earlier stage's (or an init) checkpoint into it
        transferring = cfg.transfer if cfg.transfer is not None else getattr(run, "init", None) is None
        self._check(model.spec, transferring)
        check_tokenizer(cfg.teacher, data.dir)
        teacher = load_teacher(cfg.teacher, device=env.device, dtype=next(model.parameters()).dtype)
        if transferring:
            transfer(teacher, model, cfg.gate_init)
        model.requires_grad_(True)
        compiled = use_compile(cfg.compile, env.device)
        if compiled:  # only passes with gradients run compiled: held-out evaluations stay eager
            compile_blocks(model)

        def step(net, batch_BT1):
            ids = batch_BT1[:, :-1]
            with torch.no_grad():
                teacher_logits = teacher(ids)
            logits = net(ids)  # net: the student, in DDP under torchrun (the teacher is not: it does not train)
            kl, ce = forward_kl(logits, teacher_logits, cfg.temperature), next_token_loss(logits, batch_BT1)
            loss = kl if cfg.lm_weight == 0 else (1 - cfg.lm_weight) * kl + cfg.lm_weight * ce
            return loss, {"kl": kl.item(), "lm_loss": ce.item()}

        def evaluate(batch_BT1):
            ids = batch_BT1[:, :-1]
            teacher_logits, logits = teacher(ids), model(ids)
            return forward_kl(logits, teacher_logits, cfg.temperature), {
                "lm_loss": next_token_loss(logits, batch_BT1).item(),
                "teacher_lm_loss": next_token_loss(teacher_logits, batch_BT1).item()}

        start = "the teacher's weights (transfer)" if transferring else f"{getattr(run, 'init', None) or 'its weights'}"
        mixed = f", mixed with the next-token loss (weight {cfg.lm_weight:g})" if cfg.lm_weight else ""
        summary = [f"teacher  {cfg.teacher} ({teacher.num_parameters():,} parameters), frozen",
                   f"student  layout {''.join(model.spec.layout)}, from {start}; every weight trains on the forward "
                   f"KL to the teacher (temperature {cfg.temperature:g}){mixed}{', compiled' if compiled else ''}"]
        return fit_loop(cfg, name="distill", model=model, trains=model, data=data, run=run, resolved=run.resolved,
                        train_step=step, evaluate=evaluate, summary=summary)
