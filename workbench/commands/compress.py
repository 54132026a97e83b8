"""`workbench compress SRC --target-params 0.8 --data FILE --tokens N --out DIR`: the whole recipe, headless."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from workbench.cli_common import JsonOpt, out, print_json, status
from workbench.commands.jobs import JobsDirOpt


def compress(
    source: Annotated[str, typer.Argument(help="Model source: HF directory, hub id, .gguf file or smollm2-135m.")],
    target_params: Annotated[float, typer.Option("--target-params", help="Fraction of parameters kept, "
                                                 "e.g. 0.8.")],
    data: Annotated[str, typer.Option("--data", help="Text for scoring, reconstruction and redistillation "
                                                     "(keep it disjoint from --eval-data).")],
    tokens: Annotated[int, typer.Option("--tokens", help="Redistillation budget in training tokens.")],
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Final model directory (written atomically; "
                                                   "with --session: default its exports/compressed-<time>/).")] = None,
    eval_data: Annotated[str | None, typer.Option("--eval-data", help="Text for perplexity after each "
                                                                      "stage.")] = None,
    eval_tokens: Annotated[int | None, typer.Option("--eval-tokens", help="Cap on eval tokens.")] = None,
    eval_seq_len: Annotated[int, typer.Option("--eval-seq-len", help="Eval block length.")] = 2048,
    calib_tokens: Annotated[int, typer.Option("--calib-tokens", help="Scoring tokens.")] = 8192,
    calib_seq_len: Annotated[int, typer.Option("--calib-seq-len", help="Scoring block length.")] = 256,
    recon_tokens: Annotated[int, typer.Option("--recon-tokens", help="Reconstruction calibration "
                                              "tokens.")] = 16384,
    recon_seq_len: Annotated[int, typer.Option("--recon-seq-len", help="Reconstruction block length.")] = 2048,
    non_uniform: Annotated[bool, typer.Option("--non-uniform", help="Let layers differ (loads with "
                                                                    "surgery.load).")] = False,
    reconstruct: Annotated[bool, typer.Option("--reconstruct/--no-reconstruct", help="Refit the projections "
                                              "after the cut (training-free).")] = True,
    loss: Annotated[str, typer.Option("--loss", help="Redistillation terms, as `workbench distill`.")] = "kl:1.0,ce:0.1",
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-4,
    schedule: Annotated[str, typer.Option(help="Learning-rate schedule, as `workbench distill`.")] = "cosine",
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the logit losses.")] = 2.0,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Redistillation tokens per block.")] = 512,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Blocks per redistillation step.")] = 2,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of the redistillation job.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out.")] = False,
    jobs_dir: JobsDirOpt = None,
    session: Annotated[str | None, typer.Option("--session", "-s", help="Record the run in this session (made from "
                                                "SOURCE if missing): it runs as a job in the session's jobs/ "
                                                "(resumable: workbench jobs resume ID), its scores are kept in "
                                                "scores/, `sessions show` lists its metrics and plan.")] = None,
    home: Annotated[Path | None, typer.Option("--home", help="Workbench home of --session (default: "
                                              "$WORKBENCH_HOME, else the user data directory).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Score, suggest a plan for the budget, cut (+ reconstruct), redistill and evaluate, in one run."""
    from surgery.compress import CompressOptions, compress as run_compress
    from surgery.distill.config import parse_losses
    from surgery.jobs.store import jobs_root

    opts = CompressOptions(data=data, tokens=tokens, eval_data=eval_data, eval_tokens=eval_tokens,
                           eval_seq_len=eval_seq_len, calib_tokens=calib_tokens, calib_seq_len=calib_seq_len,
                           recon_tokens=recon_tokens, recon_seq_len=recon_seq_len,
                           non_uniform=non_uniform,
                           reconstruct=reconstruct, seq_len=seq_len, batch_size=batch_size, lr=lr,
                           schedule=schedule, temperature=temperature,
                           losses=parse_losses(loss), device=device, seed=seed)
    if session is not None:
        from workbench.compress_job import run_in_session

        record, out_dir = run_in_session(session, home, source, target_params, out_dir, opts, jobs_dir=jobs_dir,
                                         overwrite=overwrite, quiet=json_out)
    else:
        if out_dir is None:
            from surgery.errors import UserError

            raise UserError("--out is needed (or --session, which writes into the session's exports/)")
        with status(not json_out) as progress:
            record = run_compress(source, target_params, out_dir, opts, jobs_root=jobs_root(jobs_dir),
                                  overwrite=overwrite, progress=progress)
    if json_out:
        print_json(record)
        return
    before = record["metrics"]["before"]
    out.print(f"[green]wrote[/] {out_dir} (record: {out_dir / 'pipeline.json'})")
    rows = [("base", before, None, None)] + [(s["stage"], s.get("after"), s.get("wall_s"), s.get("tokens_per_s"))
                                             for s in record["stages"]]
    pre = record.get("prelude", {})
    for name in ("score", "suggest"):
        if name in pre:
            out.print(f"  {name:10s} {pre[name]['wall_s']:>8.1f}s")
    for name, metrics, wall, rate in rows:
        if metrics is None:
            continue
        ppl = metrics.get("perplexity")
        ratio = f" ({ppl / before['perplexity']:.2f}x)" if ppl and before.get("perplexity") else ""
        ppl_text = f", perplexity {ppl:.4g}{ratio}" if ppl else ""
        rate_text = f", {rate:g} training tokens/s" if rate else ""
        out.print(f"  {name:10s} {'' if wall is None else f'{wall:>8.1f}s'}  params {metrics['params']:,}{ppl_text}"
                  f"{rate_text}")
