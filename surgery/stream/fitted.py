"""Which tensors the data-driven steps (reconstruct, whitened / asvd low rank) compute, without torch: what
`surgery.reconstruct.fit_layer` fits (`refit_readers`, `data_rank_modules`), what the streaming apply spills
(surgery.stream.datasteps) and what `apply --dry-run` marks as fitted (surgery.stream.dry, which never imports
torch): one definition for all three.
"""

from __future__ import annotations

from surgery.plan import DATA_RANK_METHODS
from surgery.resolve import LayerCut, Resolution


def refit_readers(cut: LayerCut, spec) -> dict[str, str]:
    """kind ("attn" / "mlp") -> layer-relative path of the projection a refit of that kind solves for."""
    paths = {"attn": f"{spec.attn}.{spec.o}", "mlp": f"{spec.mlp}.{spec.down}"}
    return {kind: paths[kind] for kind in ("attn", "mlp") if kind in cut.refit}


def data_rank_modules(cut: LayerCut) -> list[str]:
    """Layer-relative paths (sorted) of the layer's kept Linears with a data-driven (whitened / asvd) low rank."""
    if cut.dropped:
        return []
    return sorted(rel for rel, m in cut.low_rank_method.items() if m in DATA_RANK_METHODS and cut._module_kept(rel))


def fitted_modules(cut: LayerCut, spec) -> list[str]:
    """Layer-relative paths of the modules whose tensors the data steps compute in this layer (the refit readers,
    the whitened / asvd factorised Linears); every other tensor of the layer is a plain cut of a stored one."""
    if cut.dropped:
        return []
    return sorted(set(refit_readers(cut, spec).values()) | set(data_rank_modules(cut)))


def fitted_prefixes(resolution: Resolution) -> dict[int, dict[str, str]]:
    """{output layer position: {name prefix of a fitted module's output tensors: the input layer's module path}}
    for every kept layer with a data step (the prefixes end with "."; the placeholder tensors of surgery modules
    share them, with 0 bytes)."""
    spec = resolution.shape.spec
    out: dict[int, dict[str, str]] = {}
    for position, cut in enumerate(resolution.kept_layers):
        for rel in fitted_modules(cut, spec):
            out.setdefault(position, {})[f"{spec.layers}.{position}.{rel}."] = f"{spec.layer_prefix(cut.index)}.{rel}"
    return out


__all__ = ["data_rank_modules", "fitted_modules", "fitted_prefixes", "refit_readers"]
