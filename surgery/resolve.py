"""Plan + model shapes -> what each original layer keeps, with every problem found at once.

Validation changes nothing. It folds all steps into one final state per layer (so steps may come in any order and
several steps may touch one layer), then checks the rules on that final state: index ranges, the GQA rule, empty
layers, ranks. Each problem names the step and field, e.g.
`steps[3].heads: head 12 out of range (layer 5 has 9 query heads)`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from surgery.errors import PlanError
from surgery.indices import Indices
from surgery.plan import (
    ASVD_ALPHA,
    DATA_RANK_METHODS,
    Calibration,
    DropAttention,
    DropLayers,
    DropMLP,
    LowRank,
    Plan,
    PruneExperts,
    PruneHeads,
    PruneHidden,
    PruneKVGroups,
    PruneNeurons,
    Reconstruct,
)
from surgery.shapes import LayerShape, ModelShape


@dataclass
class LayerCut:
    """What a plan removes from one original layer."""

    index: int
    shape: LayerShape
    attn_name: str = "self_attn"  # the attention attribute of a decoder layer (low_rank keys start with it)
    dropped: bool = False
    drop_attention: bool = False
    drop_mlp: bool = False
    heads: set[int] = field(default_factory=set)  # removed query heads (groups expanded)
    # removed MLP neurons, ascending and unique: an int64 array, not a set (a 70B plan removes 5,734 of 28,672 in
    # each of 80 layers: ~3.7 MB so, ~30 MB as sets of Python ints)
    neurons: Indices = field(default_factory=Indices)
    low_rank: dict[str, int] = field(default_factory=dict)  # layer-relative path "mlp.down_proj" -> rank
    head_steps: list[str] = field(default_factory=list)  # "steps[3].heads", for blame
    neuron_steps: list[str] = field(default_factory=list)
    low_rank_steps: dict[str, int] = field(default_factory=dict)
    low_rank_method: dict[str, str] = field(default_factory=dict)  # "mlp.down_proj" -> "svd" | "whitened" | "asvd"
    low_rank_alpha: dict[str, float] = field(default_factory=dict)  # asvd's exponent, per factorised Linear
    refit: set[str] = field(default_factory=set)  # "attn" (o_proj) and/or "mlp" (down_proj): see Reconstruct
    num_experts: int = 0  # experts of this layer's MoE block (0: dense)
    experts: set[int] = field(default_factory=set)  # removed experts
    expert_steps: list[str] = field(default_factory=list)

    @property
    def kept_experts(self) -> list[int]:
        return [e for e in range(self.num_experts) if e not in self.experts]

    @property
    def kept_heads(self) -> list[int]:
        return [h for h in range(self.shape.heads) if h not in self.heads]

    @property
    def kept_groups(self) -> list[int]:
        g = self.shape.group_size
        return sorted({h // g for h in self.kept_heads}) if g else []

    @property
    def kept_neurons(self) -> list[int]:
        kept: list[int] = []
        start = 0
        for i in self.neurons:  # ascending: the kept ones are the runs between
            kept.extend(range(start, i))
            start = i + 1
        kept.extend(range(start, self.shape.mlp))
        return kept

    @property
    def n_kept_neurons(self) -> int:
        return self.shape.mlp - len(self.neurons)

    @property
    def attention_kept(self) -> bool:
        return self.shape.has_attention and not self.drop_attention

    @property
    def mlp_kept(self) -> bool:
        return self.shape.has_mlp and not self.drop_mlp

    def result_shape(self) -> LayerShape:
        """The layer's shape after the cut."""
        heads = len(self.kept_heads) if self.attention_kept else 0
        kv = len(self.kept_groups) if self.attention_kept else 0
        mlp = self.n_kept_neurons if self.mlp_kept else 0
        low_rank = {m: r for m, r in self.low_rank.items() if self._module_kept(m)}
        src = self.shape.source_layer if self.shape.source_layer is not None else self.index
        return LayerShape(heads, kv, self.shape.head_dim, mlp, {**self.shape.low_rank, **low_rank}, src)

    def _module_kept(self, rel: str) -> bool:
        in_attention = rel.split(".")[0] == self.attn_name
        return self.attention_kept if in_attention else self.mlp_kept

    @property
    def changed(self) -> bool:
        return self.dropped or self.drop_attention or self.drop_mlp or bool(
            self.heads or self.neurons or self.low_rank or self.experts)


@dataclass
class Resolution:
    """The validated, order-independent meaning of a plan for one model."""

    shape: ModelShape
    layers: list[LayerCut]
    warnings: list[str]
    reconstruct: Reconstruct | None = None
    calibration: Calibration | None = None
    hidden_removed: list[int] = field(default_factory=list)  # original residual-stream channels (prune_hidden)
    rescale_norms: bool = True

    @property
    def kept_channels(self) -> list[int]:
        removed = set(self.hidden_removed)
        return [c for c in range(self.shape.hidden) if c not in removed]

    @property
    def result_hidden(self) -> int:
        return self.shape.hidden - len(self.hidden_removed)

    @property
    def needs_data(self) -> bool:
        """True when a step is computed from calibration text (reconstruct, whitened / asvd low_rank)."""
        return any(c.refit or set(DATA_RANK_METHODS) & set(c.low_rank_method.values()) for c in self.kept_layers)

    @property
    def kept_layers(self) -> list[LayerCut]:
        return [c for c in self.layers if not c.dropped]

    @property
    def result_experts(self) -> list[int]:
        """Experts each kept layer keeps (0: a dense or removed MLP); [] for a dense family."""
        if not self.shape.experts:
            return []
        return [len(c.kept_experts) if c.num_experts and c.mlp_kept else 0 for c in self.kept_layers]

    def result_shapes(self) -> list[LayerShape]:
        """Shapes of the layers that remain, in order."""
        return [c.result_shape() for c in self.kept_layers]


_SHOWN_PER_LIST = 20  # bad values named per index list; the rest are counted (a list may hold millions)


def _check_indices(where: str, values: list[int], limit: int, what: str, layer: int | None,
                   problems: list[str]) -> bool:
    # Each bad value once, in the order of first appearance: `[5] * 10_000_000` is one problem, not ten million.
    counts = Counter(values)
    bad = [v for v in counts if v >= limit]
    repeated = [v for v, n in counts.items() if n > 1 and v < limit]
    scope = "the model has" if layer is None else f"layer {layer} has"
    for v in bad[:_SHOWN_PER_LIST]:
        problems.append(f"{where}: {what} {v} out of range ({scope} {limit} {what}s)")
    if len(bad) > _SHOWN_PER_LIST:
        problems.append(f"{where}: {len(bad) - _SHOWN_PER_LIST} more {what}s out of range")
    for v in repeated[:_SHOWN_PER_LIST]:
        n = counts[v]
        problems.append(f"{where}: {what} {v} listed {'twice' if n == 2 else f'{n:,} times'}")
    if len(repeated) > _SHOWN_PER_LIST:
        problems.append(f"{where}: {len(repeated) - _SHOWN_PER_LIST} more {what}s listed more than once")
    return not bad and not repeated


def _parse_module(path: str, shape: ModelShape) -> tuple[int, str, str] | None:
    """`model.layers.5.mlp.down_proj` -> (5, "mlp", "down_proj"); None if it is not a prunable Linear."""
    spec = shape.spec
    prefix = spec.layers + "."
    if not path.startswith(prefix):
        return None
    rest = path[len(prefix) :].split(".")
    if len(rest) != 3 or not rest[0].isdigit():
        return None
    layer, block, name = int(rest[0]), rest[1], rest[2]
    if block == spec.attn and name in spec.attn_linears:
        return layer, "attn", name
    if block == spec.mlp and name in spec.mlp_linears:
        return layer, "mlp", name
    return None


def linear_dims(cut: LayerCut, kind: str, name: str, shape: ModelShape, hidden: int | None = None) -> tuple[int, int]:
    """(out, in) of a layer Linear ("attn" or "mlp" `kind`) after the plan's structural cuts (`hidden`: the
    residual width after prune_hidden, default the model's)."""
    spec, hd = shape.spec, cut.shape.head_dim
    hidden = shape.hidden if hidden is None else hidden
    q, kv, width = len(cut.kept_heads) * hd, len(cut.kept_groups) * hd, cut.n_kept_neurons
    dims = {
        spec.q: (q, hidden),
        spec.k: (kv, hidden),
        spec.v: (kv, hidden),
        spec.qkv: (q + 2 * kv, hidden),
        spec.o: (hidden, q),
    }
    if kind == "mlp":
        dims = {spec.gate: (width, hidden), spec.up: (width, hidden), spec.down: (hidden, width)}
        if spec.gate_up:
            dims[spec.gate_up] = (2 * width, hidden)
    return dims[name]


def resolve_plan(plan: Plan, shape: ModelShape) -> Resolution:
    """Fold a plan onto a model's shapes; raise PlanError listing every problem, or return the Resolution."""
    problems: list[str] = []
    warnings: list[str] = []
    cuts = [LayerCut(i, s, shape.spec.attn) for i, s in enumerate(shape.layers)]
    for cut, n_experts in zip(cuts, shape.experts):
        cut.num_experts = n_experts
    n = len(cuts)
    reconstruct_at: int | None = None
    hidden_removed: set[int] = set()
    hidden_steps: list[int] = []
    rescale_norms = True
    neuron_lists: dict[int, list] = {}  # layer -> its steps' neuron lists, merged once at the end

    def layer_ok(where: str, layer: int) -> bool:
        if layer >= n:
            problems.append(f"{where}: layer {layer} out of range (the model has {n} layers)")
            return False
        return True

    for i, step in enumerate(plan.steps):
        at = f"steps[{i}]"
        if isinstance(step, PruneHeads) and layer_ok(f"{at}.layer", step.layer):
            cut = cuts[step.layer]
            if _check_indices(f"{at}.heads", step.heads, cut.shape.heads, "query head", step.layer, problems):
                cut.heads.update(step.heads)
                cut.head_steps.append(f"{at}.heads")
        elif isinstance(step, PruneKVGroups) and layer_ok(f"{at}.layer", step.layer):
            cut = cuts[step.layer]
            g = cut.shape.group_size
            if _check_indices(f"{at}.groups", step.groups, cut.shape.kv_heads, "KV group", step.layer, problems):
                cut.heads.update(h for grp in step.groups for h in range(grp * g, (grp + 1) * g))
                cut.head_steps.append(f"{at}.groups")
        elif isinstance(step, PruneNeurons) and layer_ok(f"{at}.layer", step.layer):
            cut = cuts[step.layer]
            if _check_indices(f"{at}.neurons", step.neurons, cut.shape.mlp, "neuron", step.layer, problems):
                neuron_lists.setdefault(step.layer, []).append(step.neurons)
                cut.neuron_steps.append(f"{at}.neurons")
        elif isinstance(step, DropLayers):
            _check_indices(f"{at}.layers", step.layers, n, "layer", None, problems)
            for layer in set(step.layers):
                if layer < n:
                    cuts[layer].dropped = True
        elif isinstance(step, DropAttention) and layer_ok(f"{at}.layer", step.layer):
            if not cuts[step.layer].shape.has_attention:
                problems.append(f"{at}.layer: layer {step.layer} has no attention block left to drop")
            cuts[step.layer].drop_attention = True
        elif isinstance(step, DropMLP) and layer_ok(f"{at}.layer", step.layer):
            if not cuts[step.layer].shape.has_mlp:
                problems.append(f"{at}.layer: layer {step.layer} has no MLP block left to drop")
            cuts[step.layer].drop_mlp = True
        elif isinstance(step, LowRank):
            parsed = _parse_module(step.module, shape)
            if parsed is None:
                example = f"{shape.spec.layers}.0.{shape.spec.mlp}.{shape.spec.down}"
                problems.append(f"{at}.module: {step.module!r} is not a decoder-layer Linear (e.g. {example})")
            elif layer_ok(f"{at}.module", parsed[0]):
                layer, kind, name = parsed
                rel = f"{shape.spec.attn if kind == 'attn' else shape.spec.mlp}.{name}"
                if rel in cuts[layer].low_rank or rel in cuts[layer].shape.low_rank:
                    problems.append(f"{at}.module: {step.module} is already low-rank")
                else:
                    cuts[layer].low_rank[rel] = step.rank
                    cuts[layer].low_rank_steps[rel] = i
                    cuts[layer].low_rank_method[rel] = step.method or "svd"
                    if step.method == "asvd":
                        cuts[layer].low_rank_alpha[rel] = ASVD_ALPHA if step.alpha is None else step.alpha
        elif isinstance(step, PruneExperts) and layer_ok(f"{at}.layer", step.layer):
            cut = cuts[step.layer]
            if not shape.spec.cfg_experts:
                problems.append(f"{at}: prune_experts needs a mixture-of-experts model; this {shape.spec.family} "
                                "model has no experts")
            elif not cut.num_experts:
                moe = [c.index for c in cuts if c.num_experts]
                problems.append(f"{at}.layer: layer {step.layer} has a dense MLP, no experts (MoE layers: {moe})")
            elif _check_indices(f"{at}.experts", step.experts, cut.num_experts, "expert", step.layer, problems):
                cut.experts.update(step.experts)
                cut.expert_steps.append(f"{at}.experts")
        elif isinstance(step, PruneHidden):
            hidden_steps.append(i)
            rescale_norms = rescale_norms and step.rescale_norms
            if _check_indices(f"{at}.channels", step.channels, shape.hidden, "channel", None, problems):
                hidden_removed.update(step.channels)
        elif isinstance(step, Reconstruct):
            if reconstruct_at is not None:
                problems.append(f"{at}: a plan has at most one reconstruct step (steps[{reconstruct_at}] is one)")
                continue
            reconstruct_at = i
            for layer in step.layers or []:
                layer_ok(f"{at}.layers", layer)

    for layer, lists in neuron_lists.items():
        cuts[layer].neurons = _ascending_union(lists)
    _check_layers(cuts, shape, problems, warnings)
    if shape.experts:
        _check_experts(cuts, shape, problems)
    if hidden_steps:
        _check_hidden(hidden_steps, hidden_removed, shape, plan, problems)
    _check_ranks(cuts, shape, problems, warnings, shape.hidden - len(hidden_removed))
    reconstruct = plan.steps[reconstruct_at] if reconstruct_at is not None else None
    if not problems:
        _mark_refits(cuts, shape, reconstruct, reconstruct_at, warnings)
        _check_calibration(plan.calibration, cuts, shape, reconstruct_at, problems)
    if problems:
        raise PlanError(problems)
    return Resolution(shape, cuts, warnings, reconstruct, plan.calibration, sorted(hidden_removed), rescale_norms)


def _ascending_union(lists: list) -> Indices:
    """The union of checked index lists (each unique), ascending; one list already ascending is kept as it is."""
    if len(lists) == 1 and isinstance(lists[0], Indices) and all(a < b for a, b in zip(lists[0], lists[0][1:])):
        return lists[0]
    return Indices(sorted(set().union(*lists)))


def _check_experts(cuts: list[LayerCut], shape: ModelShape, problems: list[str]) -> None:
    """Kept experts >= the router's top-k; no dense-MLP cuts on MoE layers. Layers may keep different expert counts
    (the output then lists them in surgery_layers and loads with surgery.load)."""
    moe = [c for c in cuts if c.num_experts and not c.dropped and c.mlp_kept]
    if any(c.dropped for c in cuts) and any(not c.num_experts for c in cuts):
        # the config places dense layers by index (mlp_only_layers, decoder_sparse_step), which is not renumbered
        problems.append("steps: drop_layers is not supported yet on MoE models with dense-MLP layers")
    for cut in moe:
        if cut.neurons or any(rel.split(".")[0] == shape.spec.mlp for rel in cut.low_rank):
            blame = (cut.neuron_steps or [f"steps[{i}]" for i in cut.low_rank_steps.values()])[-1]
            problems.append(f"{blame}: layer {cut.index} is a mixture-of-experts block; its experts are removed "
                            "with prune_experts (neuron and low_rank cuts inside experts are not supported)")
        if cut.experts and len(cut.kept_experts) < shape.top_k:
            problems.append(
                f"{cut.expert_steps[-1]}: layer {cut.index} would keep {len(cut.kept_experts)} of {cut.num_experts} "
                f"experts, fewer than the router's top-k ({shape.top_k}): remove at most "
                f"{cut.num_experts - shape.top_k}")


def _check_hidden(steps: list[int], removed: set[int], shape: ModelShape, plan: Plan, problems: list[str]) -> None:
    """prune_hidden: a family that implements it, channels left, a size the family's config can express."""
    at, spec, hidden = f"steps[{steps[-1]}].channels", shape.spec, shape.hidden
    if not spec.hidden_prunable:
        problems.append(f"steps[{steps[-1]}]: prune_hidden is not supported for {spec.family} models "
                        "(supported: llama, qwen2, qwen3)")
        return
    if len(removed) >= hidden:
        problems.append(f"{at}: removes every one of the model's {hidden} channels; keep at least one")
        return
    if any(s.op == "reconstruct" or getattr(s, "method", None) in DATA_RANK_METHODS for s in plan.steps):
        problems.append(f"steps[{steps[-1]}]: prune_hidden cannot be combined with reconstruct or whitened/asvd "
                        "low_rank yet (they run layer by layer on the unpruned residual stream)")
    kept = hidden - len(removed)
    # The base head count is what a config with surgery_layers writes, so it must divide the new width; uniform
    # head cuts that do not divide it fall back to surgery_layers (rewrite_config checks plain loadability).
    if spec.hidden_divisible_by_heads and kept % shape.base_heads:
        step = shape.base_heads
        legal = [s for s in (kept - kept % step, kept - kept % step + step) if 0 < s < hidden]
        offer = ", ".join(f"{s} (remove {hidden - s} channels)" for s in legal)
        problems.append(f"{at}: hidden size {kept} ({hidden} - {len(removed)}) cannot be expressed: the {spec.family} "
                        f"config needs num_attention_heads ({shape.base_heads}) to divide hidden_size; nearest legal "
                        f"sizes: {offer}")


def _mark_refits(cuts: list[LayerCut], shape: ModelShape, step: Reconstruct | None, at: int | None,
                 warnings: list[str]) -> None:
    """Set `LayerCut.refit`: every layer that lost heads / neurons, or the layers the step names."""
    if step is None:
        return
    spec, chosen = shape.spec, set(step.layers or [])
    for cut in cuts:
        if cut.dropped or (chosen and cut.index not in chosen):
            continue
        for kind, kept, cut_any, reader in (("attn", cut.attention_kept, cut.heads, f"{spec.attn}.{spec.o}"),
                                             ("mlp", cut.mlp_kept, cut.neurons, f"{spec.mlp}.{spec.down}")):
            if not kept or not (cut_any or chosen):
                continue
            if reader in cut.low_rank or reader in cut.shape.low_rank:
                # the refit solves for a dense matrix; a factorised one keeps its factors
                warnings.append(f"steps[{at}]: layer {cut.index} {reader} is low-rank; not refit")
                continue
            cut.refit.add(kind)
    if not any(c.refit for c in cuts):
        warnings.append(f"steps[{at}]: no layer loses heads or neurons, so reconstruct refits nothing")


def data_inputs(cut: LayerCut, shape: ModelShape) -> dict[str, int]:
    """Input width of every Linear of `cut` that a Gram-matrix step fits (refit readers, whitened low rank; asvd
    needs only per-channel means, no full-rank Gram)."""
    spec, widths = shape.spec, {}
    for kind, name, block in (("attn", spec.o, spec.attn), ("mlp", spec.down, spec.mlp)):
        if kind in cut.refit:
            widths[f"{block}.{name}"] = linear_dims(cut, kind, name, shape)[1]
    for rel, method in cut.low_rank_method.items():
        block, name = rel.split(".")
        if method == "whitened" and cut._module_kept(rel) and not cut.dropped:
            widths[rel] = linear_dims(cut, "attn" if block == spec.attn else "mlp", name, shape)[1]
    return widths


def _check_calibration(cal: Calibration | None, cuts: list[LayerCut], shape: ModelShape, reconstruct_at: int | None,
                       problems: list[str]) -> None:
    """Data-driven steps need the plan's calibration block, with enough tokens for full-rank Gram matrices."""
    needs = [(cut, rel, width) for cut in cuts for rel, width in data_inputs(cut, shape).items()]
    data_ranks = [i for c in cuts for rel, i in c.low_rank_steps.items()
                  if c.low_rank_method.get(rel) in DATA_RANK_METHODS and c._module_kept(rel) and not c.dropped]
    if not needs and not data_ranks:
        return
    if cal is None:
        first = reconstruct_at if reconstruct_at is not None and any(c.refit for c in cuts) else min(data_ranks)
        problems.append(f"steps[{first}]: needs calibration data: the plan has no `calibration` block "
                        "(plan suggest --data FILE writes one)")
        return
    if not needs:
        return
    cut, rel, width = max(needs, key=lambda n: n[2])
    have = cal.tokens // cal.seq_len * cal.seq_len
    if have < width + 1:
        problems.append(
            f"calibration.tokens: {have} tokens give rank-deficient Gram matrices (layer {cut.index} {rel} has "
            f"{width} inputs): need at least {width + 1} tokens, i.e. {-(-(width + 1) // cal.seq_len)} blocks of "
            f"{cal.seq_len}"
        )


def _check_layers(cuts: list[LayerCut], shape: ModelShape, problems: list[str], warnings: list[str]) -> None:
    if cuts and all(c.dropped for c in cuts):
        problems.append("steps: the plan drops every layer of the model")
    for cut in cuts:
        s = cut.shape
        blame = cut.head_steps[-1] if cut.head_steps else f"layer {cut.index}"
        if cut.dropped and (cut.heads or cut.neurons or cut.drop_attention or cut.drop_mlp or cut.low_rank):
            warnings.append(f"layer {cut.index}: dropped, so its other cuts have no effect")
        if cut.drop_attention and cut.heads:
            warnings.append(f"layer {cut.index}: attention dropped, so its head cuts have no effect")
        if cut.drop_mlp and cut.neurons:
            warnings.append(f"layer {cut.index}: MLP dropped, so its neuron cuts have no effect")
        if cut.attention_kept and cut.heads and not cut.dropped:  # a dropped layer's cuts: the warning above
            if not cut.kept_heads:
                problems.append(
                    f"{blame}: removes every query head of layer {cut.index}; use drop_attention instead"
                )
            else:
                _check_gqa(cut, blame, problems)
        if cut.mlp_kept and cut.neurons and not cut.n_kept_neurons and not cut.dropped:
            problems.append(
                f"{cut.neuron_steps[-1]}: removes every MLP neuron of layer {cut.index}; use drop_mlp instead"
            )
    if shape.scale_depends_on_layer_index and any(c.dropped for c in cuts):
        # GPT-2's scale_attn_by_inverse_layer_idx: renumbered layers would get other attention scales
        problems.append("steps: drop_layers is not supported with scale_attn_by_inverse_layer_idx")


def _check_gqa(cut: LayerCut, blame: str, problems: list[str]) -> None:
    """Every KV group that keeps any query head must keep the same number of them."""
    g = cut.shape.group_size
    kept_per_group = {grp: 0 for grp in range(cut.shape.kv_heads)}
    for h in cut.kept_heads:
        kept_per_group[h // g] += 1
    counts = {grp: k for grp, k in kept_per_group.items() if k > 0}
    if len(set(counts.values())) <= 1:
        return
    detail = ", ".join(f"group {grp} keeps {k}" for grp, k in counts.items())
    target = min(counts.values())
    fixes = ", ".join(f"{k - target} more from group {grp}" for grp, k in counts.items() if k > target)
    problems.append(
        f"{blame}: layer {cut.index} breaks the GQA rule ({detail} of {g} query heads); every kept KV group must "
        f"keep the same number: remove {fixes}, or remove whole groups with prune_kv_groups"
    )


def _check_ranks(cuts: list[LayerCut], shape: ModelShape, problems: list[str], warnings: list[str],
                 hidden: int | None = None) -> None:
    for cut in cuts:
        for rel, rank in cut.low_rank.items():
            at = f"steps[{cut.low_rank_steps[rel]}].rank"
            if not cut._module_kept(rel) or cut.dropped:
                warnings.append(f"{at}: layer {cut.index} {rel} is removed by another step; low_rank ignored")
                continue
            block, name = rel.split(".")
            out_f, in_f = linear_dims(cut, "attn" if block == shape.spec.attn else "mlp", name, shape, hidden)
            if rank > min(out_f, in_f):
                problems.append(
                    f"{at}: rank {rank} exceeds min(out, in) = {min(out_f, in_f)} of layer {cut.index} {name} "
                    f"({out_f} x {in_f} after the plan's cuts)"
                )
            elif rank * (out_f + in_f) >= out_f * in_f:
                warnings.append(
                    f"{at}: rank {rank} does not reduce parameters of layer {cut.index} {name} "
                    f"(break-even rank is {out_f * in_f // (out_f + in_f)})"
                )
