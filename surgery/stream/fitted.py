"""Which tensors the data-driven steps (reconstruct, whitened / asvd low rank) compute, without torch: what
`surgery.reconstruct.fit_layer` fits (`refit_readers`, `data_rank_modules`), what the streaming apply spills
(`spill_groups`, surgery.stream.datasteps) and what `apply --dry-run` marks as fitted (surgery.stream.dry, which
never imports torch): one definition for all three.
"""

from __future__ import annotations

from surgery.plan import DATA_RANK_METHODS
from surgery.resolve import LayerCut, Resolution
from surgery.stream.files import StreamPlan, file_order
from surgery.stream.reads import NotStreamable, TensorRead


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


def spill_groups(splan: StreamPlan, resolution: Resolution) -> dict[int, list[TensorRead]]:
    """{output layer position: the reads whose bytes the fit computes there, in the order a file holds them}.

    Raises:
        NotStreamable: A fitted module has no tensor in the output (the structural plan and the fit disagree).
    """
    reads = {t.name: t for shard in splan.shards for t in shard.tensors}
    groups: dict[int, list[TensorRead]] = {}
    for position, prefixes in fitted_prefixes(resolution).items():
        for prefix, module in prefixes.items():
            found = [t for name, t in reads.items() if name.startswith(prefix) and t.nbytes]  # not placeholders
            if not found:
                raise NotStreamable(f"{module}: fitted on calibration text, but the output has no tensor for it")
            groups.setdefault(position, []).extend(found)
    return {position: file_order(group) for position, group in groups.items()}


__all__ = ["data_rank_modules", "fitted_modules", "fitted_prefixes", "refit_readers", "spill_groups"]
