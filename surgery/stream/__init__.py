"""Streaming apply: structural plans written from slices of the input safetensors, no model in memory.

- `source`: where each input tensor lies (file, offset) from the headers;
- `reads`: which slice of which input tensor makes each output tensor (`TensorRead`), and `NotStreamable`;
- `files`: the output shards, their exact sizes and the plan of reads (`StreamPlan`), torch-free;
- `layout`: the output tensors derived from config + headers alone (the torch-free dry run);
- `writer`: safetensors shards written chunk by chunk, byte-identical to `save_file`, hashed as written;
- `apply`: the meta-device model that names the outputs, the free-space check, the output directory;
- `datasteps`: data-driven steps (reconstruct, whitened / asvd low rank) fitted layer by layer, their tensors
  spilled to a temporary safetensors file and streamed from it.

Names are imported lazily: `surgery.stream.layout` / `dry` must not pull in torch through this package.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "NotStreamable": "surgery.stream.reads",
    "StreamPlan": "surgery.stream.files",
    "build_stream_plan": "surgery.stream.apply",
    "check_free_space": "surgery.stream.apply",
    "plan_blockers": "surgery.stream.blockers",
    "save_streamed_dir": "surgery.stream.apply",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
