"""Figures for runs and analyses, drawn with matplotlib: one line plot and one heatmap, each written to a file.

matplotlib is imported on first use (the CLI starts without it) and drawn through its Agg canvas, never
pyplot, so no global backend or figure state is touched and nothing needs a display."""

from __future__ import annotations

from pathlib import Path


def _figure(size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def line_plot(path: str | Path, series: dict[str, list[tuple[float, float]]], *, xlabel: str, ylabel: str,
              title: str | None = None, hlines: dict[str, float] | None = None, markers: tuple[str, ...] = (),
              styles: dict[str, dict] | None = None, size=(7.0, 4.2)):
    """One line per named series of (x, y) points, a dashed horizontal line per `hlines` entry (a baseline),
    a legend naming each. Series named in `markers` are drawn with a dot at every point (sparse series such as
    evaluations); `styles` gives a series matplotlib line options, e.g. {"color": "C1", "linestyle": "--"} (two
    groupings in one figure: colour for one, line style for the other). Writes `path` (the suffix picks the
    format) and returns the matplotlib Figure."""
    fig = _figure(size)
    ax = fig.subplots()
    for name, points in series.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=name, marker="o" if name in markers else None, markersize=4,
                    **(styles or {}).get(name, {}))
    for name, value in (hlines or {}).items():
        ax.axhline(value, linestyle="--", color="0.4", linewidth=1, label=f"{name} ({value:.2f})")
    ax.set(xlabel=xlabel, ylabel=ylabel)
    if all(float(x).is_integer() for points in series.values() for x, _ in points):
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps, counts: no ticks at 2.5
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.savefig(path)
    return fig


def heatmap(path: str | Path, values, *, xlabel: str, ylabel: str, title: str | None = None,
            colorbar: str = "", xticklabels=None, yticklabels=None, cmap: str = "viridis", size=(6.0, 5.0),
            vmin: float | None = None, vmax: float | None = None):
    """A 2-D array (rows on the y axis, top to bottom) as coloured cells with a labelled colour bar; `vmin`/`vmax`
    fix the colour scale (e.g. 0 and 1 for accuracies; default: the data's range). Writes `path` and returns the
    matplotlib Figure."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    values = np.asarray(values, dtype=float)
    if values.ndim != 2:
        raise ValueError(f"heatmap needs a 2-D array, got shape {values.shape}")
    fig = _figure(size)
    ax = fig.subplots()
    image = ax.imshow(values, cmap=cmap, aspect="auto", interpolation="nearest", vmin=vmin, vmax=vmax)
    fig.colorbar(image, ax=ax, label=colorbar)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    for axis in (ax.xaxis, ax.yaxis):  # cells are indices: no ticks between them
        axis.set_major_locator(MaxNLocator(integer=True))
    if xticklabels is not None:
        ax.set_xticks(range(len(xticklabels)), labels=[str(t) for t in xticklabels])
    if yticklabels is not None:
        ax.set_yticks(range(len(yticklabels)), labels=[str(t) for t in yticklabels])
    if title:
        ax.set_title(title)
    fig.savefig(path)
    return fig


def bar_plot(path: str | Path, heights: list[float], *, marked=(), marked_label: str = "", other_label: str = "",
             xlabel: str, ylabel: str, title: str | None = None, size=(7.0, 4.2)):
    """One bar per index (0, 1, ...); bars at the indices in `marked` are drawn in a second colour, and the legend
    names both groups (e.g. a score per layer, the kept layers marked). Writes `path`; returns the Figure."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(size)
    ax = fig.subplots()
    marked = set(marked)
    for group, label, color in ((False, other_label, "0.65"), (True, marked_label, "C3")):
        xs = [i for i in range(len(heights)) if (i in marked) == group]
        if xs:
            ax.bar(xs, [heights[i] for i in xs], color=color, label=label or None)
    if marked:  # a marked bar of height 0 still shows
        ax.scatter(sorted(marked), [0] * len(marked), marker="^", color="C3", zorder=3, clip_on=False)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.savefig(path)
    return fig
