"""Plot shaping (issue 16): each series its own glyph, the legend under the chart, neuron curves on a log axis."""

from __future__ import annotations

import math

from workbench.plots import MARKERS, log_curve, plotext_chart


def test_two_series_read_apart_without_colour_and_the_legend_stays_off_the_data():
    chart = plotext_chart({"log10 |sv|": [2.0 - i / 30 for i in range(60)], "log10 |sv_grad|": [0.0] * 60}, 60, 12)
    *canvas, legend = chart.splitlines()
    assert legend == "⣿ log10 |sv|   x log10 |sv_grad|"
    assert any("x" in line for line in canvas) and any(ch in "".join(canvas) for ch in "⠁⠂⠄⡀⠈⠐⠠⢀")
    assert not any("sv" in line for line in canvas)  # no legend box inside the canvas
    assert len({glyph for _, glyph in MARKERS}) == len(MARKERS)


def test_neuron_curve_is_log_scaled_lowest_first_with_the_cut_position():
    scores = [1000.0, 0.001, 0.1, 10.0]
    ys, at = log_curve(scores, 2)
    assert ys == [math.log10(0.001), math.log10(0.1), math.log10(10.0), math.log10(1000.0)] and at == 2
    # the two lowest (the cut) are 2 decades apart on this axis; on a linear axis both sat at ~0
