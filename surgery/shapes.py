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

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def config_get(cfg: dict, key: str, default=None):
    """Read a config.json field, following GPT-2 style attribute names where the spec uses them."""
    return cfg.get(key, default)


def global_sizes(cfg: dict, spec: ArchSpec) -> tuple[int, int, int, int, int]:
    """(hidden, heads, kv_heads, head_dim, mlp width) from a config dict."""
    hidden = int(config_get(cfg, spec.cfg_hidden))
    heads = int(config_get(cfg, spec.cfg_heads))
    kv_heads = int(config_get(cfg, spec.cfg_kv_heads) or heads) if spec.cfg_kv_heads else heads
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    mlp = config_get(cfg, spec.cfg_mlp)
    if mlp is None:
        mlp = (spec.cfg_mlp_default_mult or 4) * hidden
    return hidden, heads, kv_heads, head_dim, int(mlp)


def shape_from_config(cfg: dict) -> ModelShape:
    """Build the ModelShape of a config.json dict (with `surgery_layers` when present)."""
    spec = spec_for_config(cfg)
    hidden, heads, kv_heads, head_dim, mlp = global_sizes(cfg, spec)
    num_layers = int(config_get(cfg, spec.cfg_layers))
    entries = cfg.get(SURGERY_LAYERS_KEY)
    if entries:
        layers = [
            LayerShape(
                heads=int(e["heads"]),
                kv_heads=int(e["kv_heads"]),
                head_dim=head_dim,
                mlp=int(e["mlp"]),
                low_rank={k: int(v) for k, v in (e.get("low_rank") or {}).items()},
                source_layer=e.get("source_layer"),
            )
            for e in entries
        ]
        if len(layers) != num_layers:
            from surgery.errors import SourceError

            raise SourceError(
                f"config.json: {SURGERY_LAYERS_KEY} has {len(layers)} entries but {spec.cfg_layers} is {num_layers}"
            )
    else:
        layers = [LayerShape(heads, kv_heads, head_dim, mlp) for _ in range(num_layers)]
    tied = bool(cfg.get("tie_word_embeddings", spec.family == "gpt2"))
    scaled = bool(cfg.get("scale_attn_by_inverse_layer_idx", False))
    return ModelShape(spec, hidden, int(cfg["vocab_size"]), tied, layers, heads, kv_heads, mlp, scaled)
