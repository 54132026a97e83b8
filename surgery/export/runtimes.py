"""Which runtimes run a model shape, and with what padding: plain transformers, llama.cpp (GGUF), vLLM (DeciLM),
surgery.load. Pure: shapes in, verdicts out (no weights).

- plain transformers: one shape in every layer, attention and MLP everywhere, no low-rank factors (`apply`
  then writes a plain config; otherwise `surgery_layers`, which only surgery.load reads);
- llama.cpp: Llama family: any per-layer shapes (architecture `deci`), but a first layer without attention and a
  layer with attention but no MLP get exact zero parts (llama.cpp's deci graph, see surgery.export.gguf);
  Qwen2/Qwen3: uniform only (`qwen2` / `qwen3` have no per-layer arrays), Qwen2 with every query head and the full
  hidden size (its q/o are hidden x hidden); Qwen3-MoE / Mixtral: uniform only, one expert count in every layer, an
  MoE block in every layer (Qwen3-MoE with norm_topk_prob); low-rank factors are densified; a smaller hidden size
  (prune_hidden) is just a smaller embedding length;
- vLLM: Llama family; the DeciLM layout's padding, computed by the exporter's own `decilm_layout` (a width cut
  that is not head_dim x a head count holding every layer's heads is padded back with zero channels); no MoE;
- surgery.load: every supported family and shape.

`serve_rules` turns a runtime into what `plan suggest --serve` may allocate so that the export pads nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from surgery.errors import UserError
from surgery.export.report import Adjustment
from surgery.shapes import ModelShape

RUNTIMES = ("transformers", "llama.cpp", "vllm", "surgery.load")
SERVE_TARGETS = ("llama.cpp", "vllm")
_GGUF_UNIFORM_ONLY = ("qwen2", "qwen3", "qwen3_moe", "mixtral")


@dataclass(frozen=True)
class RuntimeFit:
    """Whether `runtime` runs the model, and what its export pads (empty: runs as it is)."""

    runtime: str
    runs: bool
    adjustments: tuple[Adjustment, ...] = ()
    why_not: str = ""

    @property
    def params_added(self) -> int:
        return sum(a.params_added for a in self.adjustments)

    def line(self) -> str:
        """One line for a UI: "vllm: runs (pads +12,288 params)" / "transformers: no (per-layer shapes)"."""
        if not self.runs:
            return f"{self.runtime}: no ({self.why_not})"
        if not self.adjustments:
            return f"{self.runtime}: runs as is"
        return f"{self.runtime}: runs with padding (+{self.params_added:,} params, {len(self.adjustments)} change(s))"


def shape_after(resolution) -> ModelShape:
    """The ModelShape a Resolution's output has (the base model's globals, the kept layers' shapes, the hidden size
    after prune_hidden, the experts each kept layer keeps)."""
    return replace(resolution.shape, layers=resolution.result_shapes(), hidden=resolution.result_hidden,
                   experts=resolution.result_experts)


def _uniform(shape: ModelShape) -> bool:
    layers = shape.layers
    return bool(layers) and len({(s.heads, s.kv_heads, s.mlp) for s in layers}) == 1 and not any(
        s.low_rank or not s.has_attention or not s.has_mlp for s in layers) and len(set(shape.experts)) <= 1


def _densified(shape: ModelShape) -> list[Adjustment]:
    """The cost of multiplying every low-rank factor pair back into a dense weight."""
    from surgery.export.vllm import source_linear_dims

    out = []
    for i, s in enumerate(shape.layers):
        for rel, rank in sorted(s.low_rank.items()):
            o, n = source_linear_dims(rel, s, shape.hidden)
            params = o * n - rank * (o + n)
            out.append(Adjustment(f"layer {i}: {rel} rank {rank} densified", params, 2 * params))
    return out


def transformers_fit(shape: ModelShape) -> RuntimeFit:
    if not _uniform(shape):
        why = ("per-layer expert counts" if len(set(shape.experts)) > 1
               else "per-layer shapes, dropped blocks or low-rank factors")
        return RuntimeFit("transformers", False, why_not=why)
    s = shape.layers[0]
    # configs derive or validate head_dim against hidden / heads (GPT-2 derives it, LlamaConfig refuses 7 of 576)
    if shape.hidden % s.heads or (shape.spec.family == "gpt2" and s.heads != shape.base_heads):
        return RuntimeFit("transformers", False, why_not=f"{s.heads} heads cannot be said in a plain config")
    return RuntimeFit("transformers", True)


def _gguf_width_padding(shape: ModelShape) -> list[Adjustment]:
    """The zero neurons the GGUF export adds to bring MLP widths to its grid (surgery.export.gguf.MLP_MULTIPLE)."""
    from surgery.export.gguf import MLP_MULTIPLE

    off = [s.mlp for s in shape.layers if s.mlp > 1 and s.mlp % MLP_MULTIPLE]
    if not off:
        return []
    params = sum(3 * shape.hidden * (-w % MLP_MULTIPLE) for w in off)
    return [Adjustment(f"MLP widths padded to multiples of {MLP_MULTIPLE} in {len(off)} layer(s)", params, 2 * params)]


def _gguf_refusal(shape: ModelShape, config_dict: dict | None) -> str:
    """Why the GGUF export refuses `shape` (surgery.export.gguf's checks, on shapes), or ""."""
    family = shape.spec.family
    if family not in ("llama", *_GGUF_UNIFORM_ONLY):
        return f"the GGUF export does not write {family}"
    if shape.experts:
        if 0 in shape.experts:
            return "llama.cpp's MoE architectures need an MoE block in every layer"
        if len(set(shape.experts)) > 1:
            return "llama.cpp needs one expert count for every layer; uniform plans export"
        if family == "qwen3_moe" and not (config_dict or {}).get("norm_topk_prob", True):
            return "llama.cpp's qwen3moe renormalises the top-k router weights (norm_topk_prob false)"
    if family in _GGUF_UNIFORM_ONLY and not _uniform(shape):
        return f"llama.cpp's {family} has no per-layer shapes"
    if family == "qwen2" and shape.layers[0].heads * shape.layers[0].head_dim != shape.hidden:
        return "llama.cpp's qwen2 needs every query head and the full hidden size (q/o are hidden x hidden)"
    return ""


def llama_cpp_fit(shape: ModelShape, config_dict: dict | None = None) -> RuntimeFit:
    family = shape.spec.family
    why_not = _gguf_refusal(shape, config_dict)
    if why_not:
        return RuntimeFit("llama.cpp", False, why_not=why_not)
    widths = [] if shape.experts else _gguf_width_padding(shape)  # the exporter pads dense MLP widths to its grid
    if _uniform(shape):  # architecture llama / qwen2 / qwen3 / qwen3moe: nothing else to pad
        return RuntimeFit("llama.cpp", True, tuple(widths))
    adjustments = _densified(shape) + widths
    layers = [s for s in shape.layers if s.has_attention or s.has_mlp]  # identity layers are left out
    if layers and not layers[0].has_attention:
        hd, c = layers[0].head_dim, shape.hidden
        adjustments.append(Adjustment("first layer without attention: one zero head", 4 * hd * c + c, 8 * hd * c))
    for i, s in enumerate(layers):
        if s.has_attention and not s.has_mlp:
            adjustments.append(Adjustment(f"layer {i}: attention without MLP: a zero MLP of width 1",
                                          4 * shape.hidden, 6 * shape.hidden))
    return RuntimeFit("llama.cpp", True, tuple(adjustments))


def vllm_fit(shape: ModelShape, config_dict: dict | None = None) -> RuntimeFit:
    from surgery.export.vllm import check_supported, decilm_layout, layout_adjustments

    try:
        check_supported(config_dict or {"model_type": shape.spec.model_types[0]}, shape)
        heads, layout = decilm_layout(shape)
    except UserError as exc:
        return RuntimeFit("vllm", False, why_not=str(exc).removeprefix("vLLM export: "))
    return RuntimeFit("vllm", True, tuple(layout_adjustments(shape, heads, layout)))


def runtime_fits(shape: ModelShape, config_dict: dict | None = None) -> list[RuntimeFit]:
    """Every runtime's verdict on `shape`, in RUNTIMES order."""
    return [transformers_fit(shape), llama_cpp_fit(shape, config_dict), vllm_fit(shape, config_dict),
            RuntimeFit("surgery.load", True)]


@dataclass(frozen=True)
class ServeRules:
    """What `plan suggest --serve RUNTIME` may allocate so that the runtime's export pads nothing."""

    runtime: str
    cut_heads: bool  # query heads / KV groups may be pruned
    neuron_grain: int  # every kept MLP width a multiple of this
    cut_hidden: bool = True  # residual channels may be pruned (prune_hidden)


def serve_rules(runtime: str, shape: ModelShape, config_dict: dict, uniform: bool) -> ServeRules:
    """The allocation rules for `runtime`, or a one-line refusal when it cannot run any pruned form of the model.

    vLLM: the query-head count is global (hidden / head_dim) and both readers take it as given, so no head or KV
    cut (whole layers and MLP neurons only), widths a multiple of 256. llama.cpp (Llama family): any head and KV
    cut, widths a multiple of 32 (the GGUF export pads others: off-grid widths run at about half speed there);
    Qwen2/Qwen3/Qwen3-MoE/Mixtral only uniformly, Qwen2 without head or width cuts (llama.cpp's qwen2 builds q/o as
    hidden x hidden). No width cut for vLLM: with every query head kept, hidden = heads x head_dim is the smallest
    size the DeciLM layout holds, so a width cut would be padded back whole.
    """
    if runtime == "vllm":
        fit = vllm_fit(shape, config_dict)  # the source itself must fit the layout (family, head_dim, ...)
        if not fit.runs:
            raise UserError(f"--serve vllm: {fit.why_not}")
        from surgery.export.vllm import FFN_GRID

        return ServeRules("vllm", cut_heads=False, neuron_grain=FFN_GRID, cut_hidden=False)
    if runtime == "llama.cpp":
        family = shape.spec.family
        if family not in ("llama", *_GGUF_UNIFORM_ONLY):
            raise UserError(f"--serve llama.cpp: the GGUF export does not write {family}")
        if family in _GGUF_UNIFORM_ONLY and not uniform:
            raise UserError(f"--serve llama.cpp: llama.cpp's {family} has no per-layer shapes; drop --non-uniform")
        from surgery.export.gguf import MLP_MULTIPLE

        full_width = family == "qwen2"  # q/o hidden x hidden there
        return ServeRules("llama.cpp", cut_heads=not full_width, neuron_grain=MLP_MULTIPLE, cut_hidden=not full_width)
    raise UserError(f"--serve {runtime!r}: expected one of {', '.join(SERVE_TARGETS)}")
