"""The HF-format target: write a pruned model as an HF directory (atomically), and load checkpoints plain transformers cannot.

Output layout: config.json, model*.safetensors (sharded past 5 GB), tokenizer files, generation_config.json and
`surgery.json` (the manifest: resolved plan, input/output fingerprints, versions). The directory appears only
when complete: everything is written into a hidden temporary sibling that is renamed at the end, so Ctrl-C,
kill -9 or a full disk leave no half-written output and never damage an existing one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery import ops
from surgery.errors import SourceError
from surgery.export.atomic import _fsync_dir, atomic_dir
from surgery.plan import write_text_atomic
from surgery.shapes import SURGERY_LAYERS_KEY, shape_from_config
from surgery.shards import index_shards

MANIFEST = "surgery.json"
# Written into the config.json of surgery-only checkpoints (per-layer shapes). Plain `from_pretrained` still refuses
# them loudly (the placeholders' shape mismatch); this names the loader to whoever opens the config after that
# refusal, before they reach for `ignore_mismatched_sizes=True`, which would re-initialise the cut parts at random.
LOADER_HINT_KEY = "surgery_load_with"
LOADER_HINT = ("surgery.load(DIR): this checkpoint has per-layer shapes (surgery_layers); "
               "AutoModelForCausalLM.from_pretrained refuses it, and ignore_mismatched_sizes=True would load "
               "randomly re-initialised layers instead")
MANIFEST_VERSION = 1


def loadable_with(config_dict: dict) -> str:
    """"transformers" when plain `AutoModelForCausalLM.from_pretrained` loads it, else "surgery"."""
    return "surgery" if config_dict.get(SURGERY_LAYERS_KEY) else "transformers"


def legacy_rope_keys(config_dict: dict) -> dict:
    """`rope_theta` / `rope_scaling` (and Gemma-3's `rope_local_base_freq`) as transformers 4.x reads them.

    Why: transformers 5 writes only `rope_parameters`, and a 4.x reader of such a config silently uses
    rope_theta = 10000 (the demo's uniform 80% output gave logits off by up to 25 under transformers 4.47).
    Returns {} when the config has no `rope_parameters`.
    """
    params = config_dict.get("rope_parameters")
    if not isinstance(params, dict):
        return {}
    legacy = {}
    if "full_attention" in params or "sliding_attention" in params:  # per layer type (Gemma-3)
        local = params.get("sliding_attention") or {}
        if "rope_theta" in local:
            legacy["rope_local_base_freq"] = local["rope_theta"]
        params = params.get("full_attention") or {}
    if "rope_theta" in params:
        legacy["rope_theta"] = params["rope_theta"]
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        legacy["rope_scaling"] = {**scaling, "rope_type": rope_type, "type": rope_type}  # 4.x reads either name
    return legacy


def add_loader_hint(config_path: Path) -> None:
    """Name `surgery.load` in a surgery-only checkpoint's config.json (a plain one is left as it is)."""
    cfg = json.loads(config_path.read_text())
    if loadable_with(cfg) == "surgery" and cfg.get(LOADER_HINT_KEY) != LOADER_HINT:
        config_path.write_text(json.dumps(dict(sorted({**cfg, LOADER_HINT_KEY: LOADER_HINT}.items())), indent=2) + "\n")


def add_legacy_keys(config_path: Path) -> None:
    """Write `legacy_rope_keys` beside `rope_parameters` in a saved config.json (keys already there win)."""
    cfg = json.loads(config_path.read_text())
    extra = {k: v for k, v in legacy_rope_keys(cfg).items() if k not in cfg}
    if extra:
        config_path.write_text(json.dumps(dict(sorted({**cfg, **extra}.items())), indent=2) + "\n")


def save_model_dir(
    model: nn.Module,
    out: str | Path,
    *,
    tokenizer: Any = None,
    manifest: dict | None = None,
    overwrite: bool = False,
    max_shard_size: str = "5GB",
    write_weights: Callable[[Path], str] | None = None,
) -> Path:
    """Save `model` (+ tokenizer, + manifest) to `out` atomically; returns `out`.

    The manifest dict gets `output.fingerprint` (sha256 of the written safetensors) and `output.loadable_with`
    filled in, in place. `write_weights(tmp)`, when given, writes config and weights instead of
    `model.save_pretrained` and returns their fingerprint (the streaming applier, surgery.stream, hashes as it
    writes); everything else is shared, so both paths write the same files.
    """
    from surgery.fingerprint import weights_fingerprint
    from surgery.sources import quiet_progress_bars

    with atomic_dir(out, overwrite) as tmp:
        fingerprint = None
        if write_weights is not None:
            fingerprint = write_weights(tmp)
        else:
            with quiet_progress_bars():
                model.save_pretrained(tmp, max_shard_size=max_shard_size)
        add_legacy_keys(tmp / "config.json")
        add_loader_hint(tmp / "config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        # fsync (disk-bound) runs beside the output fingerprint (CPU-bound, reads the page cache): same safety,
        # about half the wall time of doing them one after the other
        with ThreadPoolExecutor(max_workers=1) as pool:
            synced = pool.submit(_fsync_dir, tmp)
            if manifest is not None:
                cfg = json.loads((tmp / "config.json").read_text())
                # filled in place so the caller's dict describes what was written
                manifest.setdefault("output", {}).update(
                    fingerprint=fingerprint or weights_fingerprint(tmp), loadable_with=loadable_with(cfg)
                )
                write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            synced.result()
    return Path(out)


def restructure_to_config(model: nn.Module, config_dict: dict) -> None:
    """Reshape a freshly built (base-size) model to the per-layer shapes listed in `surgery_layers`.

    Which rows are kept does not matter (the checkpoint's tensors overwrite them); only the shapes and the module
    types do, so the same ops that pruned the model rebuild it.
    """
    shape = shape_from_config(config_dict)
    spec = shape.spec
    layers = ops.get_module(model, spec.layers)
    group = shape.base_heads // shape.base_kv_heads
    for idx, (layer, s) in enumerate(zip(layers, shape.layers)):
        if not s.has_attention:
            ops.drop_attention(layer, spec, idx, s.head_dim)
        elif (s.heads, s.kv_heads) != (shape.base_heads, shape.base_kv_heads):
            per_group = s.heads // s.kv_heads
            keep_q = [g * group + j for g in range(s.kv_heads) for j in range(per_group)]
            attn = ops.get_module(layer, spec.attn)
            ops.prune_attention_heads(
                attn, spec, keep_q, list(range(s.kv_heads)), shape.base_heads, shape.base_kv_heads, s.head_dim
            )
        if not s.has_mlp:
            ops.drop_mlp(layer, spec)
        elif s.mlp != shape.base_mlp:
            ops.prune_mlp_neurons(ops.get_module(layer, spec.mlp), spec, range(s.mlp), shape.base_mlp)
        if shape.experts and shape.experts[idx] and s.has_mlp:
            mlp = ops.get_module(layer, spec.mlp)
            if ops.get_module(mlp, spec.experts).num_experts != shape.experts[idx]:  # per-layer expert counts
                ops.prune_moe_experts(mlp, spec, range(shape.experts[idx]))
        for rel, rank in sorted(s.low_rank.items()):
            ops.empty_low_rank(layer, rel, rank, spec.conv1d)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = [path / f for f in index_shards(path) or []] or sorted(path.glob("*.safetensors"))
    if not files:
        raise SourceError(f"no safetensors files in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
            raise SourceError(f"corrupt or truncated safetensors file: {f} ({exc})") from None
    return state


def fuse_expert_tensors(state: dict[str, torch.Tensor], shape) -> dict[str, torch.Tensor]:
    """Per-expert checkpoint tensors -> the fused layout transformers 5 builds (MoE families).

    save_pretrained writes experts one by one (`experts.3.gate_proj.weight`) and from_pretrained fuses them again;
    a surgery checkpoint is loaded with load_state_dict, so the same fusing is done here: `gate_up_proj` is
    (E, 2 x width, hidden) with [gate | up] rows, `down_proj` (E, hidden, width).
    """
    spec = shape.spec
    gate, up, down = spec.expert_linears
    for i, n in enumerate(shape.experts):
        if not n:
            continue
        disk = f"{spec.layer_prefix(i)}.{spec.moe_on_disk or spec.mlp}."
        mem = f"{spec.layer_prefix(i)}.{spec.mlp}."
        try:
            experts = [{name: state.pop(f"{disk}{spec.experts}.{e}.{name}.weight") for name in (gate, up, down)}
                       for e in range(n)]
        except KeyError:
            continue  # already fused (or missing: the strict load below names it)
        state[f"{mem}{spec.experts}.gate_up_proj"] = torch.stack([torch.cat([x[gate], x[up]]) for x in experts])
        state[f"{mem}{spec.experts}.down_proj"] = torch.stack([x[down] for x in experts])
        if f"{disk}{spec.router}.weight" in state:
            state[f"{mem}{spec.router}.weight"] = state.pop(f"{disk}{spec.router}.weight")
    return state


def load_surgery_checkpoint(path: str | Path, *, dtype: torch.dtype | str | None = None, device: str = "cpu"):
    """Load a checkpoint with per-layer shapes (`surgery_layers` in config.json): one line for the user.

    Builds the model class from the config without initialising weights, reshapes each layer, then assigns the
    checkpoint tensors (strict: every tensor must find its place).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    path = Path(path)
    config_dict = json.loads((path / "config.json").read_text())
    config = AutoConfig.from_pretrained(path)
    from surgery.concurrency import MODEL_BUILD_LOCK

    with MODEL_BUILD_LOCK, no_init_weights():
        model = AutoModelForCausalLM.from_config(config)
    restructure_to_config(model, config_dict)
    state = _read_safetensors(path)
    from surgery.shapes import shape_from_config

    shape = shape_from_config(config_dict)
    if shape.experts:
        state = fuse_expert_tensors(state, shape)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise SourceError(
            f"checkpoint does not match its surgery_layers: missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    if tied:
        model.tie_weights()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval()
