"""The scoring methods: CLI names, the metric each one writes, and what each needs from a run.

A method name on the command line uses dashes (`head-grad`), the metric stored in a score file uses underscores
(`head_grad`). Every method belongs to one of four kinds, which decides how the runner computes it:

- `grad`: from the gradients of the one combined forward+backward pass per batch (hooks);
- `forward`: from activations of that same pass (no backward needed if no `grad` method was asked for);
- `ablate`: one extra forward over the calibration tokens per component (the slow reference);
- `weights`: from the weights alone (no data), plus the activation/gradient statistics where noted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from surgery.errors import UserError


@dataclass(frozen=True)
class Method:
    """One scoring method.

    Attributes:
        name: CLI name ("head-grad").
        kind: "grad", "forward", "ablate" or "weights" (see the module docstring).
        target: what is scored: "head", "kv_group", "neuron", "layer" or "linear".
        help: one line for `--help` and the docs.
    """

    name: str
    kind: str
    target: str
    help: str

    @property
    def metric(self) -> str:
        """The metric name in score files ("head_grad")."""
        return self.name.replace("-", "_")


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("head-grad", "grad", "head", "sum over batches of |dL/d gate| per query head (Michel et al. 2019)"),
        Method("kv-group-grad", "grad", "kv_group", "the same with one gate per KV group"),
        Method("head-taylor", "grad", "head", "sum over batches of |sum over tokens of a . dL/da|, a = head output"),
        Method("neuron-taylor", "grad", "neuron", "sum over batches of |sum over tokens of a * dL/da| per neuron"),
        Method("head-delta", "grad", "head", "first-order estimate of head-ablate: -sum over all tokens of a . dL/da"),
        Method("neuron-delta", "grad", "neuron", "first-order estimate of removing the neuron: -sum of a * dL/da"),
        Method("head-act", "forward", "head", "mean L2 norm of each head's output over calibration tokens"),
        Method("neuron-act", "forward", "neuron", "mean |activation| of each MLP neuron"),
        Method("neuron-wanda", "forward", "neuron", "||W_down[:, j]||_1 * ||X_j||_2 (Wanda, per neuron)"),
        Method("layer-bi", "forward", "layer", "block influence: 1 - mean cos(h_in, h_out) (ShortGPT)"),
        Method("head-ablate", "ablate", "head", "exact mean-loss increase when one head is removed (slow)"),
        Method("layer-ablate", "ablate", "layer", "exact mean-loss increase when one layer is removed (slow)"),
        Method("sv", "weights", "linear", "singular values of each decoder Linear weight"),
        Method("sv-act", "forward", "linear", "singular values of W scaled by per-input-channel activation RMS"),
        Method("sv-grad", "grad", "linear", "dL/d sigma_i = u_i^T (dL/dW) v_i over all calibration tokens"),
        Method("head-magnitude", "weights", "head", "L2 norm of a head's q rows and o columns (data-free baseline)"),
        Method("neuron-magnitude", "weights", "neuron", "L2 norm of a neuron's gate/up rows and down column"),
    )
}

# Shorthands accepted by `--method`.
ALIASES: dict[str, tuple[str, ...]] = {
    "fast": tuple(n for n, m in METHODS.items() if m.kind != "ablate"),
    "ablate": ("head-ablate", "layer-ablate"),
    "all": tuple(METHODS),
}
DEFAULT_METHODS = "fast"


def parse_methods(spec: str | Iterable[str]) -> list[Method]:
    """Parse "head-grad,neuron-taylor" (or a list; aliases fast/ablate/all; underscores accepted).

    Returns:
        The methods in registry order, without duplicates.

    Raises:
        UserError: unknown method name (the message lists the known ones).
    """
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    wanted: set[str] = set()
    for raw in names:
        name = raw.strip().lower().replace("_", "-")
        if not name:
            continue
        if name in ALIASES:
            wanted.update(ALIASES[name])
        elif name in METHODS:
            wanted.add(name)
        else:
            known = ", ".join([*METHODS, *ALIASES])
            raise UserError(f"unknown scoring method {raw.strip()!r}; known: {known}")
    if not wanted:
        raise UserError("no scoring method given: pass --method, e.g. --method head-grad,neuron-taylor")
    return [m for n, m in METHODS.items() if n in wanted]


def metric_names(methods: Iterable[Method]) -> set[str]:
    """The metric names a list of methods writes."""
    return {m.metric for m in methods}
