"""The plotting helpers draw with matplotlib: labelled axes, a legend naming every line, baselines, colour bars."""

import pytest
from matplotlib.image import imread

from hyloom.plot import heatmap, line_plot


def test_line_plot_labels_every_line_and_the_baseline(tmp_path):
    path = tmp_path / "loss.png"
    fig = line_plot(path, {"train": [(1, 8.0), (2, 7.0), (3, 6.5)], "held-out": [(3, 6.8)]},
                    xlabel="optimizer step", ylabel="loss (nats/token)", title="run",
                    hlines={"unigram baseline": 6.54}, markers=("held-out",))
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("optimizer step", "loss (nats/token)", "run")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "held-out", "unigram baseline (6.54)"]
    baseline = ax.get_lines()[-1]
    assert list(baseline.get_ydata()) == [6.54, 6.54] and baseline.get_linestyle() == "--"
    assert ax.get_lines()[1].get_marker() == "o"
    assert imread(path).shape == (630, 1050, 4)


def test_heatmap_has_a_labelled_colour_bar(tmp_path):
    fig = heatmap(tmp_path / "h.png", [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], xlabel="key block", ylabel="layer",
                  colorbar="score", yticklabels=["L0", "L1"])
    ax, bar = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel(), bar.get_ylabel()) == ("key block", "layer", "score")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["L0", "L1"]
    assert ax.images[0].get_array().shape == (2, 3)
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="2-D array"):
        heatmap(tmp_path / "bad.png", [1.0, 2.0], xlabel="x", ylabel="y")
