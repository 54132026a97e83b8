"""Exporters: one module per target runtime.

- `hf`: the HF-format directory `apply` writes (plain transformers, or `surgery.load` for per-layer shapes);
- `gguf`: a single .gguf file for llama.cpp (`llama` architecture when uniform, `deci` when layers differ);
- `vllm`: vLLM's heterogeneous Llama layout (`DeciLMForCausalLM`, `model_type: nemotron-nas`);
- `runtimes`: which runtimes (transformers, llama.cpp, vLLM, surgery.load) run a shape, with what padding;
- `atomic`: the atomic-directory writer every directory target shares.

The names below are the package's public API (the HF target and the atomic writer, used across surgery).
"""

from surgery.export.atomic import atomic_dir, check_output_dir
from surgery.export.hf import (
    MANIFEST,
    MANIFEST_VERSION,
    load_surgery_checkpoint,
    loadable_with,
    restructure_to_config,
    save_model_dir,
)

__all__ = [
    "MANIFEST",
    "MANIFEST_VERSION",
    "atomic_dir",
    "check_output_dir",
    "load_surgery_checkpoint",
    "loadable_with",
    "restructure_to_config",
    "save_model_dir",
]
