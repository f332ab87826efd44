"""MQAR (multi-query associative recall, Zoology): the example generator, the `mqar` training source and the
`mqar` eval task. Both draw examples from `examples`, so a model trained on the source is measured on the
same distribution.

An example of length L with N pairs, in the task's own vocabulary of V ids:

    k1 v1 k2 v2 ... kN vN | 0 0 k3 v3 0 0 0 0 k1 v1 ... 0

keys are distinct draws from 1..V/2-1, values from V/2..V-1; after the pairs, the rest of the example is
cut into two-token slots, and each key is asked once in a slot drawn by a power law over slot index
(near slots far likelier), followed by its value; unused slots hold the filler id 0. A model is scored at the
query positions only: the logits at each asked key must put the paired value first.
"""

from __future__ import annotations

import numpy as np

from hyloom.plugins.eval.mqar_config import MqarShape, MqarSourceConfig, MqarTaskConfig


def examples(shape: MqarShape, rng: np.random.Generator, n: int, seq_len: int, num_kv: int):
    """`n` examples: ids [n, seq_len] (the task's own vocabulary) and the query positions [n, num_kv] (where
    ids holds an asked key; the value follows at position + 1)."""
    half = shape.vocab_size // 2
    keys = np.argsort(rng.random((n, half - 1)), axis=1)[:, :num_kv] + 1  # distinct within an example
    values = rng.integers(half, shape.vocab_size, size=(n, num_kv))
    ids = np.zeros((n, seq_len), dtype=np.int64)
    ids[:, 0:2 * num_kv:2], ids[:, 1:2 * num_kv:2] = keys, values
    slots = (seq_len - 2 * num_kv) // 2
    x = np.arange(1, slots + 1, dtype=np.float64)
    p = x ** (shape.power_a - 1)
    p /= p.sum()
    queries = np.stack([2 * num_kv + 2 * rng.choice(slots, num_kv, replace=False, p=p) for _ in range(n)])
    rows = np.arange(n)[:, None]
    ids[rows, queries], ids[rows, queries + 1] = keys, values
    return ids, queries


# ---- training source ---------------------------------------------------------------------------------------

class MqarSource:
    """`cfg.documents` pre-tokenized examples; the pipeline writes their ids above the tokenizer's vocabulary."""

    synthetic = True  # a mix keeps it out of the eval split by default (held-out text stays text)

    def __init__(self, cfg: MqarSourceConfig):
        self.cfg = cfg

    def fingerprint(self):
        return {"generator": 1, **self.cfg.model_dump(mode="json")}  # bump "generator" when examples change

    def __iter__(self):
        from hyloom.data import document

        rng = np.random.default_rng(self.cfg.seed % 2**63)
        for i in range(self.cfg.documents):
            num_kv = int(rng.choice(self.cfg.num_kv_pairs))
            ids = examples(self.cfg, rng, 1, self.cfg.seq_len, num_kv)[0][0]
            # the text is only a readable rendering (tiers judge it, the split counts its characters)
            doc = document(" ".join(map(str, ids)), f"mqar-{i}", "mqar", num_kv_pairs=num_kv)
            doc["ids"] = ids.tolist()
            yield doc


# ---- eval task ---------------------------------------------------------------------------------------------

def _model_spec(model):
    return getattr(model, "spec", None)


class MqarTask:
    def __init__(self, cfg: MqarTaskConfig):
        self.cfg = cfg

    def cells(self):
        return [(s, n) for s in self.cfg.seq_lens for n in self.cfg.num_kv_pairs if self.cfg.check_cell(s, n) is None]

    def run(self, ctx):
        import torch

        from hyloom.eval import EvalResult

        cfg, spec = self.cfg, _model_spec(ctx.model)
        if spec is not None and not getattr(spec, "causal", True):
            raise ValueError("mqar scores next-token predictions, which a non-causal model (model.causal: false) "
                             "does not make: every position sees the answer")
        offset = ctx.tokenizer.vocab_size  # where the source's ids were written in training
        needed = offset + cfg.vocab_size
        if spec is not None and spec.vocab_size < needed:
            raise ValueError(f"mqar ids sit above the tokenizer's {offset} tokens: the model needs vocab_size >= "
                             f"{offset} + {cfg.vocab_size} = {needed}, but has {spec.vocab_size}")
        rng = np.random.default_rng(cfg.seed % 2**63)
        rows, correct_by_cell = [], {}
        for seq_len, num_kv in self.cells():
            ids, queries = examples(cfg, rng, cfg.cases, seq_len, num_kv)
            hits = np.zeros((cfg.cases, num_kv), dtype=bool)
            logprobs = np.zeros((cfg.cases, num_kv))
            for start in range(0, cfg.cases, ctx.batch_size):
                batch = torch.from_numpy(ids[start:start + ctx.batch_size] + offset).to(ctx.device)
                q = torch.from_numpy(queries[start:start + ctx.batch_size]).to(ctx.device)
                with torch.no_grad():
                    logits = ctx.model(batch)
                values = batch.gather(1, q + 1)
                hits[start:start + len(batch)] = (logits.argmax(-1).gather(1, q) == values).cpu().numpy()
                if cfg.score == "answer_logprob":
                    at_query = logits.gather(1, q[..., None].expand(-1, -1, logits.shape[-1])).float()
                    logprobs[start:start + len(batch)] = (
                        torch.log_softmax(at_query, -1).gather(2, values[..., None])[..., 0].cpu().numpy())
            correct_by_cell[seq_len, num_kv] = hits
            for case, row_hits in enumerate(hits):
                row = {"length": seq_len, "num_kv_pairs": num_kv, "case": case, "correct": int(row_hits.sum()),
                       "queries": num_kv, "score": float(row_hits.mean()), "extrapolated": seq_len > ctx.train_len,
                       "query_hits": row_hits.astype(int).tolist()}
                if cfg.score == "answer_logprob":
                    row.update(score=float(logprobs[case].mean()), answer_logprob=float(logprobs[case].mean()),
                               query_logprobs=logprobs[case].tolist())
                rows.append(row)
        metrics = {k: float(np.mean(v)) for k, v in self.metric_cases(rows).items()}
        return EvalResult(metrics, rows, plot=lambda path: self.plot(path, correct_by_cell))

    def metric_cases(self, rows) -> dict[str, list[float]]:
        """Each metric's per-query values (a metric is their mean), in the task's fixed order, so two models'
        values pair up. The queries of one example are not independent cases: a standard error over them is a
        lower bound."""
        stats = ([("acc", "query_hits")] if self.cfg.score == "exact" else
                 [("answer_logprob", "query_logprobs"), ("answer_token_acc", "query_hits")])
        cases = {}
        for stat, field in stats:  # the headline (every query) first: what a caller takes when it names no metric
            cases[f"mqar/{stat}"] = [float(v) for r in rows for v in r[field]]
        for stat, field in stats:
            for seq_len, num_kv in self.cells():
                cases[f"mqar/{stat}@{seq_len}/kv{num_kv}"] = [
                    float(v) for r in rows if (r["length"], r["num_kv_pairs"]) == (seq_len, num_kv) for v in r[field]]
        return cases

    def plot(self, path, correct_by_cell):
        from hyloom.plot import heatmap

        grid = np.full((len(self.cfg.num_kv_pairs), len(self.cfg.seq_lens)), np.nan)
        for (seq_len, num_kv), hits in correct_by_cell.items():
            grid[self.cfg.num_kv_pairs.index(num_kv), self.cfg.seq_lens.index(seq_len)] = hits.mean()
        heatmap(path, grid, xlabel="sequence length (tokens)", ylabel="key-value pairs", colorbar="accuracy",
                title="MQAR accuracy", xticklabels=self.cfg.seq_lens, yticklabels=self.cfg.num_kv_pairs)
