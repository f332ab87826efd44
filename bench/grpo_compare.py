"""Held-out accuracy against the GRPO step for several runs of bench/grpo_small.py in one figure (colour: model).

    python bench/grpo_compare.py --out docs/results/grpo/runs14-16.png LABEL=RUN/results.json [...]

Each LABEL=PATH adds every model of that results.json, labelled "MODEL LABEL"; the first arm where a run has
several. A label may be empty (=PATH). Prints one line per curve: first → last accuracy and the steps."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def curves(runs: list[tuple[str, dict]]) -> dict[str, tuple[str, list[tuple[int, float]]]]:
    """{curve label: (model, [(step, accuracy)])} for every model of every (label, results) run."""
    out = {}
    for label, results in runs:
        for model, entry in results["models"].items():
            if "grpo" in entry:
                name = f"{model} {label}".strip()
                out[name] = (model, [(p["step"], p["accuracy"]) for p in entry["grpo"]["eval_curve"]])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--title", default="GRPO: held-out accuracy (sampled, T = 1)")
    parser.add_argument("runs", nargs="+", metavar="LABEL=PATH", help="a label and a results.json")
    args = parser.parse_args(argv)
    runs = []
    for spec in args.runs:
        label, sep, path = spec.rpartition("=")
        if not sep or not Path(path).is_file():
            parser.error(f"{spec!r}: LABEL=PATH with PATH a results.json of bench/grpo_small.py")
        runs.append((label, json.loads(Path(path).read_text())))
    drawn = curves(runs)
    if not drawn:
        parser.error("none of these results has a finished GRPO run")
    from hyloom.plot import line_plot

    models = list(dict.fromkeys(m for m, _ in drawn.values()))
    styles, seen = {}, {m: 0 for m in models}
    for name, (m, _) in drawn.items():  # colour per model, line style per run of that model
        styles[name] = {"color": f"C{models.index(m)}", "linestyle": ("-", "--", ":", "-.")[seen[m] % 4]}
        seen[m] += 1
    line_plot(args.out, {name: points for name, (_, points) in drawn.items()}, styles=styles,
              xlabel="GRPO step", ylabel="held-out accuracy (sampled, T = 1)", title=args.title, size=(8.0, 5.0))
    for name, (_, points) in drawn.items():
        print(f"{name}: {points[0][1]:.3f} -> {points[-1][1]:.3f} in {points[-1][0]} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
