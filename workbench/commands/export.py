"""`workbench export SRC --to gguf|vllm --out PATH`: hand any model (an `apply` output, the original, any source)
to a serving runtime.

- `--to gguf`: one .gguf file for llama.cpp (`llama-cli -m OUT`, llama-cpp-python, llama-server); architecture
  `llama` when every layer has the same shapes, `deci` when they differ. Tokenizer and chat template inside.
- `--to vllm`: a directory in vLLM's heterogeneous Llama layout (`DeciLMForCausalLM`, `model_type:
  nemotron-nas`, per-layer `block_configs`); serve it with `vllm serve OUT --trust-remote-code` (the config
  class ships in the directory; mlx-lm's `nemotron-nas` reads it too).

Whatever a runtime cannot express as it is gets padded exactly (zero heads / zero neurons) or refused; every
padding is printed with its cost in parameters and FLOPs per token. Nothing is ever changed silently.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from surgery.errors import UserError
from workbench.cli_common import AllowPickleOpt, JsonOpt, TrustRemoteCodeOpt, err, fmt_int, out, print_json, status


class Target(str, Enum):
    gguf = "gguf"
    vllm = "vllm"


def export(
    source: Annotated[str, typer.Argument(help="Model: an `apply` output, an HF directory, a .gguf file or smollm2-135m.")],
    to: Annotated[Target, typer.Option("--to", help="gguf (llama.cpp) or vllm (DeciLM / nemotron-nas layout).")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output: a .gguf file (gguf) or a directory (vllm).")],
    dtype: Annotated[str, typer.Option(help="gguf: f32, f16 (= auto), bf16 or q8_0; vllm: float32, bfloat16, float16 or auto.")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")] = False,
    max_shard_size: Annotated[str | None, typer.Option(
        "--max-shard-size", help="vllm: shard the weights past this size, as save_pretrained (default 5GB).")] = None,
    json_out: JsonOpt = False,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
) -> None:
    """Export a model for a serving runtime (llama.cpp GGUF or vLLM's DeciLM layout), padding exactly or refusing
    what the runtime cannot express, and printing what each padding costs.

    Serve the results with `llama-cli -m OUT.gguf` / `llama-server -m OUT.gguf`,
    or `vllm serve OUT_DIR --trust-remote-code`.

    vLLM layout: zero query heads up to hidden/head_dim in every layer that keeps attention,
    zero neurons up to a multiple of 256, low-rank factors multiplied back (listed in OUT_DIR/surgery-export.json);
    weights sharded past --max-shard-size like save_pretrained (model.safetensors.index.json).
    """
    extra = {}
    if to is Target.gguf:
        from surgery.export.gguf import export_gguf as exporter

        if max_shard_size is not None:
            raise UserError("--max-shard-size applies to --to vllm (a GGUF export is one file)")
    else:
        from surgery.export.vllm import export_vllm as exporter

        extra = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    with status(not json_out) as progress:
        report = exporter(source, out_path, dtype=dtype, overwrite=overwrite, allow_pickle=allow_pickle,
                          trust_remote_code=trust_remote_code, progress=progress, **extra)
    if json_out:
        print_json(report.to_dict())
        return
    for adj in report.adjustments:
        cost = f" (+{fmt_int(adj.params_added)} params, +{fmt_int(adj.flops_added)} FLOPs/token)" if (
            adj.params_added or adj.flops_added) else ""
        err.print(f"[yellow]{report.target}:[/] {adj.what}{cost}")
    if report.adjustments and (report.params_added or report.flops_added):
        err.print(f"[yellow]{report.target}:[/] padding in all: +{fmt_int(report.params_added)} params, "
                  f"+{fmt_int(report.flops_added)} FLOPs/token")
    out.print(f"[green]wrote[/] {report.out} ({report.architecture}, {report.dtype}, {fmt_int(report.params)} params, "
              f"{report.file_bytes / 2**20:.1f} MiB); serve with: {report.serve_command}")
