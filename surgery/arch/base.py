"""What the surgery code needs to know about one model family, as data.

Each family module (llama.py, gpt2.py, ...) builds one `ArchSpec`. Nothing else in `surgery/` looks at class
names or probes modules with `hasattr`: ops, inspect and export read these tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ArchSpec:
    """Where the prunable parts of a decoder-only family live and how they are laid out.

    Module names are relative: `layers` to the top-level model, `attn` / `mlp` to one decoder layer, the
    projection names to the attention or MLP module.

    Attributes:
        family: short name shown to users ("llama").
        model_types: `config.model_type` values this spec handles.
        layers: dotted path of the decoder-layer ModuleList in the *ForCausalLM model.
        attn, mlp: attribute names of the two sub-blocks inside a decoder layer.
        q, k, v, o: separate attention projections (None when fused).
        qkv: fused q/k/v projection, rows laid out [q heads | k heads | v heads] (Phi-3, GPT-2).
        gate, up, down: gated-MLP projections; for a plain MLP `up` is fc_in and `down` is fc_out.
        gate_up: fused gate/up projection, rows laid out [gate | up] (Phi-3).
        conv1d: weights are GPT-2 `Conv1D`, stored (in, out) instead of nn.Linear's (out, in).
        attn_norms / mlp_norms: per-layer norms that only feed (or only post-process) one sub-block; they are
            removed together with it.
        cfg_heads, cfg_kv_heads, cfg_mlp, cfg_layers, cfg_hidden: config field names.
        cfg_mlp_default_mult: when `cfg_mlp` is None in the config (GPT-2's n_inner), width = mult * hidden.
        embed, final_norm, lm_head: top-level module paths (for inspect and parameter accounting).
        per_module_config: the attention forward reads head counts from `self.config` (Phi-3), so a pruned
            layer needs its own config copy.
        hidden_prunable: `prune_hidden` is implemented for this layout (plain embedding, RMSNorms, separate
            q/k/v and gate/up Linears).
        cfg_experts: config field with the number of experts per MoE layer (None: a dense family); `experts` and
            `router` are the expert and router modules inside the MLP, `cfg_top_k` the experts each token uses.
        hidden_divisible_by_heads: the config class refuses a hidden size that num_attention_heads does not divide,
            even with an explicit head_dim (LlamaConfig: KNOWN_TRAPS 2).
    """

    family: str
    model_types: tuple[str, ...]
    layers: str
    attn: str
    mlp: str
    o: str
    down: str
    up: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    gate: str | None = None
    gate_up: str | None = None
    conv1d: bool = False
    attn_norms: tuple[str, ...] = ()
    mlp_norms: tuple[str, ...] = ()
    cfg_heads: str = "num_attention_heads"
    cfg_kv_heads: str | None = "num_key_value_heads"
    cfg_mlp: str = "intermediate_size"
    cfg_layers: str = "num_hidden_layers"
    cfg_hidden: str = "hidden_size"
    cfg_mlp_default_mult: int | None = None
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    per_module_config: bool = False
    hidden_prunable: bool = False
    hidden_divisible_by_heads: bool = False
    cfg_experts: str | None = None
    cfg_top_k: str = "num_experts_per_tok"
    experts: str = "experts"
    router: str = "gate"
    moe_on_disk: str | None = None  # the MoE block's name in checkpoints when it differs from `mlp` (Mixtral)
    expert_linears: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # one expert's Linears on disk
    # attention attributes that hold counts and must follow the pruned shapes, by meaning
    attn_count_attrs: dict[str, str] = field(default_factory=dict)

    @property
    def attn_linears(self) -> tuple[str, ...]:
        """Every Linear of the attention block, in a stable order."""
        names = (self.qkv,) if self.qkv else (self.q, self.k, self.v)
        return tuple(n for n in (*names, self.o) if n)

    @property
    def mlp_linears(self) -> tuple[str, ...]:
        """Every Linear of the MLP block, in a stable order."""
        names = (self.gate_up,) if self.gate_up else (self.gate, self.up)
        return tuple(n for n in (*names, self.down) if n)

    def layer_prefix(self, index: int) -> str:
        """HF module path of decoder layer `index` ("model.layers.3")."""
        return f"{self.layers}.{index}"
