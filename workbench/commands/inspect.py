"""`workbench inspect SOURCE`: the layer table, from config and headers only."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from surgery.inspect import ModelReport, inspect_source
from workbench.cli_common import (
    AllowPickleOpt,
    JsonOpt,
    TrustRemoteCodeOpt,
    fmt_int,
    fmt_params,
    out,
    print_json,
    status,
)


def render(report: ModelReport) -> Table:
    """The layer table: one row per layer, totals in the caption."""
    title = (
        f"{report.family} ({report.model_type}) · {report.num_layers} layers · hidden {report.hidden} · "
        f"vocab {report.vocab} · {', '.join(report.dtypes)}"
    )
    caption = (
        f"params {fmt_params(report.params_total)} ({fmt_int(report.params_total)}; embedding "
        f"{fmt_params(report.params_embedding)}, non-embedding {fmt_params(report.params_non_embedding)}"
        f"{', tied' if report.tied_embeddings else ''}) · {report.bytes / 2**20:,.1f} MiB · "
        f"{report.flops_per_token / 1e9:.3f} GFLOPs/token at context {report.context}"
    )
    table = Table(title=title, caption=caption, show_lines=False)
    any_low_rank = any(layer.low_rank for layer in report.layers)
    columns = ["layer", "q/kv", "hd", "mlp", "attn", "mlp p", "params", "MFLOP/t"]
    if any_low_rank:
        columns.insert(4, "low rank")
    for name in columns:
        table.add_column(name, justify="left" if name == "low rank" else "right", no_wrap=True)
    for layer in report.layers:
        cells = [
            str(layer.index) if layer.source_layer in (None, layer.index) else f"{layer.index}<{layer.source_layer}",
            f"{layer.heads}/{layer.kv_heads}" if layer.has_attention else "-",
            str(layer.head_dim),
            str(layer.mlp) if layer.has_mlp else "-",
            fmt_params(layer.params_attention),
            fmt_params(layer.params_mlp),
            fmt_params(layer.params_total),
            f"{layer.flops_per_token / 1e6:,.1f}",
        ]
        if any_low_rank:
            cells.insert(4, " ".join(f"{k.split('.')[-1]}:{v}" for k, v in layer.low_rank.items()))
        table.add_row(*cells)
    return table


def inspect(
    source: Annotated[str, typer.Argument(help="HF directory, hub id, .gguf file or smollm2-135m.")],
    json_out: JsonOpt = False,
    context: Annotated[int, typer.Option(min=0, help="Context length for the attention FLOPs.")] = 2048,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
) -> None:
    """Show a model layer by layer (shapes, parameters, FLOPs/token) without reading its weights."""
    with status(not json_out) as progress:  # the first use of the demo downloads and converts it (~40 s)
        report = inspect_source(source, context=context, allow_pickle=allow_pickle,
                                trust_remote_code=trust_remote_code, progress=progress)
    if json_out:
        print_json(report.to_dict())
    else:
        out.print(render(report))
