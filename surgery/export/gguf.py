"""The GGUF target: one .gguf file that llama.cpp (llama-cli, llama-server, llama-cpp-python) runs as it is.

Architecture: `llama` (or `qwen2` / `qwen3`) when every layer has the same shapes; `deci` when they differ; MoE
models as `qwen3moe` (Qwen3-MoE) or `llama` with experts (Mixtral), uniform only (see `_check_moe`). `deci`
is llama.cpp's Llama with per-layer arrays for `head_count`, `head_count_kv` and `feed_forward_length` (written for
Llama-3.1-Nemotron-51B). Read from llama.cpp's loader and graph (src/models/deci.cpp), and handled here:

- `head_count == 0` is an attention-free layer: the residual stream passes on to the MLP. Its tensors are absent.
- `feed_forward_length == 0` skips the layer's MLP, but the graph then also drops the layer's attention output
  (it `continue`s before the residual update). A layer that keeps attention but lost its MLP therefore gets a
  zero MLP of width 1 instead (gate = up = down = 0 adds exactly 0), reported with its cost.
- The global head size comes from layer 0's head count: a first layer without attention would make it 0. That
  layer gets one zero attention head (q = k = v = o = 0 adds exactly 0), reported with its cost.
- A layer with neither attention nor MLP is the identity and is left out.
- Low-rank factors are densified (B @ A): GGUF has no factored Linear. The parameter / FLOP cost is reported.
- MLP widths are zero-padded to multiples of 32: llama.cpp's fast matmul kernels and q8_0 need whole blocks
  (an off-grid width runs at about half speed: see `_pad_mlp_widths`). Exact; the cost is reported.
- Tied embeddings: no `output.weight`; llama.cpp then uses `token_embd.weight` for the LM head.
- A smaller hidden size (`prune_hidden`) is just a smaller `embedding_length`: llama / qwen3 / deci size q/k/v/o
  by head count x head size, not by the hidden size, and the rescaled norm weights are ordinary weights.
  llama.cpp's qwen2 builds q and o as hidden x hidden, so a width-pruned Qwen2 is refused there.
- Experts: the router is `ffn_gate_inp`, the stacked experts `ffn_{gate,up,down}_exps`; llama.cpp has one
  `expert_count` for all layers (no per-layer array) and renormalises the top-k weights in both architectures.

Query/key rows are permuted from HF's rotate-half RoPE layout to llama.cpp's interleaved one (llama and deci, as
convert_hf_to_gguf.py's `LlamaModel.permute`); Qwen's `qwen2` / `qwen3` use NeoX RoPE and keep HF's order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from surgery.errors import UserError
from surgery.export.atomic import atomic_file, check_output_file
from surgery.export.gguf_vocab import vocab_from_tokenizer
from surgery.export.report import Adjustment, ExportReport
from surgery.sources import Progress

DTYPES = ("f32", "f16", "bf16", "q8_0")
_DTYPE_ALIASES = {"auto": "f16", "float32": "f32", "fp32": "f32", "float16": "f16", "fp16": "f16",
                  "bfloat16": "bf16", "q8": "q8_0"}
# Families with a GGUF architecture; the value says which llama.cpp arch serves uniform layers. Mixtral is
# llama.cpp's `llama` with experts (convert_hf_to_gguf's LlamaModel writes MixtralForCausalLM so).
_UNIFORM_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3moe", "mixtral": "llama"}
_ROPE_INTERLEAVED = ("llama", "mixtral")  # llama.cpp's llama / deci rotate interleaved pairs; Qwen's NeoX halves
_QK_NORMS = ("qwen3", "qwen3_moe")
Q8_BLOCK = 32  # q8_0 quantises rows in blocks of 32 values
MLP_MULTIPLE = 32  # MLP widths are zero-padded to this (see _pad_mlp_widths)


def parse_gguf_dtype(dtype: str) -> str:
    """"f32" / "f16" / "bf16" / "q8_0" ("auto" = f16, as llama.cpp's converter); UserError otherwise."""
    key = str(dtype).strip().lower()
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        raise UserError(f"unknown GGUF dtype: {dtype!r} (use {', '.join(DTYPES)}; k-quants: llama-quantize the f16 file)")
    return key


@dataclass
class _Layer:
    """One exported block: its tensors (GGUF name suffix -> float32 array) and shapes."""

    heads: int
    kv_heads: int
    ff: int  # MLP width; of each expert in an MoE layer
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    experts: int = 0  # 0: a dense MLP


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().contiguous().numpy()


def _dense(module, what: str, adjustments: list[Adjustment]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in), bias) of a Linear, densifying a LowRankLinear (B @ A) and reporting what that costs."""
    from surgery.modules import LowRankLinear, dense_weight

    weight, bias = dense_weight(module)
    if isinstance(module, LowRankLinear):
        out_f, in_f = weight.shape
        added = out_f * in_f - module.rank * (out_f + in_f)
        adjustments.append(Adjustment(f"{what}: rank-{module.rank} factors densified to {out_f}x{in_f} (GGUF has "
                                      "no factored Linear; exact up to rounding)", added, 2 * added))
    return weight, bias


def _rope_interleave(weight: np.ndarray, head_dim: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp's interleaved pairs, per head (convert_hf_to_gguf `LlamaModel.permute`)."""
    shape = weight.shape
    return weight.reshape(-1, 2, head_dim // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _rope(config) -> tuple[float, dict]:
    """(rope theta, rope parameters) of a transformers 5 config (or a legacy one)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), params


def _llama3_rope_factors(params: dict, theta: float, head_dim: int) -> np.ndarray:
    """Per-frequency scale of Llama 3.1 RoPE, as llama.cpp's converter writes it (`rope_freqs.weight`)."""
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_ctx = params.get("original_max_position_embeddings", 8192)
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _collect_layers(model, spec, family: str, head_dim: int, interleave: bool,
                    adjustments: list[Adjustment]) -> list[_Layer]:
    from surgery import ops
    from surgery.modules import SkippedAttention, SkippedMLP

    layers: list[_Layer] = []
    for idx, block in enumerate(ops.get_module(model, spec.layers)):
        attn, mlp = getattr(block, spec.attn), getattr(block, spec.mlp)
        has_attn, has_mlp = not isinstance(attn, SkippedAttention), not isinstance(mlp, SkippedMLP)
        if not has_attn and not has_mlp:
            adjustments.append(Adjustment(f"layer {idx}: no attention and no MLP (the identity): left out (exact)"))
            continue
        layer = _Layer(0, 0, 0)
        if has_attn:
            layer.tensors["attn_norm.weight"] = _np(getattr(block, spec.attn_norms[0]).weight)
            for name, gguf_name in ((spec.q, "attn_q"), (spec.k, "attn_k"), (spec.v, "attn_v"), (spec.o, "attn_output")):
                weight, bias = _dense(getattr(attn, name), f"layer {idx} {spec.attn}.{name}", adjustments)
                weight = _np(weight)
                if bias is not None:
                    bias = _np(bias)
                if interleave and gguf_name in ("attn_q", "attn_k"):
                    weight = _rope_interleave(weight, head_dim)
                    bias = None if bias is None else _rope_interleave(bias, head_dim)
                layer.tensors[f"{gguf_name}.weight"] = weight
                if bias is not None:
                    layer.tensors[f"{gguf_name}.bias"] = bias
            layer.heads = layer.tensors["attn_q.weight"].shape[0] // head_dim
            layer.kv_heads = layer.tensors["attn_k.weight"].shape[0] // head_dim
            if family in _QK_NORMS:
                layer.tensors["attn_q_norm.weight"] = _np(attn.q_norm.weight)
                layer.tensors["attn_k_norm.weight"] = _np(attn.k_norm.weight)
        if has_mlp and spec.cfg_experts and hasattr(mlp, spec.experts):
            layer.tensors["ffn_norm.weight"] = _np(getattr(block, spec.mlp_norms[0]).weight)
            layer.tensors.update(_expert_tensors(mlp, spec))
            layer.experts, layer.ff = layer.tensors["ffn_gate_exps.weight"].shape[:2]
        elif has_mlp:
            layer.tensors["ffn_norm.weight"] = _np(getattr(block, spec.mlp_norms[0]).weight)
            for name, gguf_name in ((spec.gate, "ffn_gate"), (spec.up, "ffn_up"), (spec.down, "ffn_down")):
                weight, bias = _dense(getattr(mlp, name), f"layer {idx} {spec.mlp}.{name}", adjustments)
                layer.tensors[f"{gguf_name}.weight"] = _np(weight)
                if bias is not None:
                    layer.tensors[f"{gguf_name}.bias"] = _np(bias)
            layer.ff = layer.tensors["ffn_gate.weight"].shape[0]
        layers.append(layer)
    return layers


def _expert_tensors(mlp, spec) -> dict[str, np.ndarray]:
    """An MoE block's router and stacked experts under llama.cpp's names (convert_hf_to_gguf's layout).

    transformers 5 fuses each layer's experts: gate_up_proj (E, 2 * width, hidden) with the gate rows first (the
    forward `chunk(2)`s it), down_proj (E, hidden, width). GGUF stores dimensions reversed, so these numpy shapes
    are llama.cpp's {hidden, width, E} / {width, hidden, E}; the router (E, hidden) is `ffn_gate_inp`.
    """
    experts, router = getattr(mlp, spec.experts), getattr(mlp, spec.router)
    gate_up = _np(experts.gate_up_proj)
    width = gate_up.shape[1] // 2
    return {"ffn_gate_inp.weight": _np(router.weight),
            "ffn_gate_exps.weight": np.ascontiguousarray(gate_up[:, :width]),
            "ffn_up_exps.weight": np.ascontiguousarray(gate_up[:, width:]),
            "ffn_down_exps.weight": _np(experts.down_proj)}


# The bias tensors each llama.cpp architecture creates (src/models/<arch>.cpp `load_arch_tensors`, all optional:
# `create_tensor_qkv` makes q/k/v biases for every one; llama and deci also make attn_output and the dense MLP's).
# A bias outside its set is not read: llama.cpp then refuses the whole file ("wrong number of tensors").
_QKV_BIASES = frozenset({"attn_q", "attn_k", "attn_v"})
_ARCH_BIASES = {"llama": _QKV_BIASES | {"attn_output", "ffn_gate", "ffn_up", "ffn_down"},
                "qwen2": _QKV_BIASES, "qwen3": _QKV_BIASES, "qwen3moe": _QKV_BIASES}
_ARCH_BIASES["deci"] = _ARCH_BIASES["llama"]
_HF_NAMES = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
             "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}


def _check_biases(arch: str, layers: list[_Layer], model) -> None:
    """Refuse, in one line, a bias the chosen llama.cpp architecture does not read (see `_ARCH_BIASES`), or one
    the export has no GGUF name for (a router's, an expert's): nothing is dropped silently."""
    written = sum(name.endswith(".bias") for lay in layers for name in lay.tensors)
    biases = [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    if written != len(biases):
        known = tuple(f"{hf}.bias" for hf in _HF_NAMES.values()) + ("b.bias",)  # b.bias: a LowRankLinear's
        odd = next((n for n in biases if not n.endswith(known)), biases[0])
        raise UserError(f"GGUF export: the model has {len(biases)} bias tensors and llama.cpp's {arch} has a place "
                        f"for {written} of them (e.g. not for {odd})")
    extra = sorted({name.removesuffix(".bias") for lay in layers for name in lay.tensors if name.endswith(".bias")}
                   - _ARCH_BIASES[arch])
    if extra:
        names = ", ".join(f"{_HF_NAMES.get(e, e)} ({e}.bias)" for e in extra)
        reads = ", ".join(_HF_NAMES[e] for e in sorted(_ARCH_BIASES[arch]))
        raise UserError(f"GGUF export: llama.cpp's {arch} reads biases of {reads} only; this model has biases on "
                        f"{names}, which it would refuse to load")


def _uniform(layers: list[_Layer]) -> bool:
    first = layers[0]
    key = lambda lay: (lay.heads, lay.kv_heads, lay.ff, lay.experts)  # noqa: E731
    return all(lay.heads and lay.ff and key(lay) == key(first) for lay in layers)


def _check_moe(config, family: str, layers: list[_Layer]) -> None:
    """Refuse, in one line, MoE shapes llama.cpp's qwen3moe / llama-with-experts cannot hold."""
    counts = sorted({lay.experts for lay in layers})
    if counts == [0]:
        return
    if 0 in counts:
        raise UserError(f"GGUF export: llama.cpp's {_UNIFORM_ARCH[family]} needs an MoE block in every layer; this "
                        "model has dense MLP layers too (mlp_only_layers / decoder_sparse_step)")
    if len(counts) > 1:
        raise UserError(f"GGUF export: llama.cpp needs one expert count for every layer; uniform plans export "
                        f"(this model has {' and '.join(map(str, counts))} in different layers)")
    if not _uniform(layers):
        raise UserError("GGUF export: per-layer head or width cuts on an MoE model are not supported (llama.cpp's "
                        "per-layer architecture, deci, has no experts); prune experts with one count for every "
                        "layer and keep the attention shapes uniform")
    if family == "qwen3_moe" and not getattr(config, "norm_topk_prob", True):
        raise UserError("GGUF export: llama.cpp's qwen3moe renormalises the top-k router weights; this model has "
                        "norm_topk_prob false, which it cannot express (every released Qwen3-MoE has true)")


def _pad_for_deci(layers: list[_Layer], hidden: int, head_dim: int, adjustments: list[Adjustment]) -> None:
    """Give deci layers the parts llama.cpp's graph needs to compute them exactly (see the module docstring)."""
    first = layers[0]
    if first.heads == 0:
        zeros = lambda rows, cols: np.zeros((rows, cols), dtype=np.float32)  # noqa: E731
        first.tensors.update({"attn_norm.weight": np.ones(hidden, dtype=np.float32),
                              "attn_q.weight": zeros(head_dim, hidden), "attn_k.weight": zeros(head_dim, hidden),
                              "attn_v.weight": zeros(head_dim, hidden), "attn_output.weight": zeros(hidden, head_dim)})
        first.heads = first.kv_heads = 1
        params = 4 * head_dim * hidden + hidden
        adjustments.append(Adjustment(
            "first layer has no attention: given one zero attention head (llama.cpp's deci takes the head size "
            "from layer 0; the zero head adds exactly 0, plus one head's attention over the context per token)",
            params, 2 * 4 * head_dim * hidden))
    for i, lay in enumerate(layers):
        if lay.heads and not lay.ff:
            lay.tensors.update({"ffn_norm.weight": np.ones(hidden, dtype=np.float32),
                                "ffn_gate.weight": np.zeros((1, hidden), dtype=np.float32),
                                "ffn_up.weight": np.zeros((1, hidden), dtype=np.float32),
                                "ffn_down.weight": np.zeros((hidden, 1), dtype=np.float32)})
            lay.ff = 1
            adjustments.append(Adjustment(
                f"exported layer {i}: attention without MLP given a zero MLP of width 1 (llama.cpp's deci graph "
                "drops the attention output of a layer with feed_forward_length 0; the zero MLP adds exactly 0)",
                4 * hidden, 2 * 3 * hidden))


def _pad_mlp_widths(layers: list[_Layer], hidden: int, adjustments: list[Adjustment]) -> None:
    """Zero neurons up to a multiple of MLP_MULTIPLE in every MLP (exact: gate = up = down = 0 there).

    Why: llama.cpp's fast CPU matmul kernels (llamafile sgemm) and q8_0's 32-value blocks need the inner dimension
    in whole blocks; a width off that grid falls back to a generic path. Measured on the demo's uniform 80% plan
    (MLP width 1145, f16, 1 thread): prompt processing at 0.62x the original's speed unpadded, 1.23x padded to
    1152 (ideal from FLOPs: 1.25x). Width-1 zero MLPs (see `_pad_for_deci`) are left as they are.
    """
    padded = []
    for i, lay in enumerate(layers):
        if lay.experts or lay.ff <= 1 or lay.ff % MLP_MULTIPLE == 0:  # expert widths are written as they are
            continue
        width = -(-lay.ff // MLP_MULTIPLE) * MLP_MULTIPLE
        extra = width - lay.ff
        for name in ("ffn_gate.weight", "ffn_up.weight"):
            lay.tensors[name] = np.concatenate([lay.tensors[name], np.zeros((extra, hidden), np.float32)], axis=0)
        for name in ("ffn_gate.bias", "ffn_up.bias"):  # zero biases too: silu(0) * 0 = 0 stays exact
            if name in lay.tensors:
                lay.tensors[name] = np.concatenate([lay.tensors[name], np.zeros(extra, np.float32)])
        lay.tensors["ffn_down.weight"] = np.concatenate(
            [lay.tensors["ffn_down.weight"], np.zeros((hidden, extra), np.float32)], axis=1)
        padded.append((i, lay.ff, width))
        lay.ff = width
    if padded:
        params = sum(3 * hidden * (w - f) for _, f, w in padded)
        i, f, w = padded[0]
        adjustments.append(Adjustment(
            f"MLP widths padded to multiples of {MLP_MULTIPLE} with zero neurons in {len(padded)} layer(s) (e.g. "
            f"exported layer {i}: {f} -> {w}; llama.cpp's fast matmul kernels and q8_0 blocks need it; exact)",
            params, 2 * params))


class _TensorWriter:
    """Adds tensors to a GGUFWriter in the requested dtype; q8_0 falls back to f16 per tensor whose rows are not
    whole 32-value blocks (1-D tensors, norms and biases, stay f32 as in llama.cpp's converter)."""

    def __init__(self, writer, dtype: str):
        self.writer, self.dtype = writer, dtype
        self.params = 0
        self.fallbacks: list[str] = []

    def add(self, name: str, arr: np.ndarray) -> None:
        from gguf import GGMLQuantizationType as Q
        from gguf import quants

        self.params += arr.size
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        kind = self.dtype if arr.ndim > 1 else "f32"
        if kind == "q8_0" and arr.shape[-1] % Q8_BLOCK:
            self.fallbacks.append(name)
            kind = "f16"
        if kind == "f32":
            self.writer.add_tensor(name, arr)
        elif kind == "f16":
            self.writer.add_tensor(name, arr.astype(np.float16))
        else:
            qtype = Q.Q8_0 if kind == "q8_0" else Q.BF16
            self.writer.add_tensor(name, quants.quantize(arr, qtype), raw_dtype=qtype)


def _file_type(dtype: str):
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[dtype]


def export_gguf(
    source: str,
    out_path: str | Path,
    *,
    dtype: str = "auto",
    overwrite: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: Progress = None,
) -> ExportReport:
    """Write `source` (an `apply` output, any HF model directory, a .gguf file, the demo alias) as one GGUF file.

    Args:
        source: What `surgery.load` reads.
        out_path: The .gguf file to write (atomically: a temp file beside it, renamed when complete).
        dtype: f32, f16, bf16 or q8_0 ("auto" = f16).
        overwrite: Replace an existing file.
        allow_pickle / trust_remote_code: As for `surgery.load`.
        progress: One-line status messages.

    Returns:
        What was written, with every padding / densification the format forced and its cost.

    Raises:
        UserError: bad dtype, unwritable or existing output, a source that is no model, or a model llama.cpp
            cannot run as exported (named in the message with what is supported). Nothing is written then.
    """
    from surgery.loading import load_model

    out_path = Path(out_path)
    dtype = parse_gguf_dtype(dtype)
    check_output_file(out_path, overwrite)
    if out_path.suffix.lower() != ".gguf":  # without it, no source reader (workbench, llama.cpp tools) takes it
        raise UserError(f"--out {out_path}: a GGUF file's name ends in .gguf (e.g. "
                        f"{out_path.with_name(out_path.name + '.gguf')})")
    if progress:
        progress("loading model")
    loaded = load_model(source, dtype="float32", allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                        progress=progress)
    return write_gguf(loaded.model, loaded.tokenizer, out_path, name=Path(str(loaded.resolved.original)).name,
                      dtype=dtype, overwrite=overwrite, progress=progress)


def write_gguf(
    model,
    tokenizer,
    out_path: str | Path,
    *,
    name: str = "model",
    dtype: str = "auto",
    overwrite: bool = False,
    progress: Progress = None,
) -> ExportReport:
    """Write a model already in memory (e.g. pruned by `surgery.apply.apply_plan`) as one GGUF file; see
    `export_gguf`. The model's current modules are what is written: its config.json need not describe them."""
    import gguf

    from surgery.arch import spec_for_model_type

    out_path = Path(out_path)
    dtype = parse_gguf_dtype(dtype)
    check_output_file(out_path, overwrite)
    config = model.config
    config_dict = config.to_dict()
    spec = spec_for_model_type(config.model_type)
    family = spec.family
    if family not in _UNIFORM_ARCH:
        raise UserError(f"GGUF export supports Llama-family models (llama, mistral, SmolLM2) with any per-layer "
                        f"shapes, and qwen2 / qwen3 / qwen3_moe / mixtral with uniform layers; not {family}")
    hidden = config.hidden_size
    # from the attention modules, not the config: a pruned model's config may count fewer heads than it was
    # built with, and hidden // heads would then be wrong (every layer keeps its original head size)
    from surgery import ops

    head_dim = int(next(getattr(getattr(block, spec.attn), "head_dim") for block in ops.get_module(model, spec.layers)))
    theta, rope = _rope(config)
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise UserError(f"GGUF export: RoPE type {rope_type!r} is not supported (default, linear, llama3)")
    vocab = vocab_from_tokenizer(tokenizer, config_dict, config.vocab_size)

    if progress:
        progress("collecting tensors")
    adjustments: list[Adjustment] = []
    with torch.no_grad():
        layers = _collect_layers(model, spec, family, head_dim, family in _ROPE_INTERLEAVED, adjustments)
        if not layers:
            raise UserError("GGUF export: the model has no layer left with attention or an MLP")
        _check_moe(config, family, layers)
        uniform = _uniform(layers)
        if uniform:
            arch = _UNIFORM_ARCH[family]
            if arch == "qwen2" and layers[0].heads * head_dim != hidden:
                raise UserError(f"llama.cpp's qwen2 needs query heads x head size = hidden size ({hidden}), this "
                                f"model has {layers[0].heads} x {head_dim}: export qwen2 cuts that keep every query "
                                "head and the hidden size (MLP neurons, whole layers, low rank)")
        elif family == "llama":
            arch = "deci"
            _pad_for_deci(layers, hidden, head_dim, adjustments)
        else:
            raise UserError(f"GGUF export: {family} with per-layer shapes is not supported (llama.cpp's per-layer "
                            f"architecture, deci, is Llama-only); export uniform {family} plans, or Llama-family "
                            "models with any shapes")
        _check_biases(arch, layers, model)
        _pad_mlp_widths(layers, hidden, adjustments)
        embed = _np(model.get_input_embeddings().weight)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        head = None if tied else _np(model.get_output_embeddings().weight)
        final_norm = _np(model.model.norm.weight)
    adjustments.extend(Adjustment(n) for n in vocab.notes)

    writer = gguf.GGUFWriter(None, arch)
    writer.add_name(name or "model")
    writer.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(len(layers))
    if uniform:
        writer.add_head_count(layers[0].heads)
        writer.add_head_count_kv(layers[0].kv_heads)
        writer.add_feed_forward_length(layers[0].ff)
        if layers[0].experts:
            writer.add_expert_count(layers[0].experts)
            writer.add_expert_used_count(int(getattr(config, spec.cfg_top_k)))
            if arch == "qwen3moe":  # llama.cpp's qwen3moe reads the expert width from its own key
                writer.add_expert_feed_forward_length(layers[0].ff)
    else:
        writer.add_head_count([lay.heads for lay in layers])
        writer.add_head_count_kv([lay.kv_heads for lay in layers])
        writer.add_feed_forward_length([lay.ff for lay in layers])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(theta)
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_file_type(dtype))
    vocab.write(writer)

    tensors = _TensorWriter(writer, dtype)
    tensors.add("token_embd.weight", embed)
    if head is not None:
        tensors.add("output.weight", head)
    tensors.add("output_norm.weight", final_norm)
    if rope_type == "llama3":
        tensors.add("rope_freqs.weight", _llama3_rope_factors(rope, theta, head_dim))
    for i, lay in enumerate(layers):
        for name, arr in lay.tensors.items():
            tensors.add(f"blk.{i}.{name}", arr)
    if tensors.fallbacks:
        adjustments.append(Adjustment(
            f"q8_0: {len(tensors.fallbacks)} tensor(s) whose rows are not multiples of {Q8_BLOCK} written as f16 "
            f"instead (e.g. {tensors.fallbacks[0]})"))

    if progress:
        progress(f"writing {out_path}")
    with atomic_file(out_path, overwrite) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return ExportReport(
        target="gguf",
        out=out_path,
        architecture=arch,
        dtype=dtype,
        params=tensors.params,
        file_bytes=out_path.stat().st_size,
        serve_command=f"llama-cli -m {out_path}",
        adjustments=adjustments,
    )
