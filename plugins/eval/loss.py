"""`loss_by_position`: mean held-out next-token NLL in log-spaced position buckets.

The held-out token stream (documents joined by EOS, as the training windows are) is cut into consecutive
windows of `length + 1` tokens; position t of a window is the prediction of token t+1 from the t+1 tokens
before it. Buckets are [0, 1), [1, 2), [2, 4), [4, 8), ... (the last one ends at `length`): equal widths on
a log axis, where loss curves over position are read.
"""

from __future__ import annotations

import numpy as np

from hyloom.plugins.eval.loss_config import LossByPositionConfig

LOGITS_BUDGET = 1 << 27  # floats of logits per forward (512 MiB): long lengths run fewer rows at once


def buckets(length: int) -> list[tuple[int, int]]:
    edges = [0] + [1 << k for k in range(length.bit_length()) if (1 << k) < length] + [length]
    return list(zip(edges[:-1], edges[1:]))


class LossByPosition:
    def __init__(self, cfg: LossByPositionConfig):
        self.cfg = cfg

    def run(self, ctx):
        import torch
        import torch.nn.functional as F

        from hyloom.eval import EvalResult

        spec = getattr(ctx.model, "spec", None)
        if spec is not None and not getattr(spec, "causal", True):
            raise ValueError("loss_by_position measures next-token loss, which a non-causal model "
                             "(model.causal: false) does not predict: every position sees its target")
        heldout = np.asarray(ctx.heldout_ids())
        vocab = getattr(spec, "vocab_size", 1)
        metrics, rows, curves = {}, [], {}
        for length in self.cfg.lengths:
            n = min(self.cfg.sequences, (len(heldout) - 1) // length)
            if n < 1:
                raise ValueError(f"loss_by_position: the held-out split has {len(heldout):,} tokens, fewer than one "
                                 f"sequence of length {length:,} + 1; use a shorter length or hold out more "
                                 f"(data.eval_fraction)")
            per_row = max(1, min(ctx.batch_size, LOGITS_BUDGET // (length * vocab)))
            nll_sum = torch.zeros(length, dtype=torch.float64)
            for start in range(0, n, per_row):
                rows_ids = [heldout[i * length:i * length + length + 1] for i in range(start, min(n, start + per_row))]
                batch = torch.from_numpy(np.stack(rows_ids).astype(np.int64)).to(ctx.device)
                with torch.no_grad():
                    logits = ctx.model(batch[:, :-1]).float()
                nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")  # [B, T]
                nll_sum += nll.sum(0).double().cpu()
            per_position = (nll_sum / n).numpy()
            metrics[f"loss/nll@{length}"] = float(per_position.mean())
            curves[length] = []
            for lo, hi in buckets(length):
                value = float(per_position[lo:hi].mean())
                curves[length].append((hi, value))
                rows.append({"length": length, "start": lo, "end": hi, "nll": value, "tokens": n * (hi - lo),
                             "sequences": n, "extrapolated": length > ctx.train_len,
                             "past_train_len": lo >= ctx.train_len})
        return EvalResult(metrics, rows, plot=lambda path: self.plot(path, curves, ctx.train_len))

    @staticmethod
    def plot(path, curves, train_len):
        from hyloom.plot import line_plot

        fig = line_plot(path, {f"length {length}": points for length, points in curves.items()},
                        xlabel="position (end of bucket, log scale)", ylabel="held-out NLL (nats/token)",
                        title="loss by position", markers=tuple(f"length {length}" for length in curves))
        ax = fig.axes[0]
        ax.set_xscale("log", base=2)
        ax.axvline(train_len, color="0.3", linestyle=":", linewidth=1, label=f"train length ({train_len})")
        ax.legend()
        fig.savefig(path)
