"""Per-layer shapes of a model, read from its config.json alone (no weights).

A plain config describes uniform layers. A checkpoint written by `surgery` with per-layer differences carries
`surgery_layers` (one entry per current layer) and this module reads that too, so plans can be validated against
pruned models and pruned models can be pruned again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from surgery.arch import ArchSpec, spec_for_config

SURGERY_LAYERS_KEY = "surgery_layers"


@dataclass
class LayerShape:
    """What one decoder layer holds. `heads == 0` means the attention sub-block is gone, `mlp == 0` the MLP."""

    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    low_rank: dict[str, int] = field(default_factory=dict)  # "mlp.down_proj" -> rank
    source_layer: int | None = None  # index in the model this one was cut from, when known

    @property
    def has_attention(self) -> bool:
        return self.heads > 0

    @property
    def has_mlp(self) -> bool:
        return self.mlp > 0

    @property
    def group_size(self) -> int:
        """Query heads per KV group."""
        return self.heads // self.kv_heads if self.kv_heads else 0

    def to_entry(self) -> dict:
        """The `surgery_layers` entry for this layer (config.json)."""
        skip = [name for name, gone in (("self_attn", not self.has_attention), ("mlp", not self.has_mlp)) if gone]
        entry = {"heads": self.heads, "kv_heads": self.kv_heads, "mlp": self.mlp, "skip": skip}
        if self.low_rank:
            entry["low_rank"] = dict(sorted(self.low_rank.items()))
        if self.source_layer is not None:
            entry["source_layer"] = self.source_layer
        return entry


@dataclass
class ModelShape:
    """Shapes of every layer plus the few global numbers that parameter counting needs."""

    spec: ArchSpec
    hidden: int
    vocab: int
    tied_embeddings: bool
    layers: list[LayerShape]
    base_heads: int  # the global config's values (what plain transformers would build)
    base_kv_heads: int
    base_mlp: int
    scale_depends_on_layer_index: bool = False
    experts: list[int] = field(default_factory=list)  # experts per layer (0: dense MLP); empty for dense families
    top_k: int = 0  # experts each token is routed to (MoE families)

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def config_get(cfg: dict, key: str, default=None):
    """Read a config.json field, following GPT-2 style attribute names where the spec uses them."""
    return cfg.get(key, default)


MAX_SIZE = 2**31 - 1  # no real dimension comes close; a hostile config.json must not make us allocate it
MAX_LAYERS = 10_000  # the deepest released LMs have a few hundred layers


def size_field(value, what: str, *, minimum: int = 1, maximum: int = MAX_SIZE) -> int:
    """A size from config.json: a JSON integer (not a bool, a string or a float) in [minimum, maximum].

    Raises:
        SourceError: Anything else; the message names the field.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        from surgery.errors import SourceError

        raise SourceError(f"config.json: {what} must be an integer from {minimum} to {maximum:,} (got {value!r})")
    return value


def global_sizes(cfg: dict, spec: ArchSpec) -> tuple[int, int, int, int, int]:
    """(hidden, heads, kv_heads, head_dim, mlp width) from a config dict.

    Raises:
        SourceError: A size that is not a sane positive integer.
    """
    hidden = size_field(config_get(cfg, spec.cfg_hidden), spec.cfg_hidden)
    heads = size_field(config_get(cfg, spec.cfg_heads), spec.cfg_heads)
    kv_heads = heads
    if spec.cfg_kv_heads and config_get(cfg, spec.cfg_kv_heads) is not None:
        kv_heads = size_field(config_get(cfg, spec.cfg_kv_heads), spec.cfg_kv_heads)
    head_dim = size_field(cfg["head_dim"], "head_dim") if cfg.get("head_dim") is not None else hidden // heads
    mlp = config_get(cfg, spec.cfg_mlp)
    if mlp is None:
        mlp = (spec.cfg_mlp_default_mult or 4) * hidden
    return hidden, heads, kv_heads, head_dim, size_field(mlp, spec.cfg_mlp or "MLP width")


def shape_from_config(cfg: dict) -> ModelShape:
    """Build the ModelShape of a config.json dict (with `surgery_layers` when present)."""
    spec = spec_for_config(cfg)
    hidden, heads, kv_heads, head_dim, mlp = global_sizes(cfg, spec)
    num_layers = size_field(config_get(cfg, spec.cfg_layers), spec.cfg_layers, maximum=MAX_LAYERS)
    entries = cfg.get(SURGERY_LAYERS_KEY)
    if entries:
        from surgery.errors import SourceError

        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise SourceError(f"config.json: {SURGERY_LAYERS_KEY} must be a list of objects, one per layer")
        try:
            layers = [
                LayerShape(
                    heads=size_field(e["heads"], f"{SURGERY_LAYERS_KEY}[{i}].heads", minimum=0),
                    kv_heads=size_field(e["kv_heads"], f"{SURGERY_LAYERS_KEY}[{i}].kv_heads", minimum=0),
                    head_dim=head_dim,
                    mlp=size_field(e["mlp"], f"{SURGERY_LAYERS_KEY}[{i}].mlp", minimum=0),
                    low_rank={k: size_field(v, f"{SURGERY_LAYERS_KEY}[{i}].low_rank.{k}")
                              for k, v in (e.get("low_rank") or {}).items()},
                    source_layer=e.get("source_layer"),
                )
                for i, e in enumerate(entries)
            ]
        except (KeyError, AttributeError) as exc:
            raise SourceError(f"config.json: a {SURGERY_LAYERS_KEY} entry lacks {exc}") from None
        if len(layers) != num_layers:
            raise SourceError(
                f"config.json: {SURGERY_LAYERS_KEY} has {len(layers)} entries but {spec.cfg_layers} is {num_layers}"
            )
    else:
        layers = [LayerShape(heads, kv_heads, head_dim, mlp) for _ in range(num_layers)]
    tied = bool(cfg.get("tie_word_embeddings", spec.family == "gpt2"))
    scaled = bool(cfg.get("scale_attn_by_inverse_layer_idx", False))
    vocab = size_field(cfg.get("vocab_size"), "vocab_size")
    experts, top_k = moe_layout(cfg, spec, num_layers)
    if entries and experts:  # per-layer expert counts (surgery checkpoints) override the config's one count
        experts = [size_field(e.get("experts", n), f"{SURGERY_LAYERS_KEY}[{i}].experts", minimum=0,
                              maximum=n)
                   for i, (e, n) in enumerate(zip(entries, experts))]
    return ModelShape(spec, hidden, vocab, tied, layers, heads, kv_heads, mlp, scaled, experts, top_k)


def moe_layout(cfg: dict, spec: ArchSpec, num_layers: int) -> tuple[list[int], int]:
    """(experts per layer, 0 for a dense one; top-k) of an MoE config; ([], 0) for a dense family."""
    if not spec.cfg_experts:
        return [], 0
    n = size_field(cfg.get(spec.cfg_experts, cfg.get("num_experts")), spec.cfg_experts)
    top_k = size_field(cfg.get(spec.cfg_top_k), spec.cfg_top_k, maximum=n)
    dense = set(cfg.get("mlp_only_layers") or [])
    step = cfg.get("decoder_sparse_step") or 1  # Qwen3-MoE: layer i is sparse when (i + 1) % step == 0
    return [0 if i in dense or (i + 1) % step else n for i in range(num_layers)], top_k
