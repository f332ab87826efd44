"""The `select` trainer: the step between `align` and `distill` that chooses which layers stay attention.

It starts from the aligned all-twin student (the previous stage's checkpoint: every layer the linear twin),
runs the configured selector with twin(i) = that student's layer i mixer, writes selection.json and
selection.png, and saves the hybrid as its checkpoint: the kept layers are the teacher's attention (copied, with
a fresh gate; HyPE makes them NoPE), the others keep their aligned twins, everything else is the aligned
student's (the teacher's). The blueprint declares both symbols in `model.mixers` (the attention one and the twin);
the saved checkpoint's `model.layout` is the chosen one, so the next stage builds the hybrid from it. Nothing
trains here. Under torchrun rank 0 alone measures, selects and saves; the other processes wait for it.
"""

from __future__ import annotations

import copy

import torch

from hyloom.blueprint import BlueprintError, Problem
from hyloom.plugins.convert.config import SelectConfig
from hyloom.plugins.convert.teacher import check_fits, check_tokenizer, load_teacher, teacher_spec
from hyloom.plugins.convert.transfer import all_twins, copy_attention, student_spec
from hyloom.train import RunDir, SetupError, saved_blueprint


def _family(cfg) -> str:
    from hyloom.registry import registry

    return registry().get("mixer", cfg.type).capabilities.family


class SelectTrainer:
    def __init__(self, cfg: SelectConfig):
        from hyloom.registry import registry

        self.cfg = cfg
        self.selector = registry().get("selector", cfg.selector.type).build(cfg.selector)

    def _attention_symbol(self, spec) -> str:
        """The model.mixers symbol of the kept layers: `attention`, or the one non-linear symbol."""
        if self.cfg.attention is not None:
            if self.cfg.attention not in spec.mixers or _family(spec.mixers[self.cfg.attention]) == "linear":
                raise BlueprintError([Problem("train.attention", f"{self.cfg.attention!r} is not an attention "
                                                                 f"symbol of model.mixers ({', '.join(spec.mixers)})")])
            return self.cfg.attention
        found = [s for s, m in spec.mixers.items() if _family(m) != "linear"]
        if len(found) != 1:
            which = f"several ({', '.join(found)}); name one in train.attention" if found else "none"
            raise BlueprintError([Problem("model.mixers", f"the select step keeps some layers as the teacher's "
                                                          f"attention, so it needs one attention symbol beside the "
                                                          f"linear twin; found {which}")])
        return found[0]

    def check(self, blueprint) -> None:
        """Before any stage trains: the budget and the selector's settings, the attention symbol, and that the
        teacher exists and fits both an all-attention and an all-twin student of this model."""
        spec, n = blueprint.model, blueprint.model.n_layers
        self.selector.check(n, self.cfg.layers(n), heldout=blueprint.data is not None)
        attention = self._attention_symbol(spec)
        teacher = teacher_spec(self.cfg.teacher)
        section = blueprint.model.model_dump(mode="json")
        linear = [s for s, m in spec.mixers.items() if _family(m) == "linear"]
        for symbol in [attention, *linear]:
            check_fits(teacher, student_spec(all_twins({"model": section}, symbol)["model"]), self.cfg.teacher)

    def fit(self, model, data, run) -> dict:
        env = run.env
        if env.main:
            result = self._select(model, data, run)
        env.barrier()  # rank 0's checkpoint is the next stage's start on every rank
        if env.main:
            return result
        latest = RunDir(run.out_dir or self.cfg.out_dir).latest()
        return {"checkpoint": str(latest), "layout": "".join(saved_blueprint(latest)["model"]["layout"])}

    def _select(self, model, data, run) -> dict:
        from hyloom.data import data_spec
        from hyloom.eval import EvalContext, heldout_reader
        from hyloom.model import build_model
        from hyloom.plugins.convert.selection import SelectionContext

        cfg, env, spec = self.cfg, run.env, model.spec
        out = RunDir(run.out_dir or cfg.out_dir)
        if run.resume == "auto" and out.latest() is not None:  # stopped after saving, before the stage was marked
            print(f"select   already done: {out.latest()}", flush=True)
            return {"checkpoint": str(out.latest()), "layout": "".join(run.resolved["model"]["layout"])}
        if run.init is None:
            raise SetupError("the select step chooses among aligned twins: it starts from an align stage's "
                             "checkpoint (put an align stage before it, or give this stage init: PATH)")
        twins = sorted(set(spec.layout))
        if len(twins) != 1 or _family(spec.mixers[twins[0]]) != "linear":
            raise SetupError(f"{run.init}: layout {''.join(spec.layout)} is not an all-twin student (every layer "
                             "one linear symbol, as an align stage saves it)")
        twin, attention = twins[0], self._attention_symbol(spec)
        n, budget = spec.n_layers, cfg.layers(spec.n_layers)
        self.selector.check(n, budget, heldout=True)
        teacher_model = teacher_spec(cfg.teacher)
        hybrid_section = all_twins({"model": run.resolved["model"]}, twin)["model"]
        check_fits(teacher_model, student_spec(all_twins({"model": hybrid_section}, attention)["model"]), cfg.teacher)
        check_tokenizer(cfg.teacher, data.dir)
        dtype = next(model.parameters()).dtype
        teacher = load_teacher(cfg.teacher, device=env.device, dtype=dtype)
        model.eval()
        ectx = EvalContext(model=None, tokenizer=data.tokenizer, device=env.device,
                           heldout_ids=heldout_reader(data.dir), train_len=data_spec(run.blueprint.data).seq_len,
                           batch_size=cfg.batch_size, seed=cfg.seed, progress=run.progress)
        with torch.no_grad():
            selection = self.selector.select(SelectionContext(n, budget, teacher, lambda i: model.layers[i].mixer,
                                                              ectx))
        selection.write(out.path)
        hybrid_section["layout"] = selection.layout(attention, twin)
        hybrid = build_model(student_spec(hybrid_section), device=env.device).to(dtype)
        kept = set(selection.kept)
        mine = model.state_dict()
        with torch.no_grad():
            for name, tensor in hybrid.state_dict().items():
                if not any(name.startswith(f"layers.{i}.mixer.") for i in kept):
                    tensor.copy_(mine[name])
            for i in kept:
                copy_attention(teacher.layers[i].mixer, hybrid.layers[i].mixer, hybrid.spec.init_std,
                               cfg.gate_init)
        resolved = copy.deepcopy(run.resolved)
        resolved["model"] = hybrid_section
        path = out.save(0, hybrid, resolved, {"step": 0}, keep=1,
                        extra_files={"tokenizer.json": (data.dir / "tokenizer.json").read_text()})
        layout = "".join(hybrid_section["layout"])
        scored = [row for row in selection.layers if row["score"] is not None]
        print(f"select   {selection.selector}: kept {len(kept)} of {n} layers as attention "
              f"({', '.join(map(str, selection.kept)) or 'none'}); layout {layout}", flush=True)
        if scored:
            print("scores   " + "  ".join(f"{r['layer']}:{r['score']:.3g}" for r in scored), flush=True)
        print(f"run      {out.path}: selection.json, selection.png, {path.name}", flush=True)
        return {"checkpoint": str(path), "layout": layout, "kept": selection.kept}
