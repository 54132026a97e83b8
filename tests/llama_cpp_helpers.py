"""Opening GGUF files in llama-cpp-python for tests and benchmarks.

`open_llama` turns off llama.cpp's "extra" CPU buffer types (weight repacking and the AMX backend; what
`llama-cli --no-repack` does): with them on, the llama.cpp in llama-cpp-python 0.3.36 built natively on an AMX CPU
(this machine, Xeon with AMX_INT8) segfaults in `ggml_backend_amx_mul_mat` on the first q8_0 matmul, for files
written by us and by its own `llama_model_quantize` alike. f32 / f16 / bf16 never take that path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import llama_cpp
import llama_cpp.llama_cpp as llama_c
from llama_cpp import Llama

F32_CACHE = 0  # GGML_TYPE_F32: llama.cpp keeps the KV cache in f16 by default, which moves logits by ~5e-3


@contextlib.contextmanager
def _no_extra_buffer_types() -> Iterator[None]:
    # Llama() takes its model params from llama_model_default_params() and has no argument for this field
    original = llama_c.llama_model_default_params

    def patched():
        params = original()
        params.use_extra_bufts = False
        return params

    llama_c.llama_model_default_params = patched
    try:
        yield
    finally:
        llama_c.llama_model_default_params = original


def open_llama(path, *, n_ctx: int = 128, n_threads: int = 2, logits_all: bool = True, f32_cache: bool = True,
               **kwargs) -> Llama:
    """A llama-cpp-python model for `path`, quiet, without repacked / AMX weight buffers."""
    cache = {"type_k": F32_CACHE, "type_v": F32_CACHE} if f32_cache else {}
    with _no_extra_buffer_types():
        return Llama(str(path), logits_all=logits_all, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                     verbose=False, **cache, **kwargs)


__all__ = ["F32_CACHE", "llama_cpp", "open_llama"]
