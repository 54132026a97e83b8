"""Textual themes for the workbench: a dark default, a light theme and a high-contrast one.

Heatmaps (head grids, neuron curves) read three theme variables so that every theme, including the
colorblind-safe one, controls how importance is shown: `heat-low`, `heat-mid`, `heat-high`. The contrast theme uses
the blue -> orange ramp of the Okabe-Ito palette, which keeps its order for all three common colour-vision
deficiencies and in 256-colour terminals.
"""

from __future__ import annotations

from textual.theme import Theme

DARK = Theme(
    name="workbench-dark",
    primary="#5fafd7",
    secondary="#87af87",
    accent="#d7af5f",
    warning="#d7af00",
    error="#d75f5f",
    success="#87d787",
    foreground="#d0d0d0",
    background="#1c1c1c",
    surface="#262626",
    panel="#303030",
    dark=True,
    variables={"heat-low": "#303030", "heat-mid": "#5f87af", "heat-high": "#d7af5f", "marked": "#d75f5f"},
)

LIGHT = Theme(
    name="workbench-light",
    primary="#005f87",
    secondary="#005f00",
    accent="#875f00",
    warning="#875f00",
    error="#af0000",
    success="#005f00",
    foreground="#1c1c1c",
    background="#ffffff",
    surface="#eeeeee",
    panel="#dadada",
    dark=False,
    variables={"heat-low": "#eeeeee", "heat-mid": "#87afd7", "heat-high": "#d78700", "marked": "#af0000"},
)

CONTRAST = Theme(
    name="workbench-contrast",
    primary="#56b4e9",
    secondary="#009e73",
    accent="#e69f00",
    warning="#f0e442",
    error="#d55e00",
    success="#009e73",
    foreground="#ffffff",
    background="#000000",
    surface="#000000",
    panel="#1c1c1c",
    dark=True,
    variables={"heat-low": "#0072b2", "heat-mid": "#56b4e9", "heat-high": "#e69f00", "marked": "#d55e00"},
)

THEMES = (DARK, LIGHT, CONTRAST)
DEFAULT_THEME = DARK.name
