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
        target: what is scored: "head", "kv_group", "neuron", "layer", "linear", "channel" (residual-stream
            channels, what prune_hidden cuts) or "expert" (MoE experts, what prune_experts cuts).
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
        Method("layer-grad", "grad", "layer",
               "sum over batches of |dL/d gate|, the gate scaling the layer's residual update h_out - h_in"),
        Method("head-ablate", "ablate", "head", "exact mean-loss increase when one head is removed (slow)"),
        Method("layer-ablate", "ablate", "layer", "exact mean-loss increase when one layer is removed (slow)"),
        Method("sv", "weights", "linear", "singular values of each decoder Linear weight"),
        Method("sv-act", "forward", "linear", "singular values of W scaled by per-input-channel activation RMS"),
        Method("sv-grad", "grad", "linear", "dL/d sigma_i = u_i^T (dL/dW) v_i over all calibration tokens"),
        Method("head-magnitude", "weights", "head", "L2 norm of a head's q rows and o columns (data-free baseline)"),
        Method("neuron-magnitude", "weights", "neuron", "L2 norm of a neuron's gate/up rows and down column"),
        Method("channel-norm", "forward", "channel", "sum over hidden-size norms of mean |norm output| (Minitron)"),
        Method("channel-taylor", "grad", "channel",
               "sum over batches of |sum over tokens of h_c * dL/dh_c| over the embedding and every residual write"),
        Method("expert-freq", "forward", "expert", "fraction of tokens whose router top-k holds the expert"),
        Method("expert-reap", "forward", "expert", "mean over routed tokens of gate weight x ||expert output|| (REAP)"),
        Method("expert-grad", "grad", "expert", "sum over batches of |dL/d g_e|, g_e a gate on expert e's output"),
    )
}

# Shorthands accepted by `--method`.
ALIASES: dict[str, tuple[str, ...]] = {
    "fast": tuple(n for n, m in METHODS.items() if m.kind != "ablate"),
    "ablate": ("head-ablate", "layer-ablate"),
    "all": tuple(METHODS),
}
DEFAULT_METHODS = "fast"


def _hidden_families() -> str:
    from surgery.arch import FAMILIES

    return ", ".join(t for spec in FAMILIES if spec.hidden_prunable for t in spec.model_types)


def unavailable(method: Method, arch) -> str | None:
    """Why `method` cannot score a model of family `arch` (an ArchSpec), or None when it can: channel methods
    need a family prune_hidden cuts, expert methods a mixture-of-experts family."""
    if method.target == "channel" and not arch.hidden_prunable:
        return (f"{method.name} scores residual channels, which prune_hidden cannot cut in {arch.family} models "
                f"(it cuts {_hidden_families()})")
    if method.target == "expert" and not arch.cfg_experts:
        return f"{method.name} scores experts, and this {arch.family} model has none (mixture-of-experts only)"
    return None


def parse_methods(spec: str | Iterable[str], arch=None) -> list[Method]:
    """Parse "head-grad,neuron-taylor" (or a list; aliases fast/ablate/all; underscores accepted).

    Args:
        arch: the model's ArchSpec, when known. Methods an alias brings that do not apply to it (channel methods
            on a family prune_hidden cannot cut, expert methods on a dense model) are left out; a method named
            explicitly that does not apply is an error.

    Returns:
        The methods in registry order, without duplicates.

    Raises:
        UserError: unknown method name (the message lists the known ones), or a named method the model lacks the
            axis for (the message lists the methods it has).
    """
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    wanted: set[str] = set()
    explicit: set[str] = set()
    for raw in names:
        name = raw.strip().lower().replace("_", "-")
        if not name:
            continue
        if name in ALIASES:
            wanted.update(ALIASES[name])
        elif name in METHODS:
            wanted.add(name)
            explicit.add(name)
        else:
            known = ", ".join([*METHODS, *ALIASES])
            raise UserError(f"unknown scoring method {raw.strip()!r}; known: {known}")
    if not wanted:
        raise UserError("no scoring method given: pass --method, e.g. --method head-grad,neuron-taylor")
    if arch is not None:
        check_applicable([METHODS[n] for n in explicit], arch)
        wanted = {n for n in wanted if unavailable(METHODS[n], arch) is None}
    return [m for n, m in METHODS.items() if n in wanted]


def check_applicable(methods: Iterable[Method], arch) -> None:
    """Raise UserError (one line, listing the methods this family has) for the first method it cannot use."""
    for method in methods:
        reason = unavailable(method, arch)
        if reason:
            legal = ", ".join(n for n, m in METHODS.items() if unavailable(m, arch) is None)
            raise UserError(f"--method {reason}; methods for this model: {legal}")


def metric_names(methods: Iterable[Method]) -> set[str]:
    """The metric names a list of methods writes."""
    return {m.metric for m in methods}
