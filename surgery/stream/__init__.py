"""Streaming apply: structural plans written from slices of the input safetensors, no model in memory.

- `source`: where each input tensor lies (file, offset) from the headers;
- `reads`: which slice of which input tensor makes each output tensor (`TensorRead`), and `NotStreamable`;
- `writer`: safetensors shards written chunk by chunk, byte-identical to `save_file`, hashed as written;
- `apply`: the meta-device model that names the outputs, sharding, free-space check, the output directory.
"""

from surgery.stream.apply import (
    StreamPlan,
    build_stream_plan,
    check_free_space,
    plan_blockers,
    save_streamed_dir,
)
from surgery.stream.reads import NotStreamable

__all__ = ["NotStreamable", "StreamPlan", "build_stream_plan", "check_free_space", "plan_blockers",
           "save_streamed_dir"]
