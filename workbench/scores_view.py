"""Read access to a score file's tensors by the naming contract `<module path>/<metric>` (UI-side helper)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from surgery.arch.base import ArchSpec

HEAD_METRICS = ("head_grad", "head_taylor", "head_act", "head_ablate")
NEURON_METRICS = ("neuron_taylor", "neuron_wanda", "neuron_act")
LAYER_METRICS = ("layer_bi", "layer_ablate")


@dataclass
class ScoreView:
    """Scores of one model, keyed by tensor name; every accessor returns a list of floats or None."""

    tensors: dict[str, list[float]]
    spec: ArchSpec
    source: str = ""

    @classmethod
    def from_file(cls, path: str | Path, spec: ArchSpec) -> ScoreView:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k).float().flatten().tolist() for k in f.keys()}
        return cls(tensors, spec, str(path))

    @classmethod
    def from_tensors(cls, tensors: dict, spec: ArchSpec, source: str = "") -> ScoreView:
        return cls({k: v.float().flatten().tolist() for k, v in tensors.items()}, spec, source)

    def metrics(self) -> list[str]:
        return sorted({k.rsplit("/", 1)[1] for k in self.tensors})

    def head(self, layer: int, metric: str) -> list[float] | None:
        return self.tensors.get(f"{self.spec.layers}.{layer}.{self.spec.attn}/{metric}")

    def neuron(self, layer: int, metric: str) -> list[float] | None:
        return self.tensors.get(f"{self.spec.layers}.{layer}.{self.spec.mlp}/{metric}")

    def layer(self, metric: str) -> list[float] | None:
        base = self.spec.layers.rsplit(".", 1)[0] if "." in self.spec.layers else self.spec.layers
        return self.tensors.get(f"{base}/{metric}")

    def spectrum(self, layer: int, rel: str, metric: str = "sv") -> list[float] | None:
        return self.tensors.get(f"{self.spec.layers}.{layer}.{rel}/{metric}")

    def first_available(self, candidates: tuple[str, ...]) -> str | None:
        have = set(self.metrics())
        return next((m for m in candidates if m in have), None)
