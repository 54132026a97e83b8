"""DeciLM / `nemotron-nas` configuration class, shipped inside every vLLM export as `configuration_decilm.py`.

Why it exists: transformers has no config class for `model_type: "nemotron-nas"`, and vLLM's `DeciLMForCausalLM`
reads `block_configs` as objects (`block.attention.no_op`, `block.ffn.ffn_mult`), not as the dicts config.json
holds. The export's `auto_map` points `AutoConfig` here (hence `--trust-remote-code`). Self-contained (imports only
transformers) and written to load under transformers 4.x and 5.x alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from transformers import LlamaConfig


@dataclass
class AttentionConfig:
    """One layer's attention: `no_op` (no attention at all) or GQA with `n_heads_in_group` query heads per KV head."""

    no_op: bool = False
    replace_with_linear: bool = False
    n_heads_in_group: Optional[int] = None


@dataclass
class FFNConfig:
    """One layer's MLP: `no_op` or a gated MLP of width find_multiple(int(2 * ffn_mult * hidden / 3), 256)."""

    no_op: bool = False
    replace_with_linear: bool = False
    ffn_mult: Optional[float] = None


@dataclass
class BlockConfig:
    attention: AttentionConfig
    ffn: FFNConfig

    @classmethod
    def from_dict(cls, data: dict) -> "BlockConfig":
        return cls(AttentionConfig(**data.get("attention", {})), FFNConfig(**data.get("ffn", {})))


class DeciLMConfig(LlamaConfig):
    """LlamaConfig plus per-layer `block_configs` (one `BlockConfig` per decoder layer)."""

    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        super().__init__(**kwargs)
        self.block_configs = [
            BlockConfig.from_dict(b) if isinstance(b, dict) else b for b in (block_configs or [])
        ]

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["block_configs"] = [b if isinstance(b, dict) else asdict(b) for b in self.block_configs]
        return d
