"""Inspect a model without loading it: per-layer shapes, parameter counts and FLOPs per token.

Only metadata is read: config.json plus the safetensors headers (an HF directory, single-file or sharded), or the
header of a .gguf file. No tensor data is touched, so inspecting a 70B checkpoint costs the same few milliseconds
and kilobytes as a 135M one.

The per-layer numbers come from the TENSOR SHAPES, found through the family's ArchSpec names, and are then
cross-checked against `surgery.shapes.shape_from_config` (which also reads the `surgery_layers` entries of pruned
checkpoints): a checkpoint whose tensors disagree with its config is reported as a SourceError naming the layer,
instead of failing later inside `from_pretrained` or, worse, loading silently wrong.

Why not `gguf.GGUFReader` / transformers' `load_gguf_checkpoint(return_tensors=False)`: neither reads tensor data,
but GGUFReader builds numpy views for every tokenizer string (about 100k of them for a 50k vocabulary), which took
2.4 s and 150 MB on the 135M demo file. The small reader below skips those arrays, and the config keys it needs are
mapped through the ArchSpec's `cfg_*` names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import struct
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from surgery.arch import ArchSpec, spec_for_config
from surgery.errors import SourceError
from surgery.shapes import LayerShape, shape_from_config
from surgery.shards import INDEX_NAME, read_index

if TYPE_CHECKING:
    from surgery.sources import ResolvedSource

# Bytes per element of safetensors dtypes (sub-byte float formats are left out: their size is taken from the
# offsets without a check).
_ST_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
_MAX_HEADER = 100 * 1024 * 1024  # the limit the safetensors library itself enforces
# Tensors some older checkpoints carry that are buffers, not parameters (GPT-2's causal mask, Llama's RoPE table):
# their bytes count, their elements are not parameters. Candidates for an ArchSpec field.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a header describes it. `shape` is in PyTorch order (GGUF dims are reversed to match)."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class LayerReport:
    """One decoder layer, as its tensors describe it.

    Attributes:
        index: current position of the layer in the checkpoint.
        source_layer: index in the model it was cut from (`surgery_layers`), when known.
        heads, kv_heads, head_dim: attention shape; `heads == 0` when the attention sub-block was removed.
        mlp: MLP width (neurons); 0 when the MLP sub-block was removed.
        low_rank: factorised Linears, path relative to the layer ("mlp.down_proj") -> rank.
        params_attention, params_mlp: parameters under the attention / MLP module (biases and q/k norms included).
        params_norms: the layer's other parameters (its layer norms).
        flops_per_token: see `inspect_model`.
    """

    index: int
    source_layer: int | None
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    has_attention: bool
    has_mlp: bool
    low_rank: dict[str, int]
    params_attention: int
    params_mlp: int
    params_norms: int
    params_total: int
    flops_per_token: int


@dataclass
class ModelReport:
    """What `inspect_model` found; `to_dict()` gives plain JSON-serialisable data.

    Attributes:
        source: the path inspected. format: "safetensors" or "gguf".
        dtypes: tensor data bytes per dtype ("BF16", "Q4_1", ...); `bytes` is their sum.
        params_total: every parameter, a tied embedding counted once.
        params_embedding: input embedding plus an untied lm_head.
        params_non_embedding: params_total - params_embedding.
        flops_per_token: forward FLOPs for one token at `context` tokens of context (see `inspect_model`).
    """

    source: str
    format: str
    family: str
    model_type: str
    dtypes: dict[str, int]
    bytes: int
    vocab: int
    hidden: int
    num_layers: int
    tied_embeddings: bool
    context: int
    params_total: int
    params_embedding: int
    params_non_embedding: int
    flops_per_token: int
    layers: list[LayerReport] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The report as nested dicts and lists of str / int / bool / None (json.dumps-able)."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# safetensors headers


def read_safetensors_header(path: Path | str) -> dict[str, TensorInfo]:
    """Tensor infos of one .safetensors file, from its header alone.

    Layout: 8 bytes little-endian u64 N, N bytes of JSON {name: {dtype, shape, data_offsets}, "__metadata__": ...},
    then the data buffer (offsets are relative to its start).

    Raises:
        SourceError: the file is missing, truncated, or its header is not a valid safetensors header.
    """
    path = Path(path)

    def corrupt(why: str) -> SourceError:
        return SourceError(f"corrupt safetensors header: {path} ({why})")

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise corrupt(f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise corrupt(f"header length {n} does not fit in a {size}-byte file")
            raw = f.read(n)
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")

    data_size = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"bad entry for tensor {name!r}") from None
        if not 0 <= start <= end <= data_size:
            raise corrupt(f"tensor {name!r} lies outside the file (file truncated?)")
        item = _ST_DTYPE_BYTES.get(dtype)
        if item is not None and math.prod(shape) * item != end - start:
            raise corrupt(f"tensor {name!r}: {dtype} {list(shape)} does not match its {end - start} bytes")
        tensors[name] = TensorInfo(dtype, shape, end - start)
    return tensors


def read_checkpoint_headers(directory: Path | str) -> dict[str, TensorInfo]:
    """Tensor infos of an HF directory: sharded (model.safetensors.index.json) or a single model.safetensors."""
    directory = Path(directory)
    weight_map = read_index(directory)  # checked: every shard inside the directory
    if weight_map is not None:
        index_path = directory / INDEX_NAME
        tensors: dict[str, TensorInfo] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_safetensors_header(directory / shard))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise SourceError(f"{index_path}: {len(missing)} tensor(s) listed but in no shard, e.g. {missing[0]!r}")
        return tensors
    single = directory / "model.safetensors"
    if single.is_file():
        return read_safetensors_header(single)
    raise SourceError(f"no model.safetensors or model.safetensors.index.json in {directory} (only safetensors is read)")


# ----------------------------------------------------------------------------------------------------------------
# GGUF headers

_GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_U64 = struct.Struct("<Q")
_GGUF_SMALL_ARRAY = 64  # longer arrays (tokenizer vocab, merges) are skipped and kept as their length only


@dataclass(frozen=True)
class SkippedArray:
    """A long GGUF metadata array that was stepped over, not parsed."""

    length: int


class _GGUFCursor:
    """Sequential little-endian reads from a memory-mapped GGUF header; any overrun is a corrupt header."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.path, self.pos = buf, path, 0

    def corrupt(self, why: str) -> SourceError:
        return SourceError(f"corrupt gguf header: {self.path} ({why})")

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise self.corrupt(f"ends inside the header at byte {self.pos}")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, keep: bool = True) -> str | None:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise self.corrupt(f"string of {n} bytes runs past the end of the file")
        start, self.pos = self.pos, self.pos + n
        return bytes(self.buf[start : self.pos]).decode("utf-8", errors="replace") if keep else None

    def value(self, vtype: int, keep: bool = True):
        if vtype in _GGUF_SCALAR:
            return self.unpack(_GGUF_SCALAR[vtype])
        if vtype == _GGUF_STRING:
            return self.string(keep)
        if vtype != _GGUF_ARRAY:
            raise self.corrupt(f"unknown value type {vtype}")
        etype, count = self.unpack("<I"), self.unpack("<Q")
        keep = keep and count <= _GGUF_SMALL_ARRAY
        if etype in _GGUF_SCALAR and not keep:  # fixed-size elements: jump over them
            self.pos += count * struct.calcsize(_GGUF_SCALAR[etype])
        elif etype == _GGUF_STRING and not keep:  # the vocabulary: hop from length to length, nothing decoded
            buf, pos, u64 = self.buf, self.pos, _U64.unpack_from
            try:
                for _ in range(count):
                    pos += 8 + u64(buf, pos)[0]
            except struct.error:
                raise self.corrupt("string array runs past the end of the file") from None
            self.pos = pos
        else:
            items = [self.value(etype, keep) for _ in range(count)]
            if keep:
                return items
        if self.pos > len(self.buf):
            raise self.corrupt("array runs past the end of the file")
        return SkippedArray(count)


def read_gguf_header(path: Path | str) -> tuple[dict, dict[str, TensorInfo]]:
    """Metadata and tensor infos (by GGUF name, PyTorch dim order) of a .gguf file, from its header alone.

    Layout (GGUF v2/v3): "GGUF", u32 version, u64 tensor count, u64 metadata count, the metadata key/values,
    then per tensor: name, u32 n_dims, u64 dims (innermost first), u32 ggml type, u64 offset into the aligned
    data section. Long metadata arrays come back as `SkippedArray(length)`.

    Raises:
        SourceError: the file is not a readable GGUF v2/v3 file or its header is truncated.
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # lazy: only GGUF sources need gguf

    path = Path(path)
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cur = _GGUFCursor(buf, path)
            if len(buf) < 24 or buf[:4] != b"GGUF":
                raise cur.corrupt("no GGUF magic")
            cur.pos = 4
            version, n_tensors, n_kv = cur.unpack("<I"), cur.unpack("<Q"), cur.unpack("<Q")
            if version not in (2, 3):
                raise cur.corrupt(f"unsupported GGUF version {version}")
            meta = {}
            for _ in range(n_kv):
                key = cur.string()
                meta[key] = cur.value(cur.unpack("<I"))
            raw = []
            for _ in range(n_tensors):
                name = cur.string()
                dims = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
                raw.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
            align = int(meta.get("general.alignment", 32))
            data_start = -(-cur.pos // align) * align
            file_size = len(buf)
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:  # mmap of an empty file
        raise SourceError(f"corrupt gguf header: {path} ({e})") from None

    tensors: dict[str, TensorInfo] = {}
    for name, dims, ggml_type, offset in raw:
        try:
            qtype = GGMLQuantizationType(ggml_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise cur.corrupt(f"tensor {name!r} has unknown ggml type {ggml_type}") from None
        numel = math.prod(dims)
        nbytes = numel // block * type_size
        if data_start + offset + nbytes > file_size:
            raise cur.corrupt(f"tensor {name!r} lies outside the file (file truncated?)")
        tensors[name] = TensorInfo(qtype.name, tuple(reversed(dims)), nbytes)
    return meta, tensors


def gguf_config(meta: dict, tensors: dict[str, TensorInfo]) -> dict:
    """A config.json-like dict from GGUF metadata, with the field names of the family's ArchSpec.

    Raises:
        UnsupportedModelError: the GGUF architecture has no family in surgery.arch.
    """
    arch = meta.get("general.architecture")
    model_type = {"gemma3": "gemma3_text"}.get(arch, arch)  # GGUF keeps only Gemma 3's text tower
    spec = spec_for_config({"model_type": model_type})
    cfg: dict = {"model_type": model_type}
    for gguf_key, cfg_key in (
        ("block_count", spec.cfg_layers),
        ("embedding_length", spec.cfg_hidden),
        ("feed_forward_length", spec.cfg_mlp),
        ("attention.head_count", spec.cfg_heads),
        ("attention.head_count_kv", spec.cfg_kv_heads),
        ("attention.key_length", "head_dim"),  # Qwen 3 / Gemma 3 head_dim differs from hidden / heads
        ("attention.sliding_window", "sliding_window"),
        ("context_length", "max_position_embeddings"),
        ("vocab_size", "vocab_size"),
    ):
        value = meta.get(f"{arch}.{gguf_key}")
        if cfg_key and isinstance(value, int):
            cfg[cfg_key] = value
    if "vocab_size" not in cfg:  # most converters leave it to the tokenizer (or the embedding) to say
        tokens = meta.get("tokenizer.ggml.tokens")
        if isinstance(tokens, (SkippedArray, list)):
            cfg["vocab_size"] = tokens.length if isinstance(tokens, SkippedArray) else len(tokens)
        elif "token_embd.weight" in tensors:
            cfg["vocab_size"] = tensors["token_embd.weight"].shape[0]
    # no output.weight in the file means the embedding is reused as lm_head (what transformers concludes too)
    cfg["tie_word_embeddings"] = "output.weight" not in tensors
    return cfg


def _gguf_to_hf_names(spec: ArchSpec, tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """Rename GGUF tensors ("blk.3.attn_q.weight") to the HF names the ArchSpec uses ("model.layers.3...").

    GGUF names are family-independent, so one table resolved through the spec covers every family. Names it does
    not know are kept as they are (they still count). GPT-2's converter stores Conv1D weights transposed to (out,
    in): they are flipped back so the shapes read like the HF checkpoint's.
    """
    attn, mlp = spec.attn, spec.mlp
    per_layer = {
        "attn_q": spec.q and f"{attn}.{spec.q}",
        "attn_k": spec.k and f"{attn}.{spec.k}",
        "attn_v": spec.v and f"{attn}.{spec.v}",
        "attn_qkv": spec.qkv and f"{attn}.{spec.qkv}",
        "attn_output": f"{attn}.{spec.o}",
        "attn_q_norm": f"{attn}.q_norm",
        "attn_k_norm": f"{attn}.k_norm",
        "ffn_gate": spec.gate and f"{mlp}.{spec.gate}",
        "ffn_up": f"{mlp}.{spec.gate_up or spec.up}",  # Phi-3's fused [gate | up] is stored as ffn_up
        "ffn_down": f"{mlp}.{spec.down}",
        "attn_norm": spec.attn_norms[0] if spec.attn_norms else None,
        "post_attention_norm": spec.attn_norms[1] if len(spec.attn_norms) > 1 else None,
        "ffn_norm": spec.mlp_norms[0] if spec.mlp_norms else None,
        "post_ffw_norm": spec.mlp_norms[1] if len(spec.mlp_norms) > 1 else None,
    }
    top = {"token_embd": spec.embed, "output": spec.lm_head, "output_norm": spec.final_norm}
    conv1d_parts = {"attn_qkv", "attn_output", "ffn_up", "ffn_down"}
    out: dict[str, TensorInfo] = {}
    for name, info in tensors.items():
        stem, _, kind = name.rpartition(".")  # kind: weight / bias
        parts = stem.split(".")
        new = None
        if len(parts) == 3 and parts[0] == "blk" and per_layer.get(parts[2]):
            new = f"{spec.layer_prefix(int(parts[1]))}.{per_layer[parts[2]]}.{kind}"
            if spec.conv1d and parts[2] in conv1d_parts and len(info.shape) == 2:
                info = dataclasses.replace(info, shape=info.shape[::-1])
        elif len(parts) == 1 and stem in top:
            new = f"{top[stem]}.{kind}"
        out[new or name] = info
    return out


# ----------------------------------------------------------------------------------------------------------------
# per-layer analysis


@dataclass(frozen=True)
class _Linear:
    out_features: int
    in_features: int
    rank: int | None  # set for a LowRankLinear
    macs: int  # multiply-accumulates per token: out*in, or r*(in+out) when factorised


def _linear(tensors: dict[str, TensorInfo], path: str, conv1d: bool, where: str) -> _Linear | None:
    """The Linear (plain, Conv1D or LowRankLinear) at `path`, or None when absent or only a placeholder."""
    a, b = tensors.get(f"{path}.a.weight"), tensors.get(f"{path}.b.weight")
    if a is not None and b is not None:
        # LowRankLinear: a (r, in), b (out, r); nn.Linear layout even for GPT-2
        if len(a.shape) != 2 or len(b.shape) != 2 or b.shape[1] != a.shape[0]:
            raise SourceError(f"{where}: low-rank factors of {path} do not chain: a {a.shape}, b {b.shape}")
        return _Linear(b.shape[0], a.shape[1], a.shape[0], a.numel + b.numel)
    w = tensors.get(f"{path}.weight")
    if w is None or w.numel == 0:  # zero-length: the placeholder of a removed sub-block
        return None
    if len(w.shape) != 2:
        raise SourceError(f"{where}: {path}.weight has shape {list(w.shape)}, expected a matrix")
    n_out, n_in = w.shape[::-1] if conv1d else w.shape  # Conv1D stores (in, out)
    return _Linear(n_out, n_in, None, w.numel)


def _attention(tensors, spec: ArchSpec, prefix: str, head_dim: int, where: str):
    """(heads, kv_heads, linears by name) of one attention block; (0, 0, {}) when it was removed."""
    path = lambda name: f"{prefix}.{spec.attn}.{name}"  # noqa: E731
    o = _linear(tensors, path(spec.o), spec.conv1d, where)
    if o is None:
        return 0, 0, {}
    # o's input features are the concatenated query heads, in every layout (fused or not, low rank or not)
    if o.in_features % head_dim:
        raise SourceError(f"{where}: {spec.o} has {o.in_features} inputs, not a multiple of head_dim {head_dim}")
    heads = o.in_features // head_dim
    linears = {spec.o: o}
    for name in spec.attn_linears[:-1]:
        lin = _linear(tensors, path(name), spec.conv1d, where)
        if lin is None:
            raise SourceError(f"{where}: attention has {spec.o} but no {name}")
        linears[name] = lin
    if spec.qkv:
        rows = linears[spec.qkv].out_features  # (Hq + 2 Hkv) * head_dim
        kv_heads, rest = divmod(rows // head_dim - heads, 2)
        ok = rows == (heads + 2 * kv_heads) * head_dim and not rest
    else:
        q, k, v = linears[spec.q], linears[spec.k], linears[spec.v]
        kv_heads = k.out_features // head_dim
        ok = q.out_features == heads * head_dim and k.out_features == v.out_features == kv_heads * head_dim
    if not ok or kv_heads <= 0:
        shapes = ", ".join(f"{n} {lin.out_features}x{lin.in_features}" for n, lin in linears.items())
        raise SourceError(f"{where}: attention projections do not fit head_dim {head_dim}: {shapes}")
    return heads, kv_heads, linears


def _mlp(tensors, spec: ArchSpec, prefix: str, where: str):
    """(width, linears by name) of one MLP block; (0, {}) when it was removed."""
    path = lambda name: f"{prefix}.{spec.mlp}.{name}"  # noqa: E731
    down = _linear(tensors, path(spec.down), spec.conv1d, where)
    if down is None:
        return 0, {}
    width = down.in_features
    linears = {spec.down: down}
    for name in spec.mlp_linears[:-1]:
        lin = _linear(tensors, path(name), spec.conv1d, where)
        expected = 2 * width if name == spec.gate_up else width  # fused rows are [gate | up]
        if lin is None or lin.out_features != expected:
            got = "missing" if lin is None else f"{lin.out_features} outputs"
            raise SourceError(f"{where}: MLP {name} is {got}, expected {expected} for {spec.down}'s {width} inputs")
        linears[name] = lin
    return width, linears


def _moe_macs(tensors, spec: ArchSpec, prefix: str, experts: int, top_k: int, where: str) -> int:
    """Multiply-adds per token of one MoE block (router + top_k experts), checking the expert count on disk.

    Checkpoints hold experts one by one (`experts.3.gate_proj.weight`, Mixtral `experts.3.w1.weight`: what
    save_pretrained writes in transformers 5) or fused (`experts.gate_up_proj`, leading dimension = experts).
    """
    base = f"{prefix}.{spec.moe_on_disk or spec.mlp}."
    router = tensors.get(f"{base}{spec.router}.weight")
    parts = {n[len(base) + len(spec.experts) + 1:]: info for n, info in tensors.items()
             if n.startswith(f"{base}{spec.experts}.") and not n.endswith(_BUFFER_SUFFIXES)}
    fused = "gate_up_proj" in parts
    found = parts["gate_up_proj"].shape[0] if fused and parts["gate_up_proj"].shape else \
        len({p.split(".")[0] for p in parts if p.split(".")[0].isdigit()})
    if router is None or not router.shape or router.shape[0] != experts or found != experts:
        got = "no router" if router is None else f"a router of {router.shape[0] if router.shape else 0} rows"
        raise SourceError(f"{where}: config.json says {experts} experts but the weights hold {found} experts and "
                          f"{got} ({base}{spec.router}.weight)")
    return router.numel + top_k * sum(info.numel for info in parts.values()) // experts


def _check_against_config(where: str, got: LayerShape, want: LayerShape) -> None:
    """Raise SourceError when the tensors and config.json describe the layer differently."""
    pairs = [("query heads", got.heads, want.heads), ("MLP width", got.mlp, want.mlp)]
    if got.heads and want.heads:  # a removed attention's kv_heads entry carries no meaning
        pairs.append(("KV heads", got.kv_heads, want.kv_heads))
    pairs.append(("low-rank modules", got.low_rank, want.low_rank))
    for what, tensor_value, config_value in pairs:
        if tensor_value != config_value:
            raise SourceError(f"{where}: tensors give {what} {tensor_value} but config.json says {config_value}")


def attention_span(cfg: dict, index: int, num_layers: int, context: int) -> int:
    """Tokens one query attends to: `context`, or the sliding window for Gemma-3-style sliding layers."""
    types, window = cfg.get("layer_types"), cfg.get("sliding_window")
    if window and isinstance(types, list) and len(types) == num_layers and types[index] == "sliding_attention":
        return min(context, int(window))
    return context


# ----------------------------------------------------------------------------------------------------------------
# entry point


def _read_source(path: Path) -> tuple[str, dict, dict[str, TensorInfo]]:
    """(format, config dict, tensor infos with HF names) of a directory or a .gguf file."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        meta, raw = read_gguf_header(path)
        cfg = gguf_config(meta, raw)
        return "gguf", cfg, _gguf_to_hf_names(spec_for_config(cfg), raw)
    if not path.is_dir():
        raise SourceError(f"not a model directory or .gguf file: {path}")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise SourceError(f"no config.json in {path}")
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise SourceError(f"unreadable config.json: {config_path} ({e})") from None
    spec = spec_for_config(cfg)  # unsupported family: fail before reading any header
    tensors = read_checkpoint_headers(path)
    base = spec.layers.partition(".")[0]  # "model" / "transformer"
    if "." in spec.layers and not any(n.startswith(base + ".") for n in tensors):
        # a checkpoint of the bare base model (old GPT-2 uploads: "h.0.attn...", "wte.weight"): add the prefix
        tensors = {n if n.startswith(spec.lm_head + ".") else f"{base}.{n}": t for n, t in tensors.items()}
    return "safetensors", cfg, tensors


def inspect_model(path: Path | str, *, context: int = 2048) -> ModelReport:
    """Shapes, parameter counts and FLOPs per token of a model, from its metadata alone (no tensor data read).

    FLOPs per token (forward pass, one token that attends to `context` tokens):

        per layer  = 2 * MACs(every Linear of the layer)  +  2 * 2 * heads * head_dim * span
        model      = sum(per layer)  +  2 * vocab * hidden   (lm_head, tied or not)

    where MACs(Linear) = out * in (r * (in + out) for a low-rank pair), the second term counts q.k scores and the
    weighted sum of values, and span = `context` (or the sliding window on a sliding-attention layer when it is
    shorter). Biases, norms, activations, softmax and the embedding lookup are left out (all O(hidden) per token).
    Averaged over a whole window of `context` tokens the attention term is about half of this.

    Args:
        path: an HF model directory (config.json + safetensors, sharded or not) or a .gguf file.
        context: tokens of context for the attention term of the FLOPs.

    Returns:
        A ModelReport; `report.to_dict()` for JSON.

    Raises:
        SourceError: missing config.json or weights, a corrupt header, or tensors that disagree with the config
            (the message names the layer).
        UnsupportedModelError: the model_type has no family in surgery.arch.
    """
    path = Path(path)
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    fmt, cfg, tensors = _read_source(path)
    shape = shape_from_config(cfg)  # also validates the family and surgery_layers
    spec = shape.spec
    where_file = path.name

    # one pass: bucket tensors per layer; buffers count in bytes but not in parameters
    layers_prefix = spec.layers + "."
    per_layer: dict[int, dict[str, TensorInfo]] = {}
    params_outside_layers = 0
    for name, info in tensors.items():
        if name.startswith(layers_prefix):
            index = name[len(layers_prefix) :].split(".", 1)[0]
            if index.isdigit():
                per_layer.setdefault(int(index), {})[name] = info
                continue
        if not name.endswith(_BUFFER_SUFFIXES):
            params_outside_layers += info.numel
    if sorted(per_layer) != list(range(shape.num_layers)):
        found = f"layers 0..{max(per_layer)}" if per_layer else "no layers"
        raise SourceError(
            f"{where_file}: tensors hold {found} ({len(per_layer)} layers) but the config has {shape.num_layers}"
        )

    embed, lm_head = tensors.get(f"{spec.embed}.weight"), tensors.get(f"{spec.lm_head}.weight")
    if embed is None and shape.tied_embeddings:  # the one tied copy was saved under the head's name
        embed, lm_head = lm_head, None
    if embed is None or len(embed.shape) != 2:
        raise SourceError(f"{where_file}: no {spec.embed}.weight matrix")
    if embed.shape != (shape.vocab, shape.hidden):
        raise SourceError(
            f"{where_file}: {spec.embed}.weight is {list(embed.shape)} but the config says "
            f"vocab {shape.vocab} x hidden {shape.hidden}"
        )
    if lm_head is None and not shape.tied_embeddings:
        raise SourceError(f"{where_file}: embeddings are not tied but there is no {spec.lm_head}.weight")
    params_embedding = embed.numel
    params_total = params_outside_layers
    if lm_head is not None:
        if shape.tied_embeddings:
            params_total -= lm_head.numel  # a tied copy that was saved anyway: one parameter, counted once
        else:
            params_embedding += lm_head.numel

    layer_reports = []
    for i, want in enumerate(shape.layers):
        where = f"{where_file}: layer {i}"
        layer_tensors, prefix = per_layer[i], spec.layer_prefix(i)
        heads, kv_heads, attn_linears = _attention(layer_tensors, spec, prefix, want.head_dim, where)
        moe_macs = 0
        if shape.experts and shape.experts[i]:
            moe_macs = _moe_macs(layer_tensors, spec, prefix, shape.experts[i], shape.top_k, where)
            width, mlp_linears = want.mlp, {}  # the config's width: expert blocks have no dense MLP Linears
        else:
            width, mlp_linears = _mlp(layer_tensors, spec, prefix, where)
        low_rank = {
            f"{block}.{name}": lin.rank
            for block, linears in ((spec.attn, attn_linears), (spec.mlp, mlp_linears))
            for name, lin in linears.items()
            if lin.rank is not None
        }
        if want.mlp and not width:  # name the tensor that is missing, not only the width it implies
            raise SourceError(f"{where}: config.json says MLP width {want.mlp} but there is no "
                              f"{prefix}.{spec.mlp}.{spec.down}.weight")
        _check_against_config(where, LayerShape(heads, kv_heads, want.head_dim, width, low_rank), want)

        mlp_block = spec.moe_on_disk if shape.experts and shape.experts[i] and spec.moe_on_disk else spec.mlp
        attn_prefix, mlp_prefix = f"{prefix}.{spec.attn}.", f"{prefix}.{mlp_block}."
        counts = {"attn": 0, "mlp": 0, "norms": 0}
        for name, info in layer_tensors.items():
            if name.endswith(_BUFFER_SUFFIXES):
                continue
            part = "attn" if name.startswith(attn_prefix) else "mlp" if name.startswith(mlp_prefix) else "norms"
            counts[part] += info.numel
        macs = moe_macs + sum(lin.macs for lin in (*attn_linears.values(), *mlp_linears.values()))
        span = attention_span(cfg, i, shape.num_layers, context)
        layer_reports.append(
            LayerReport(
                index=i,
                source_layer=want.source_layer,
                heads=heads,
                kv_heads=kv_heads,
                head_dim=want.head_dim,
                mlp=width,
                has_attention=heads > 0,
                has_mlp=width > 0,
                low_rank=low_rank,
                params_attention=counts["attn"],
                params_mlp=counts["mlp"],
                params_norms=counts["norms"],
                params_total=sum(counts.values()),
                flops_per_token=2 * macs + 2 * 2 * heads * want.head_dim * span,
            )
        )
        params_total += sum(counts.values())

    dtypes: dict[str, int] = {}
    for info in tensors.values():
        dtypes[info.dtype] = dtypes.get(info.dtype, 0) + info.nbytes
    return ModelReport(
        source=str(path),
        format=fmt,
        family=spec.family,
        model_type=str(cfg.get("model_type")),
        dtypes=dict(sorted(dtypes.items())),
        bytes=sum(dtypes.values()),
        vocab=shape.vocab,
        hidden=shape.hidden,
        num_layers=shape.num_layers,
        tied_embeddings=shape.tied_embeddings,
        context=context,
        params_total=params_total,
        params_embedding=params_embedding,
        params_non_embedding=params_total - params_embedding,
        flops_per_token=sum(r.flops_per_token for r in layer_reports) + 2 * shape.vocab * shape.hidden,
        layers=layer_reports,
    )


__all__ = [
    "LayerReport",
    "ModelReport",
    "SkippedArray",
    "TensorInfo",
    "gguf_config",
    "inspect_model",
    "read_checkpoint_headers",
    "read_gguf_header",
    "read_safetensors_header",
]


def check_config_against_weights(resolved: ResolvedSource) -> None:
    """Refuse a config.json that disagrees with the safetensors headers, before anything is allocated.

    A tampered config (an MLP width of 10**10, a low-rank rank of 10**9 in `surgery_layers`, a string for a head
    count) would otherwise make transformers or the surgery loader allocate it; the headers say what is really
    there. Reads config.json and the headers only. Families without an arch table are left to transformers.

    Raises:
        SourceError: The config is not sane or does not match the tensors (the message names the layer).
    """
    from surgery.errors import UnsupportedModelError

    if resolved.pickle_weights:
        return  # no headers to compare with: the state dict is checked against the built model instead
    try:
        inspect_model(resolved.path, context=0)
    except UnsupportedModelError:
        return


def inspect_source(source: str, *, context: int = 2048, **resolve_kwargs) -> ModelReport:
    """`inspect_model` for anything a user can name: a .gguf is read directly, the rest is resolved first
    (the demo alias is fetched on first use)."""
    if str(source).lower().endswith(".gguf") and Path(source).is_file():
        return inspect_model(source, context=context)
    from surgery.sources import resolve_source

    return inspect_model(resolve_source(source, **resolve_kwargs).path, context=context)


class _CallableModule(types.ModuleType):
    """Lets `surgery.inspect(source)` work although `surgery.inspect` is also this module's name."""

    def __call__(self, source: str, **kwargs) -> ModelReport:
        return inspect_source(source, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
