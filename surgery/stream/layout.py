"""The tensors a structural plan's output holds, from config.json and the safetensors headers alone: no torch.

The meta-device path (surgery.stream.apply) learns every output tensor's name, shape and dtype by building the
model and cutting it; that needs torch and transformers (~400 MB and ~20 s of imports on a busy box before any
work). For the dense families the layout is simple enough to derive: every header tensor is classified (an
attention or MLP Linear, a norm that lives and dies with its sub-block, a top-level embedding / norm / head),
checked against the config, and cut with the same selection tables and the same `linear_dims` the resolver uses.
Whatever it does not recognise raises `NotCovered`, and the caller falls back to the meta-device model (and says
so). tests/test_stream_dry.py holds this derivation equal to the meta-device one on every dense family.

What the meta-device path does that this copies (each checked by that test): floating tensors take the model's
dtype; a removed sub-block leaves a zero-length float32 placeholder under its o/down projection's name (a fresh
`torch.empty(0)`); a low-rank module keeps a zero-length placeholder `weight` in the model's dtype beside `a`
(rank x in) and `b` (out x rank, with the bias), both in nn.Linear layout even for GPT-2's Conv1D; tied embeddings
save no lm_head.
"""

from __future__ import annotations

import math

from surgery.resolve import LayerCut, Resolution, linear_dims
from surgery.shapes import SURGERY_LAYERS_KEY
from surgery.stream.reads import OutputState
from surgery.stream.source import ST_FLOATS, SourceTensor

PLACEHOLDER = ("F32", (0,))  # surgery.modules.Placeholder: torch.empty(0), float32 whatever the model's dtype
_EXTRA_TOP_LEVEL = {"gpt2": ("transformer.wpe.weight",)}  # learned positions: not in ArchSpec, copied as they are
_HEAD_NORMS = ("q_norm", "k_norm")  # per-head-dim norms inside attention (Qwen3, Gemma 3): shared by all heads
# the names `apply --dtype` takes, as surgery.loading.parse_dtype reads them (test_stream_dry checks they agree)
_DTYPE_NAMES = {
    "float32": "F32", "fp32": "F32", "f32": "F32", "float": "F32", "float16": "F16", "fp16": "F16", "f16": "F16",
    "half": "F16", "bfloat16": "BF16", "bf16": "BF16", "auto": None,
}  # fmt: skip


class NotCovered(Exception):
    """Something the header-only derivation does not handle; the message says what (the meta-device model then
    names the outputs)."""


def model_dtype(dtype: str, config_dict: dict) -> str:
    """`surgery.loading.parse_dtype` without torch: the safetensors name of the dtype the model is built in.

    Raises:
        NotCovered: A name parse_dtype may still take (it then refuses it in its own words).
    """
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise NotCovered(f"dtype {dtype!r}")
    resolved = _DTYPE_NAMES[key]
    if resolved is None:
        saved = str(config_dict.get("dtype") or config_dict.get("torch_dtype") or "float32")
        resolved = _DTYPE_NAMES.get(saved.lower().removeprefix("torch.")) or "F32"
    return resolved


def _split_layers(sources: dict[str, SourceTensor], resolution: Resolution):
    """(top-level tensors, {layer index: {name inside the layer: tensor}}), every name recognised."""
    shape = resolution.shape
    spec = shape.spec
    prefix = spec.layers + "."
    top: dict[str, SourceTensor] = {}
    layers: dict[int, dict[str, SourceTensor]] = {}
    for name, src in sources.items():
        if not name.startswith(prefix):
            top[name] = src
            continue
        index, _, rest = name[len(prefix) :].partition(".")
        if not index.isdigit() or int(index) >= shape.num_layers:
            raise NotCovered(f"tensor {name} (no such layer in config.json)")
        layers.setdefault(int(index), {})[rest] = src
    missing = [i for i in range(shape.num_layers) if i not in layers]
    if missing:
        raise NotCovered(f"layer {missing[0]} has no tensors in the checkpoint")
    return top, layers


def _check_shape(name: str, src: SourceTensor, want: tuple[int, ...]) -> None:
    if src.shape != want:
        raise NotCovered(f"tensor {name} has shape {list(src.shape)}, config.json says {list(want)}")


def _top_level(top: dict[str, SourceTensor], resolution: Resolution, config_dict: dict, dtype: str) -> OutputState:
    shape = resolution.shape
    spec = shape.spec
    tied = config_dict.get("tie_word_embeddings")
    if not isinstance(tied, bool):
        raise NotCovered("config.json does not say whether the embeddings are tied (tie_word_embeddings)")
    head = f"{spec.lm_head}.weight"
    if (head in top) == tied:
        raise NotCovered(f"{head} is {'present' if tied else 'missing'} while tie_word_embeddings is {tied}")
    known = {f"{spec.embed}.weight": (shape.vocab, shape.hidden), head: (shape.vocab, shape.hidden),
             f"{spec.final_norm}.weight": (shape.hidden,), f"{spec.final_norm}.bias": (shape.hidden,)}
    state: OutputState = {}
    for name, src in top.items():
        if name in known:
            _check_shape(name, src, known[name])
        elif name not in _EXTRA_TOP_LEVEL.get(spec.family, ()):
            raise NotCovered(f"tensor {name}")
        state[name] = (dtype if src.dtype in ST_FLOATS else src.dtype, src.shape)
    for need in (f"{spec.embed}.weight", f"{spec.final_norm}.weight"):
        if need not in top:
            raise NotCovered(f"no {need} in the checkpoint")
    return state


def _layer(cut: LayerCut, tensors: dict[str, SourceTensor], resolution: Resolution, out: str, dtype: str,
           where: str) -> OutputState:
    """The output tensors of one kept layer (`out`: its new name prefix, "model.layers.3.")."""
    shape = resolution.shape
    spec = shape.spec
    hidden = (shape.hidden,)
    blocks = {spec.attn: ("attn", spec.attn_linears, cut.attention_kept),
              spec.mlp: ("mlp", spec.mlp_linears, cut.mlp_kept)}
    norms = {**{n: cut.attention_kept for n in spec.attn_norms}, **{n: cut.mlp_kept for n in spec.mlp_norms}}
    state: OutputState = {}
    seen: set[str] = set()
    for rest, src in tensors.items():
        module, _, param = rest.rpartition(".")
        block, _, sub = module.partition(".")
        as_stored = (dtype if src.dtype in ST_FLOATS else src.dtype, src.shape)
        if module in norms and param in ("weight", "bias"):
            _check_shape(where + rest, src, hidden)
            if norms[module]:
                state[out + rest] = as_stored
            seen.add(module)
            continue
        if block not in blocks or param not in ("weight", "bias"):
            raise NotCovered(f"tensor {where}{rest}")
        kind, linears, kept = blocks[block]
        if sub in _HEAD_NORMS and kind == "attn":
            _check_shape(where + rest, src, (cut.shape.head_dim,))
            if kept:
                state[out + rest] = as_stored
            continue
        if sub not in linears:
            raise NotCovered(f"tensor {where}{rest}")
        seen.add(module)
        if not kept:
            continue
        n_out, n_in = linear_dims(cut, kind, sub, shape)
        rank = cut.low_rank.get(module)
        if rank is not None and param == "weight":  # surgery.modules.LowRankLinear
            state[f"{out}{module}.weight"] = (dtype, (0,))
            state[f"{out}{module}.a.weight"] = (dtype, (rank, n_in))
            state[f"{out}{module}.b.weight"] = (dtype, (n_out, rank))
        elif rank is not None:
            state[f"{out}{module}.b.bias"] = (dtype, (n_out,))
        elif param == "bias":
            state[out + rest] = (as_stored[0], (n_out,))
        else:
            state[out + rest] = (as_stored[0], (n_in, n_out) if spec.conv1d else (n_out, n_in))
    needed = [*norms, *(f"{spec.attn}.{n}" for n in spec.attn_linears), *(f"{spec.mlp}.{n}" for n in spec.mlp_linears)]
    for module in needed:
        if module not in seen:
            raise NotCovered(f"no {where}{module} in the checkpoint")
    if cut.shape.has_attention and not cut.attention_kept:
        state[f"{out}{spec.attn}.{spec.o}.weight"] = PLACEHOLDER
    if cut.shape.has_mlp and not cut.mlp_kept:
        state[f"{out}{spec.mlp}.{spec.down}.weight"] = PLACEHOLDER
    return state


def output_state(
    config_dict: dict, resolution: Resolution, sources: dict[str, SourceTensor], dtype: str = "auto"
) -> OutputState:
    """Every tensor the pruned model saves (name -> safetensors dtype, shape), in save_pretrained's order.

    Args:
        config_dict: the source's config.json.
        resolution: the plan resolved against it (structural steps only: see `surgery.stream.blockers`).
        sources: the source's tensors (`surgery.stream.source.tensor_locations`).
        dtype: as `workbench apply --dtype`.

    Raises:
        NotCovered: The family, the checkpoint or the plan is one this derivation does not handle.
    """
    shape = resolution.shape
    spec = shape.spec
    if spec.cfg_experts:
        raise NotCovered(f"the {spec.family} family (mixture of experts)")
    if config_dict.get(SURGERY_LAYERS_KEY):
        raise NotCovered("a checkpoint with per-layer shapes (surgery_layers)")
    if resolution.hidden_removed:
        raise NotCovered("prune_hidden")
    dtype_st = model_dtype(dtype, config_dict)
    top, layers = _split_layers(sources, resolution)
    state = _top_level(top, resolution, config_dict, dtype_st)
    position = 0
    for cut in resolution.layers:  # dropped layers too: every tensor of the checkpoint must be one it knows
        part = _layer(cut, layers[cut.index], resolution, f"{spec.layers}.{position}.", dtype_st,
                      f"{spec.layers}.{cut.index}.")
        if not cut.dropped:
            state.update(part)
            position += 1
    return dict(sorted(state.items()))


def embedding_names(spec) -> set[str]:
    """The stored lookup tables (token embedding, GPT-2's learned positions): 2-D tensors that are no Linear."""
    return {f"{spec.embed}.weight", *_EXTRA_TOP_LEVEL.get(spec.family, ())}


def params_of(sources: dict[str, SourceTensor]) -> int:
    """Parameters of a checkpoint `output_state` covers: its elements (a tied head is not stored)."""
    return sum(math.prod(s.shape) for s in sources.values())
