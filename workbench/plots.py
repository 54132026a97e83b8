"""Plot and heatmap data shaped in pure functions (tested), before anything reaches a widget or plotext."""

from __future__ import annotations

import math
from collections.abc import Sequence

BLOCKS = " ▁▂▃▄▅▆▇█"


def normalise(values: Sequence[float]) -> list[float]:
    """Values scaled to [0, 1] (all equal -> all 0.5; NaN -> 0)."""
    clean = [0.0 if (v is None or math.isnan(v)) else float(v) for v in values]
    if not clean:
        return []
    lo, hi = min(clean), max(clean)
    if hi - lo <= 1e-30:
        return [0.5] * len(clean)
    return [(v - lo) / (hi - lo) for v in clean]


def sparkline(values: Sequence[float]) -> str:
    """One block character per value, its height the value's rank in [min, max]."""
    return "".join(BLOCKS[1 + round(v * (len(BLOCKS) - 2))] for v in normalise(values))


def bar(value: float, vmax: float, width: int) -> str:
    """A horizontal bar of `width` cells for value / vmax (eighths of a cell)."""
    if vmax <= 0 or width <= 0:
        return ""
    eighths = round(max(0.0, min(1.0, value / vmax)) * width * 8)
    full, rest = divmod(eighths, 8)
    return "█" * full + ("▏▎▍▌▋▊▉"[rest - 1] if rest else "")


def heat_bucket(value: float, lo: float, hi: float, buckets: int = 3) -> int:
    """Which of `buckets` colour classes a value falls into (0 = least important)."""
    if hi - lo <= 1e-30:
        return buckets // 2
    return min(buckets - 1, int((value - lo) / (hi - lo) * buckets))


def sorted_curve(scores: Sequence[float], cut: int) -> tuple[list[int], list[float], int]:
    """Scores sorted ascending (the neurons a cut removes come first) and the cut position on that axis."""
    ys = sorted(float(s) for s in scores)
    return list(range(len(ys))), ys, max(0, min(cut, len(ys)))


def lowest(scores: Sequence[float], count: int) -> list[int]:
    """Indices of the `count` lowest scores (ties broken by index, so the choice is deterministic)."""
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
    return sorted(order[: max(0, count)])


def log_spectrum(values: Sequence[float], floor: float = 1e-12) -> list[float]:
    """log10 of |values| (singular values, sv_grad magnitudes), floored so zeros stay plottable."""
    return [math.log10(max(abs(float(v)), floor)) for v in values]


# one glyph per series, so curves read apart without colour (sv and sv_grad used to share the braille dot)
MARKERS = (("braille", "⣿"), ("x", "x"), ("+", "+"), ("o", "o"))


def legend_line(labels: Sequence[str]) -> str:
    """The legend under a chart (inside the canvas it covered the data): "⣿ log10 |sv|   x log10 |sv_grad|"."""
    return "   ".join(f"{MARKERS[i % len(MARKERS)][1]} {label}" for i, label in enumerate(labels))


def log_curve(scores: Sequence[float], cut: int) -> tuple[list[float], int]:
    """Neuron scores sorted ascending (what a cut removes first) on a log10 axis, and the cut position: on a linear
    axis the few large scores flatten the low half, which is where the cut is."""
    _, ys, at = sorted_curve(scores, cut)
    return log_spectrum(ys), at


def plotext_chart(series: dict[str, list[float]], width: int, height: int, *, title: str = "",
                  vline: float | None = None) -> str:
    """A plotext (6.x) line chart as a plain string (no colour codes), for a Static widget; each series has its
    own glyph, and the legend is a line under the chart."""
    import plotext as plt

    fig = plt.figure
    fig.clear()
    fig.plot_size(max(20, width), max(6, height - 1))
    fig.theme("colorless")
    for i, ys in enumerate(series.values()):
        signal = fig.signal(list(range(len(ys))), list(ys), marker=MARKERS[i % len(MARKERS)][0])
        fig.draw(signal)
    if vline is not None:
        fig.line(vline, orientation="vertical")
    if title:
        fig.title(title)
    return fig.build().string(colorless=True) + "\n" + legend_line(list(series))
