"""Read access to a score file's tensors by the naming contract `<module path>/<metric>` (UI-side helper)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from surgery.arch.base import ArchSpec

HEAD_METRICS = ("head_grad", "head_taylor", "head_act", "head_ablate")
NEURON_METRICS = ("neuron_taylor", "neuron_wanda", "neuron_act")
LAYER_METRICS = ("layer_bi", "layer_ablate")
# residual channels under the model module ("model/channel_norm", shape (hidden,)); experts under each MoE block
# ("model.layers.3.mlp/expert_reap", shape (num_experts,)): the names `workbench score` writes
CHANNEL_METRICS = ("channel_norm", "channel_taylor")
EXPERT_METRICS = ("expert_reap", "expert_freq", "expert_grad")


def model_base(spec: ArchSpec) -> str:
    """The module whole-model scores are stored under ("model" for Llama, "transformer" for GPT-2)."""
    return spec.layers.rsplit(".", 1)[0] if "." in spec.layers else spec.layers


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
        return self.tensors.get(f"{self._base}/{metric}")

    @property
    def _base(self) -> str:
        return model_base(self.spec)

    def channel(self, metric: str) -> list[float] | None:
        """Residual-stream channel scores (one per hidden channel)."""
        return self.tensors.get(f"{self._base}/{metric}")

    def expert(self, layer: int, metric: str) -> list[float] | None:
        """One score per expert of an MoE layer."""
        return self.neuron(layer, metric)  # the same module path: the layer's MLP (MoE) block

    def merged(self, tensors: dict[str, list[float]]) -> ScoreView:
        """These scores plus `tensors` (computed in the app: channel / expert scores a score file lacked)."""
        return ScoreView({**self.tensors, **tensors}, self.spec, self.source)

    def spectrum(self, layer: int, rel: str, metric: str = "sv") -> list[float] | None:
        return self.tensors.get(f"{self.spec.layers}.{layer}.{rel}/{metric}")

    def first_available(self, candidates: tuple[str, ...]) -> str | None:
        have = set(self.metrics())
        return next((m for m in candidates if m in have), None)


def width_score_tensors(source: str, data: str, tokens: int, seq_len: int, *, loaded=None, batch_size: int = 8,
                        cancel=None) -> dict[str, list[float]]:
    """Channel norms (Minitron; families prune_hidden cuts) and, for MoE models, router frequency and REAP per
    expert, on the first `tokens` of `data`: for a score file that lacks them (named as `workbench score` names
    them: the same library pass). Slow: call it from a worker. `loaded`: the app's surgery.loading.LoadedModel
    when its weights are in already.

    Raises:
        UserError: a model with neither axis, data too short, no tokenizer.
    """
    from surgery.arch import spec_for_config
    from surgery.data import load_blocks
    from surgery.errors import UserError
    from surgery.importance.runner import score_model
    from surgery.loading import load_model

    loaded = loaded or load_model(source)
    spec = spec_for_config(loaded.config_dict)
    methods = (["channel-norm"] if spec.hidden_prunable else []) + (
        ["expert-freq", "expert-reap"] if spec.cfg_experts else [])
    if not methods:
        raise UserError(f"{spec.family} models have neither residual channels prune_hidden cuts nor experts")
    blocks = load_blocks(data, loaded.tokenizer, seq_len, tokens)
    scores = score_model(loaded.model, list(blocks.batches(batch_size)), methods, cancel=cancel)
    return {name: t.float().flatten().tolist() for name, t in scores.items()}
