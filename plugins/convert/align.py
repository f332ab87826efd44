"""The `align` trainer (SPEC §6 stage 1): every layer's Lightning twin learns to reproduce its teacher layer.

The student is the blueprint's model with every layer made the linear twin, started from the teacher by weight
transfer. Each step runs the teacher once, recording each layer's mixer input and output (hooks), then every
twin on its teacher layer's input: the loss is the MSE of each twin's output against the teacher layer's,
averaged over layers. Only the twins' parameters train; everything else stays the teacher's. The checkpoint is
that all-linear student (layout: the twin symbol on every layer), which a selection stage then mixes with the
teacher's attention layers. Under torchrun only the twins (`TwinLosses`) are wrapped in DDP: the frozen rest of
the student and the teacher have no gradients to average.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from hyloom.model import build_model
from hyloom.plugins.convert.config import AlignConfig
from hyloom.plugins.convert.loop import fit_loop
from hyloom.plugins.convert.teacher import check_fits, check_tokenizer, load_teacher, teacher_spec
from hyloom.plugins.convert.transfer import all_twins, student_spec, transfer, twin_symbol


class MixerTaps:
    """Run the teacher and return, per layer, (mixer input, its MixerContext, mixer output)."""

    def __init__(self, teacher):
        self.teacher, self.taps = teacher, []
        for block in teacher.layers:
            block.mixer.register_forward_hook(self._record)

    def _record(self, module, args, output):
        self.taps.append((args[0], args[1], output))

    @torch.no_grad()
    def __call__(self, ids_BT) -> list:
        self.taps = []
        self.teacher(ids_BT)
        return self.taps


class TwinLosses(torch.nn.Module):
    """The student's twins (every trained parameter of the align stage, and nothing else) and their loss: the MSE
    of each twin, run on its teacher layer's recorded input, against that layer's output; [L]."""

    def __init__(self, student):
        super().__init__()
        self.twins = torch.nn.ModuleList(block.mixer for block in student.layers)
        self.positions = [block.position for block in student.layers]

    def forward(self, recorded: list) -> torch.Tensor:
        return torch.stack([F.mse_loss(twin(x, replace(ctx, position=position)).float(), y.float())
                            for twin, position, (x, ctx, y) in zip(self.twins, self.positions, recorded)])


class AlignTrainer:
    def __init__(self, cfg: AlignConfig):
        self.cfg = cfg

    def _student(self, model_section: dict, spec):
        """(resolved model section, validated spec) of the all-twin student."""
        twins = all_twins({"model": model_section}, twin_symbol(spec, self.cfg.twin))["model"]
        return twins, student_spec(twins)

    def check(self, blueprint) -> None:
        """The teacher exists and the all-twin student fits it: refused before any data is prepared."""
        _, spec = self._student(blueprint.model.model_dump(mode="json"), blueprint.model)
        check_fits(teacher_spec(self.cfg.teacher), spec, self.cfg.teacher)

    def fit(self, model, data, run) -> dict:
        cfg, env = self.cfg, run.env
        twins, spec = self._student(run.resolved["model"], run.blueprint.model)
        check_fits(teacher_spec(cfg.teacher), spec, cfg.teacher)
        check_tokenizer(cfg.teacher, data.dir)
        teacher = load_teacher(cfg.teacher, device=env.device, dtype=next(model.parameters()).dtype)
        torch.manual_seed(cfg.seed)
        student = build_model(spec, device=env.device).to(next(model.parameters()).dtype)
        transfer(teacher, student)
        student.requires_grad_(False)
        for block in student.layers:
            block.mixer.requires_grad_(True)
        taps, twin_losses = MixerTaps(teacher), TwinLosses(student)

        def step(net, batch_BT1):
            """All layers in one pass: the teacher once, then every twin on its layer's recorded input."""
            per_layer = net(taps(batch_BT1[:, :-1]))
            return per_layer.mean(), {f"mse/{i}": v for i, v in enumerate(per_layer.tolist())}

        symbol = twins["layout"][0]
        summary = [f"teacher  {cfg.teacher} ({teacher.num_parameters():,} parameters), frozen",
                   f"student  every layer a {spec.mixers[symbol].type} twin ({symbol}) from the teacher's attention; "
                   "only the twins train, each to its teacher layer's mixer output (MSE)"]
        return fit_loop(cfg, name="align", model=student, trains=twin_losses, data=data, run=run,
                        resolved={**run.resolved, "model": twins}, train_step=step,
                        evaluate=lambda batch_BT1: step(twin_losses, batch_BT1), summary=summary)
