"""What an export did to fit its runtime: never a silent change.

Every exporter returns an `ExportReport`. Each `Adjustment` is one thing the target runtime could not express as
it was (per-layer query heads for vLLM, an MLP width off a grid, low-rank factors densified, ...) with what making
it fit cost in parameters and in FLOPs per token. An exporter that cannot make a shape fit exactly raises
`UserError` instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Adjustment:
    """One change the runtime's format forced, and its cost (0 when exact and free, e.g. a renamed tensor)."""

    what: str  # one line, e.g. "layer 3: 5 query heads padded to 6 with zero heads (exact)"
    params_added: int = 0
    flops_added: int = 0  # per token, forward (2 * multiply-adds)


@dataclass
class ExportReport:
    """The result of one export."""

    target: str  # "gguf" | "vllm"
    out: Path
    architecture: str  # e.g. "llama" / "deci" (GGUF), "DeciLMForCausalLM" (vLLM)
    dtype: str
    params: int  # parameters as served (tied embedding counted once), after any padding
    file_bytes: int  # bytes written
    serve_command: str  # how to run it, e.g. "llama-cli -m OUT" or "vllm serve OUT --trust-remote-code"
    adjustments: list[Adjustment] = field(default_factory=list)

    @property
    def params_added(self) -> int:
        return sum(a.params_added for a in self.adjustments)

    @property
    def flops_added(self) -> int:
        return sum(a.flops_added for a in self.adjustments)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        d["params_added"] = self.params_added
        d["flops_added"] = self.flops_added
        return d
