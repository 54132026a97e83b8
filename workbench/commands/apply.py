"""`workbench apply PLAN --out DIR`: replay a plan headlessly and write an HF-format directory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from surgery.errors import UserError
from surgery.plan import load_plan, read_plan_json
from workbench.cli_common import (
    AllowPickleOpt,
    JsonOpt,
    ModelOpt,
    TrustRemoteCodeOpt,
    err,
    fmt_int,
    out,
    print_json,
    status,
)


def apply(
    plan_file: Annotated[Path, typer.Argument(help="Plan or pipeline file (JSON); - reads standard input.")],
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Output directory (written atomically).")] = None,
    model: ModelOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Apply even if the plan was made for other weights.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output directory.")] = False,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 (bf16), float16 (f16) or auto (the checkpoint's; "
                                             "float32 for a dequantized GGUF such as the demo).")] = "auto",
    json_out: JsonOpt = False,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    stream: Annotated[bool | None, typer.Option(
        "--stream/--no-stream",
        help="Stream from the input safetensors without building the model (default: whenever the plan allows; "
        "--stream refuses a plan that cannot).")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="List the slices streaming would read and the output sizes; reads no weights.")] = False,
) -> None:
    """Apply a plan to a model and save the result (config, safetensors, tokenizer, surgery.json manifest)."""
    data = read_plan_json(plan_file)  # once: the file may be a pipe (`<(cat plan.json)`)
    from surgery.jobs.pipeline import is_pipeline_file

    if dry_run:  # before any torch import: a 70B dry run takes seconds, not a 400 MB import
        if is_pipeline_file(data):  # its schema errors ("kind: unknown field") would not say what is wrong
            raise UserError(f"{plan_file} is a pipeline file: --dry-run lists the reads of a plan file only (a "
                            "pipeline's prune stages cut the models its training stages make)")
        plan = load_plan(plan_file, data)
        del data  # the raw JSON of a 70B plan holds ~460k ints: not needed once parsed
        _dry_run(plan, model, stream, dtype, allow_pickle, trust_remote_code, json_out)
        return
    from surgery.pipeline import apply_to_source  # torch/transformers: imported only when needed

    if out_dir is None:
        raise UserError("missing --out DIR (where to write the result)")
    if is_pipeline_file(data):  # distill -> prune -> redistill files run as a headless pipeline
        from surgery.jobs.pipeline import parse_pipeline
        from workbench.commands.jobs import run_parsed_pipeline

        run_parsed_pipeline(parse_pipeline(data, str(plan_file)), out_dir, overwrite=overwrite, jobs_dir=None,
                            json_out=json_out)  # the document read above: a pipe cannot be read twice
        return
    plan = load_plan(plan_file, data)
    start = time.perf_counter()
    with status(not json_out) as progress:
        result = apply_to_source(plan, out_dir, model, force=force, overwrite=overwrite, dtype=dtype,
                                 allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, progress=progress,
                                 stream=stream)
    seconds = time.perf_counter() - start
    m = result.manifest
    if json_out:
        print_json({**m, "out": str(result.out), "seconds": round(seconds, 3)})
        return
    for w in result.validation.warnings:
        err.print(f"[yellow]warning:[/] {w}")
    before, after = m["params"]["before"], m["params"]["after"]
    loader = m["output"]["loadable_with"]
    how = (
        "AutoModelForCausalLM.from_pretrained(DIR)" if loader == "transformers" else "surgery.load(DIR)"
    )
    applier = m["apply"]["path"].replace("_", "-")
    if m["apply"].get("data_steps"):  # "layer_by_layer": reconstruct / whitened steps fitted one block at a time
        applier += f", data steps {m['apply']['data_steps'].replace('_', ' ')}"
    out.print(
        f"[green]wrote[/] {result.out}: params {fmt_int(before)} -> {fmt_int(after)} "
        f"({1 - after / before:.1%} removed) in {seconds:.1f}s ({applier}); "
        f"load with {how}"
    )


def _dry_run(plan, model, stream, dtype, allow_pickle, trust_remote_code, json_out) -> None:
    """`apply --dry-run`: the plan of reads, from headers only."""
    from surgery.stream.dry import dry_run_source

    report = dry_run_source(plan, model, stream=stream, dtype=dtype, allow_pickle=allow_pickle,
                            trust_remote_code=trust_remote_code)
    if json_out:
        print_json(report)
        return
    for w in report["warnings"]:
        err.print(f"[yellow]warning:[/] {w}")
    if report["path"] != "stream":
        out.print(f"in-memory apply (cannot stream: {report['why'][0]})")
        return
    for r in report["reads"]:
        cut = " ".join(f"{k} {v[0]}/{v[1]}" for k in ("rows", "cols") if (v := r[k]) and v[0] != v[1])
        how = f"low rank {r['low_rank']} of " if r["low_rank"] else ""
        what = f"{how}{r['source']}{' [' + cut + ']' if cut else ''}" if r["source"] else "(placeholder, 0 bytes)"
        fit = " (fitted at apply time)" if r.get("fitted") else ""
        out.print(f"{r['file']}  {r['name']}  <- {what}{fit}  read {fmt_int(r['bytes_read'])} B, "
                  f"write {fmt_int(r['bytes_written'])} B")
    for s in report["shards"]:
        out.print(f"{s['file']}: {fmt_int(s['bytes'])} bytes, {s['tensors']} tensors")
    for note in report["notes"]:
        err.print(f"note: {note}")
    out.print(f"streaming apply: reads {fmt_int(report['bytes_read'])} bytes, writes {fmt_int(report['bytes_written'])} "
              f"bytes in {len(report['shards'])} file(s); params after {fmt_int(report['params_after'])}")
