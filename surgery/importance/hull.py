"""The lower convex hull of one component's (amount removed, cost) options, shared by the allocators.

Why a hull: a greedy that takes the options of many components in order of cost per amount is only sound on convex
cost curves. Points above the hull are never the cheapest way to remove their amount at any price per unit, so the
greedy walks hull vertices (`hull_segments`, walked by `surgery.importance.allocate.hull_allocate`, the --axes
greedy and the measured curves' allocation; `ranks.gradient_ranks` for low rank).
"""

from __future__ import annotations


def lower_hull(opts: list[tuple[float, float]]) -> list[int]:
    """Indices of the lower convex hull of `opts` (amount, cost), by increasing amount, from an amount-0 option.

    Equal amounts keep the cheapest; a point on a chord is dropped (it adds nothing a greedy could use).
    """
    order = sorted(range(len(opts)), key=lambda i: (opts[i][0], opts[i][1]))
    start = next(i for i in order if opts[i][0] == 0)
    hull = [start]
    for i in order:
        a, c = opts[i]
        if a <= opts[hull[-1]][0]:
            continue
        while len(hull) >= 2:  # pop while the last point lies on or above the chord
            (a1, c1), (a2, c2) = opts[hull[-2]], opts[hull[-1]]
            if (c2 - c1) * (a - a1) >= (c - c1) * (a2 - a1):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


Segment = tuple[float, int, int, int, float]  # (cost per amount, group, j-th hull step, option it ends at, amount)


def hull_segments(groups: list[list[tuple[float, float]]]) -> tuple[list[int], list[Segment]]:
    """Per group the option its hull starts at (amount 0), and every hull step of every group, cheapest per amount
    first (ties: by group, then in the group's own order, so a group's steps are always taken in order)."""
    starts, segments = [], []
    for g, opts in enumerate(groups):
        hull = lower_hull(opts)
        starts.append(hull[0])
        for j in range(1, len(hull)):
            (a1, c1), (a2, c2) = opts[hull[j - 1]], opts[hull[j]]
            segments.append(((c2 - c1) / (a2 - a1), g, j, hull[j], a2 - a1))
    segments.sort()
    return starts, segments
