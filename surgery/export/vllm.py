"""The vLLM target: a directory in vLLM's heterogeneous Llama layout (`DeciLMForCausalLM`, `model_type: nemotron-nas`).

Layout (what vLLM's `nemotron_nas.py` and mlx-lm's `nemotron-nas.py` both read): plain Llama tensor names, and in
config.json one `block_configs` entry per layer, `attention.{no_op, n_heads_in_group}` and `ffn.{no_op, ffn_mult}`.
What the format cannot say, and what the export does about it (exact, never silent; each is an `Adjustment`):
- The query-head count is global and both readers derive head_dim = hidden_size / num_attention_heads, so every
  layer that keeps attention gets H = hidden / head_dim query heads: missing heads become zero heads (zero q rows,
  zero o_proj columns: exact, costs compute). Only `n_heads_in_group` varies, and it must divide H; KV groups are
  padded with zero groups when the kept ones cannot serve H evenly, or refused when no padding can.
- MLP widths come from `ffn_mult` rounded up to a multiple of 256: other widths get zero neurons (zero gate/up
  rows, zero down_proj columns: exact).
- Low-rank factors are multiplied back into dense weights (the parameter cost is reported).
- A hidden size (after `prune_hidden`) that is not head_dim x a head count able to hold every layer's query heads
  is padded with zero residual channels up to the smallest one that is (`exported_hidden`). Exact: nothing writes
  the zero channels (zero embedding columns, zero o/down rows) or reads them (zero q/k/v/gate/up/lm_head columns),
  and every RMSNorm is rescaled so that it normalises as before over more channels: weights x sqrt(H / H') and
  rms_norm_eps x H / H' (then sum(x^2) / H' + eps' = (H / H') (sum(x^2) / H + eps)). On SmolLM2 (9 heads of 64)
  any width cut that keeps 9 heads pads back to 576: the layout cannot hold the saving, and the report says so.
`configuration_decilm.py` ships beside config.json (transformers has no `nemotron-nas` config class), so serving
needs `--trust-remote-code`; `surgery-export.json` records the command and every adjustment.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from surgery import ops
from surgery.errors import UserError
from surgery.export.atomic import _fsync_dir, atomic_dir, check_output_dir
from surgery.export.hf import legacy_rope_keys
from surgery.export.report import Adjustment, ExportReport
from surgery.export.safetensors_shards import DEFAULT_MAX_SHARD_SIZE, parse_shard_size, write_sharded
from surgery.modules import dense_weight
from surgery.plan import write_text_atomic
from surgery.shapes import LayerShape, ModelShape, shape_from_config

ARCHITECTURE = "DeciLMForCausalLM"
MODEL_TYPE = "nemotron-nas"
EXPORT_MANIFEST = "surgery-export.json"
FFN_GRID = 256  # both readers round ffn_mult's width up to a multiple of 256
CONFIG_CODE = Path(__file__).with_name("configuration_decilm.py")


def serve_command(out: str | Path) -> str:
    # vLLM has DeciLMForCausalLM built in; only the config class is remote code (configuration_decilm.py)
    return f"vllm serve {out} --trust-remote-code"


def ffn_width(ffn_mult: float, hidden: int) -> int:
    """The MLP width a DeciLM reader builds from `ffn_mult` (vLLM's and mlx-lm's `_ffn_mult_to_intermediate_size`)."""
    width = int(2 * ffn_mult * hidden / 3)
    return width if width % FFN_GRID == 0 else width + FFN_GRID - width % FFN_GRID


def ffn_mult_for(width: int, hidden: int) -> float:
    """The `ffn_mult` (6 decimals, as mlx-lm rounds it) that reads back as `width` (a multiple of 256)."""
    mult = round(1.5 * width / hidden, 6)
    for candidate in (mult, mult + 1e-6, mult - 1e-6):
        if ffn_width(round(candidate, 6), hidden) == width:
            return round(candidate, 6)
    raise UserError(f"no ffn_mult reads back as an MLP width of {width} at hidden size {hidden}")


@dataclass(frozen=True)
class BlockLayout:
    """One layer as written: the real shapes and the padded ones (0 = sub-block absent)."""

    heads: int  # real query heads
    kv_heads: int  # real KV groups
    kv_out: int  # KV groups written (real + zero groups)
    group_out: int  # n_heads_in_group written; kv_out * group_out == global heads
    mlp: int  # real MLP width
    mlp_out: int  # width written (multiple of 256)

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads if self.kv_heads else 0

    def block_config(self, hidden: int) -> dict:
        attention = ({"no_op": True, "replace_with_linear": False, "n_heads_in_group": None} if not self.heads
                     else {"no_op": False, "replace_with_linear": False, "n_heads_in_group": self.group_out})
        ffn = ({"no_op": True, "replace_with_linear": False, "ffn_mult": None} if not self.mlp
               else {"no_op": False, "replace_with_linear": False, "ffn_mult": ffn_mult_for(self.mlp_out, hidden)})
        return {"attention": attention, "ffn": ffn}


def _head_dim(shape: ModelShape) -> int:
    return shape.layers[0].head_dim if shape.layers else shape.hidden // shape.base_heads


def exported_hidden(shape: ModelShape) -> int:
    """H': the hidden size written, the smallest multiple of head_dim >= the model's hidden size that holds every
    layer's query heads (DeciLM readers take head_dim = hidden_size / num_attention_heads); see the module doc."""
    head_dim = _head_dim(shape)
    need = max(shape.hidden, max((s.heads for s in shape.layers), default=0) * head_dim)
    return -(-need // head_dim) * head_dim


def global_heads(shape: ModelShape) -> int:
    """H: the one query-head count every attention layer gets (DeciLM readers take head_dim = hidden / H)."""
    return exported_hidden(shape) // _head_dim(shape)


def _kv_layout(index: int, s: LayerShape, heads: int) -> tuple[int, int]:
    """(KV groups written, query heads per group written) for a layer with `s.kv_heads` groups of `s.group_size`.

    The fewest groups >= the real ones whose size divides `heads` and holds a real group's query heads.
    """
    for kv_out in range(s.kv_heads, heads + 1):
        if heads % kv_out == 0 and heads // kv_out >= s.group_size:
            return kv_out, heads // kv_out
    raise UserError(f"vLLM export: layer {index} has {s.kv_heads} KV groups of {s.group_size} query heads, which "
                    f"no n_heads_in_group dividing the global {heads} query heads can hold; prune whole KV groups "
                    "so that the kept ones divide it")


def decilm_layout(shape: ModelShape) -> tuple[int, list[BlockLayout]]:
    """Global query-head count and per-layer layout of `shape` in the DeciLM format (pure: shapes only).

    Raises:
        UserError: a layer the format cannot hold even with padding.
    """
    heads = global_heads(shape)
    layout = []
    for i, s in enumerate(shape.layers):
        if s.heads > heads:
            raise UserError(f"vLLM export: layer {i} has {s.heads} query heads, more than hidden/head_dim = {heads}")
        kv_out, group_out = _kv_layout(i, s, heads) if s.has_attention else (0, 0)
        mlp_out = -(-s.mlp // FFN_GRID) * FFN_GRID
        layout.append(BlockLayout(s.heads, s.kv_heads if s.has_attention else 0, kv_out, group_out, s.mlp, mlp_out))
    return heads, layout


def layout_adjustments(shape: ModelShape, heads: int, layout: list[BlockLayout]) -> list[Adjustment]:
    """What `layout` pads or densifies, layer by layer, with its parameter and per-token FLOP cost."""
    # heads / KV / MLP padding at the source's hidden size; the zero channels' share of every tensor (padded
    # ones included) is hidden_padding's, so nothing is counted twice
    hidden, adjustments = shape.hidden, []
    if exported_hidden(shape) != hidden:
        adjustments.append(hidden_padding(shape, exported_hidden(shape), layout))
    for i, (s, b) in enumerate(zip(shape.layers, layout)):
        hd = s.head_dim
        if b.heads and (b.heads != heads or b.kv_out != b.kv_heads):
            params = 2 * (heads - b.heads) * hd * hidden + 2 * (b.kv_out - b.kv_heads) * hd * hidden
            what = (f"layer {i}: {b.heads} query heads in {b.kv_heads} KV groups padded to {heads} in {b.kv_out} "
                    f"(n_heads_in_group {b.group_out}) with zero heads (exact; each zero head also costs "
                    f"4*{hd}*context attention FLOPs per token)")
            adjustments.append(Adjustment(what, params, 2 * params))
        if b.mlp and b.mlp_out != b.mlp:
            params = 3 * (b.mlp_out - b.mlp) * hidden
            adjustments.append(Adjustment(f"layer {i}: MLP width {b.mlp} padded to {b.mlp_out} (a multiple of "
                                          f"{FFN_GRID}) with zero neurons (exact)", params, 2 * params))
        for rel, rank in sorted(s.low_rank.items()):
            out_f, in_f = source_linear_dims(rel, s, hidden)
            params = out_f * in_f - rank * (out_f + in_f)
            adjustments.append(Adjustment(f"layer {i}: {rel} rank-{rank} factors multiplied back into a dense "
                                          f"{out_f}x{in_f} weight (exact)", params, 2 * params))
    return adjustments


def hidden_padding(shape: ModelShape, hidden: int, layout: list[BlockLayout]) -> Adjustment:
    """What padding the residual stream from shape.hidden to `hidden` zero channels costs: every tensor's
    hidden-size side, with the layers' padded head / KV / MLP sizes."""
    extra, hd = hidden - shape.hidden, _head_dim(shape)
    heads = hidden // hd
    linear = sum(2 * heads * hd + 2 * b.kv_out * hd for b in layout if b.heads)
    linear += sum(3 * b.mlp_out for b in layout if b.mlp) + shape.vocab  # + the LM head (tied: the embedding)
    norms = 1 + sum(bool(b.heads) + bool(b.mlp) for b in layout)
    params = extra * (linear + norms + (0 if shape.tied_embeddings else shape.vocab))
    return Adjustment(f"hidden size {shape.hidden} padded to {hidden} with zero channels (DeciLM readers take "
                      f"head_dim = hidden_size / num_attention_heads: hidden must be {hd} x a head count that holds "
                      "every layer's query heads; norms rescaled to match, exact)", params, 2 * extra * linear)


def source_linear_dims(rel: str, s: LayerShape, hidden: int) -> tuple[int, int]:
    """(out, in) of a projection as the source holds it (before padding)."""
    name = rel.rsplit(".", 1)[-1]
    dims = {"q_proj": (s.heads * s.head_dim, hidden), "k_proj": (s.kv_heads * s.head_dim, hidden),
            "v_proj": (s.kv_heads * s.head_dim, hidden), "o_proj": (hidden, s.heads * s.head_dim),
            "gate_proj": (s.mlp, hidden), "up_proj": (s.mlp, hidden), "down_proj": (hidden, s.mlp)}
    return dims[name]


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if rows > t.shape[0] else t


def _attention_tensors(attn, spec, b: BlockLayout, heads: int, hd: int, hidden: int) -> dict[str, torch.Tensor]:
    """q/k/v/o of one layer laid out for `heads` global query heads in `b.kv_out` groups of `b.group_out`."""
    # real query head t of group j goes to slot j * group_out + t; every other slot stays zero
    slots = torch.tensor([j * b.group_out + t for j in range(b.kv_heads) for t in range(b.group)])
    out: dict[str, torch.Tensor] = {}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        w, bias = dense_weight(ops.get_module(attn, getattr(spec, name[0])))
        if name == "q_proj":
            new = w.new_zeros(heads, hd, hidden)  # (H, hs, C)
            new[slots] = w.reshape(b.heads, hd, hidden)
            w = new.reshape(heads * hd, hidden)
            if bias is not None:
                nb = bias.new_zeros(heads, hd)
                nb[slots] = bias.reshape(b.heads, hd)
                bias = nb.reshape(-1)
        elif name == "o_proj":
            new = w.new_zeros(hidden, heads, hd)  # (C, H, hs)
            new[:, slots] = w.reshape(hidden, b.heads, hd)
            w = new.reshape(hidden, heads * hd)
        else:  # zero KV groups at the end
            w = _pad_rows(w, b.kv_out * hd)
            bias = None if bias is None else _pad_rows(bias, b.kv_out * hd)
        out[f"{name}.weight"] = w
        if bias is not None:
            out[f"{name}.bias"] = bias
    return out


def _mlp_tensors(mlp, spec, b: BlockLayout) -> dict[str, torch.Tensor]:
    """gate/up/down of one layer, zero neurons appended up to `b.mlp_out`."""
    out: dict[str, torch.Tensor] = {}
    for name, attr in (("gate_proj", spec.gate), ("up_proj", spec.up), ("down_proj", spec.down)):
        w, bias = dense_weight(ops.get_module(mlp, attr))
        if name == "down_proj":
            w = _pad_rows(w.t(), b.mlp_out).t()
        else:
            w = _pad_rows(w, b.mlp_out)
            bias = None if bias is None else _pad_rows(bias, b.mlp_out)
        out[f"{name}.weight"] = w
        if bias is not None:
            out[f"{name}.bias"] = bias
    return out


def decilm_tensors(model, shape: ModelShape, heads: int, layout: list[BlockLayout]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of `model` under plain Llama names, padded to `layout` (tied lm_head written once), one at a
    time: a layer's padded copies exist only while that layer is written (see safetensors_shards)."""
    spec = shape.spec
    hidden = exported_hidden(shape)

    def padded(name: str, t: torch.Tensor) -> tuple[str, torch.Tensor]:
        return name, (t if hidden == shape.hidden else pad_hidden_tensor(name, t, shape.hidden, hidden))

    yield padded("model.embed_tokens.weight", ops.get_module(model, spec.embed).weight)
    yield padded("model.norm.weight", ops.get_module(model, spec.final_norm).weight)
    if not shape.tied_embeddings:
        yield padded("lm_head.weight", ops.get_module(model, spec.lm_head).weight)
    for i, (layer, s, b) in enumerate(zip(ops.get_module(model, spec.layers), shape.layers, layout)):
        prefix = f"model.layers.{i}."
        if b.heads:
            yield padded(prefix + "input_layernorm.weight", ops.get_module(layer, spec.attn_norms[0]).weight)
            attn = ops.get_module(layer, spec.attn)
            for k, v in _attention_tensors(attn, spec, b, heads, s.head_dim, shape.hidden).items():
                yield padded(prefix + "self_attn." + k, v)
        if b.mlp:
            yield padded(prefix + "post_attention_layernorm.weight", ops.get_module(layer, spec.mlp_norms[0]).weight)
            for k, v in _mlp_tensors(ops.get_module(layer, spec.mlp), spec, b).items():
                yield padded(prefix + "mlp." + k, v)


_READS_HIDDEN = ("embed_tokens.weight", "lm_head.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight",
                 "gate_proj.weight", "up_proj.weight")  # (rows, hidden): zero columns
_WRITES_HIDDEN = ("o_proj.weight", "down_proj.weight", "o_proj.bias", "down_proj.bias")  # (hidden, ...): zero rows


def pad_hidden_tensor(name: str, t: torch.Tensor, hidden: int, padded: int) -> torch.Tensor:
    """One tensor with `padded - hidden` zero residual channels appended (see the module docstring)."""
    extra = padded - hidden
    if name.endswith(_READS_HIDDEN):
        return torch.cat([t, t.new_zeros(t.shape[0], extra)], dim=1)
    if name.endswith(_WRITES_HIDDEN):
        return _pad_rows(t, padded)
    if name.endswith("norm.weight"):  # every norm of the DeciLM layout is over the residual stream
        return torch.cat([t * (hidden / padded) ** 0.5, t.new_zeros(extra)])
    return t


def check_supported(config_dict: dict, shape: ModelShape) -> None:
    """Refuse what the DeciLM layout cannot express at all (one line each)."""
    if shape.spec.cfg_experts:
        raise UserError(f"vLLM export: the DeciLM layout has no experts, so {shape.spec.family} models (MoE) cannot "
                        "be written in it; the `apply` output of a uniform expert cut is a plain Qwen3-MoE / Mixtral "
                        "checkpoint instead")
    if shape.spec.family != "llama":
        raise UserError(f"vLLM export supports Llama-family models (llama, mistral); this one is "
                        f"{config_dict.get('model_type')!r}")
    if config_dict.get("hidden_act", "silu") != "silu":
        raise UserError(f"vLLM export: activation {config_dict.get('hidden_act')!r} is not supported (silu only)")
    if config_dict.get("sliding_window"):
        raise UserError("vLLM export: sliding-window attention cannot be expressed in the DeciLM layout")


def decilm_config(config_dict: dict, shape: ModelShape, heads: int, layout: list[BlockLayout],
                  dtype: torch.dtype) -> dict:
    """config.json of the export: the Llama globals, block_configs, auto_map, new and legacy rope keys."""
    keep = ("vocab_size", "hidden_size", "rms_norm_eps", "max_position_embeddings", "initializer_range",
            "bos_token_id", "eos_token_id", "pad_token_id", "rope_parameters", "rope_theta", "rope_scaling",
            "attention_bias", "mlp_bias", "hidden_act")
    cfg = {k: config_dict[k] for k in keep if k in config_dict}
    hidden = exported_hidden(shape)
    if hidden != shape.hidden:  # zero channels: the norms normalise as before (see pad_hidden_tensor)
        cfg["hidden_size"] = hidden
        cfg["rms_norm_eps"] = config_dict.get("rms_norm_eps", 1e-6) * shape.hidden / hidden
    mlps = [b.mlp_out for b in layout if b.mlp]
    kvs = [b.kv_out for b in layout if b.heads]
    cfg.update(
        architectures=[ARCHITECTURE],
        model_type=MODEL_TYPE,
        auto_map={"AutoConfig": "configuration_decilm.DeciLMConfig"},
        num_hidden_layers=shape.num_layers,
        num_attention_heads=heads,
        # informational globals (readers use block_configs): the widest layer
        num_key_value_heads=max(kvs, default=1),
        intermediate_size=max(mlps, default=0),
        head_dim=hidden // heads,
        hidden_act=config_dict.get("hidden_act", "silu"),
        tie_word_embeddings=shape.tied_embeddings,
        dtype=str(dtype).removeprefix("torch."),
        torch_dtype=str(dtype).removeprefix("torch."),  # the key transformers 4.x and vLLM's older code read
        block_configs=[b.block_config(hidden) for b in layout],
    )
    cfg.update({k: v for k, v in legacy_rope_keys(config_dict).items() if k not in cfg})
    return dict(sorted(cfg.items()))


def export_vllm(
    source: str,
    out_path: str | Path,
    *,
    dtype: str = "auto",
    overwrite: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    progress=None,
) -> ExportReport:
    """Write `source` (any model `surgery.load` reads) as a vLLM DeciLM directory at `out_path`, atomically.

    Args:
        dtype: float32, bfloat16, float16 or auto (the source's dtype).
        max_shard_size: Shard the weights past this size as save_pretrained does ("5GB": model-0000i-of-0000n
            .safetensors + model.safetensors.index.json); tensors are written one at a time.
        progress: called with one-line status messages.

    Returns:
        The ExportReport: parameters as served, bytes, serve command, every padding with its cost.

    Raises:
        UserError: bad source or dtype, unwritable or occupied output, or a shape the layout cannot hold.
    """
    from surgery.loading import load_model, parse_dtype

    say = progress or (lambda message: None)
    out = Path(out_path)
    parse_dtype(dtype)  # cheap checks first: nothing loaded in vain
    parse_shard_size(max_shard_size)
    check_output_dir(out, overwrite)
    say(f"loading {source}")
    loaded = load_model(source, dtype="float32", allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                        progress=progress)
    torch_dtype = parse_dtype(dtype, loaded.config_dict)
    shape = shape_from_config(loaded.config_dict)
    check_supported(loaded.config_dict, shape)
    heads, layout = decilm_layout(shape)
    adjustments = layout_adjustments(shape, heads, layout)
    config = decilm_config(loaded.config_dict, shape, heads, layout, torch_dtype)
    report = ExportReport(target="vllm", out=out, architecture=ARCHITECTURE, dtype=str(torch_dtype).split(".")[-1],
                          params=0, file_bytes=0, serve_command=serve_command(out), adjustments=adjustments)

    say(f"writing {out}")
    with atomic_dir(out, overwrite) as tmp, torch.no_grad():
        report.params = write_sharded(lambda: decilm_tensors(loaded.model, shape, heads, layout), tmp, torch_dtype,
                                      max_shard_size, progress=progress)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        shutil.copyfile(CONFIG_CODE, tmp / "configuration_decilm.py")
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        generation = Path(loaded.resolved.path) / "generation_config.json"
        if generation.is_file():
            shutil.copyfile(generation, tmp / "generation_config.json")
        report.file_bytes = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
        manifest = {**report.to_dict(), "version": 1, "source": str(source),
                    "readers": ["vLLM DeciLMForCausalLM", "mlx-lm nemotron-nas",
                                "transformers AutoConfig (trust_remote_code)"]}
        manifest.pop("out")
        write_text_atomic(tmp / EXPORT_MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _fsync_dir(tmp)
    return report
