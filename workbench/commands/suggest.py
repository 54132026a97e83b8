"""`workbench plan suggest [SOURCE] --scores FILE --target-params 0.8 --out plan.json`: scores -> a valid plan."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from surgery.errors import UserError
from workbench.cli_common import (
    AllowPickleOpt,
    JsonOpt,
    TrustRemoteCodeOpt,
    err,
    fmt_int,
    out,
    print_json,
    status,
)


def _per_layer(counts: dict, what: str) -> str:
    values = sorted(set(counts.values()))
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]} {what} in {len(counts)} layer(s)"
    return f"{min(values)}-{max(values)} {what} in {len(counts)} layer(s)"


def _print_gradient_choice(c: dict, console) -> None:
    """Which matrices sv-grad chose and why: the cheapest estimated loss per parameter saved first."""
    ranks = sorted(c["matrices"].items(), key=lambda kv: kv[1]["estimate"])
    spread = f", ranks {min(m['rank'] for _, m in ranks)}-{max(m['rank'] for _, m in ranks)}" if ranks else ""
    console.print(
        f"low rank by sv-grad: {c['chosen']} of {c['considered']} matrices factorised{spread}, "
        f"{fmt_int(c['removed'])} parameters removed (budget {fmt_int(c['budget'])}) by dropping "
        f"{fmt_int(c['dropped_values'])} singular values with the lowest estimated loss change per parameter "
        f"(|sigma dL/dsigma| summed: {c['estimated_loss_change']:.4g})"
    )
    for path, m in ranks[:3]:
        console.print(f"  least sensitive: {path} -> rank {m['rank']} (estimate {m['estimate']:.3g})")
    if c["spared"]:
        console.print(f"  left dense (dropping any of their singular values costs more per parameter): "
                      f"{len(c['spared'])}, e.g. {', '.join(c['spared'][:3])}")


def _print_axes(report: dict, console) -> None:
    """Which axes `--axes` chose, for how many parameters, and why (score removed per million parameters)."""
    for axis, r in report.items():
        why = (f"{r['score_per_m_params']:.4g} {r['metric']} per 1M params removed" if r["params"] else
               f"not chosen: its cheapest cut costs {r['cheapest_per_m_params']:.4g} per 1M params"
               if r["cheapest_per_m_params"] is not None else "nothing it can cut")
        console.print(f"  {axis}: {fmt_int(r['params'])} params ({why})" + ("; fills the target" if r["fills"] else ""))


def _print_measured(summary: dict, console) -> None:
    """What the measured curves of `--axes ... --data` said per axis, and which plan was kept."""
    m = summary["measured"]
    console.print(f"axes by measured calibration loss (unpruned {m['base_loss']:.4f} nats on {fmt_int(m['tokens'])} "
                  f"tokens, {m['evaluations']} forwards):")
    def size(n: float) -> str:
        return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"

    for unit, r in summary["axes"].items():
        curve = ", ".join(f"{size(a)} {c:+.3f}" for a, c in r["curve"][1:])
        price = r["cheapest_loss_per_m_params"]
        why = (f"{r['loss']:+.4f} nats at that amount" if r["params"] else
               f"{size(r['allocated'])} in the mix, which was not kept" if r["allocated"] else
               f"not chosen: its cheapest measured step costs {price:.4g} nats per 1M params" if price is not None
               else "nothing it can cut")
        console.print(f"  {unit} ({r['metric']}): {fmt_int(r['params'])} params ({why}); measured {curve}"
                      + ("; fills the target" if r["fills"] else ""))
    single = (f"{m['best_single']} alone {m['best_single_loss']:+.4f}" if m["best_single"] else
              "no axis reaches the target alone")
    mix = f"the mix {m['mix_loss']:+.4f}" if m["mix_loss"] is not None else "the mix missed the target"
    kept = "the mix" if m["kept"] == "mix" else f"{m['kept']} alone (the mix measured worse)"
    console.print(f"  checked: {mix} against {single}: kept {kept}")


def _check_calibration_options(data: str | None, rank_method: str | None, ridge: float, inputs: str) -> None:
    if data is None:
        raise UserError("--reconstruct and --rank-method whitened/asvd need --data FILE (calibration text)")
    if rank_method not in (None, "svd", "whitened", "asvd"):
        raise UserError(f"--rank-method {rank_method!r}: expected svd, whitened or asvd")
    if not ridge >= 0:
        raise UserError(f"--ridge {ridge}: must be >= 0")
    if inputs not in ("pruned", "original"):
        raise UserError(f"--recon-inputs {inputs!r}: expected pruned or original")


def suggest(
    source: Annotated[str | None, typer.Argument(help="Model source (default: the model the scores name).")] = None,
    scores: Annotated[list[Path] | None, typer.Option("--scores", "-s", help="Score file from `workbench score` "
                                                      "(repeat for several).")] = None,
    target_params: Annotated[float | None, typer.Option("--target-params", help="Fraction of parameters kept, "
                                                        "e.g. 0.8.")] = None,
    heads: Annotated[str | None, typer.Option(help="Query heads to remove: 25% or a count.")] = None,
    neurons: Annotated[str | None, typer.Option(help="MLP neurons to remove: 20% or a count.")] = None,
    layers: Annotated[str | None, typer.Option(help="Whole layers to drop: a count or a percentage.")] = None,
    non_uniform: Annotated[bool, typer.Option("--non-uniform", help="Let layers differ (loads with surgery.load; "
                                              "uniform plans load with plain transformers).")] = False,
    serve: Annotated[str | None, typer.Option("--serve", help="llama.cpp or vllm: allocate only shapes that runtime "
                                              "runs without padding (vllm: no head/KV cuts, MLP widths a multiple "
                                              "of 256; llama.cpp: no low-rank), so `workbench export` adds "
                                              "nothing.")] = None,
    head_metric: Annotated[str | None, typer.Option("--head-metric", help="Default: head-ablate, head-grad, "
                                                    "head-taylor, head-act, head-magnitude (first present).")] = None,
    neuron_metric: Annotated[str | None, typer.Option("--neuron-metric", help="Default: neuron-taylor, "
                                                      "neuron-wanda, neuron-act, neuron-magnitude.")] = None,
    layer_metric: Annotated[str | None, typer.Option("--layer-metric", help="Default: layer-ablate, "
                                                     "layer-bi.")] = None,
    kv_metric: Annotated[str | None, typer.Option("--kv-metric", help="Rank KV groups by this group score "
                                                  "(kv-group-grad) when whole groups are removed; default: the "
                                                  "summed scores of the heads each group keeps.")] = None,
    axes: Annotated[str | None, typer.Option("--axes", help="Meet --target-params along these axes, by score "
                                             "removed per parameter: heads, neurons, layers, hidden (prune_hidden, "
                                             "every layer), experts (MoE); e.g. hidden,layers. With --data: by the "
                                             "measured calibration loss of each axis's own cuts, checked against "
                                             "the best single axis. Default: heads and neurons sharing the "
                                             "cut.")] = None,
    channel_metric: Annotated[str | None, typer.Option("--channel-metric", help="For --axes hidden. Default: "
                                                       "channel-taylor, channel-norm (one axis only).")] = None,
    expert_metric: Annotated[str | None, typer.Option("--expert-metric", help="For --axes experts. Default: "
                                                      "expert-grad, expert-reap, expert-freq (the last two one "
                                                      "axis only).")] = None,
    low_rank: Annotated[str | None, typer.Option("--low-rank", help="Factorise these Linears (attn, mlp or "
                                                 "names such as down_proj); their blocks are not pruned. "
                                                 "Needs --rank-keep.")] = None,
    rank_keep: Annotated[float | None, typer.Option("--rank-keep", help="Per matrix, the fraction of its "
                                                    "spectrum energy the rank keeps, e.g. 0.9.")] = None,
    rank_metric: Annotated[str | None, typer.Option("--rank-metric", help="Spectrum for --rank-keep. Default: "
                                                    "sv (what the truncation keeps), sv-act. sv-grad: choose "
                                                    "matrices and ranks globally by the estimated loss change "
                                                    "|sigma dL/dsigma| of the dropped singular values, for "
                                                    "--rank-params or --target-params (scores: --method "
                                                    "sv,sv-grad).")] = None,
    rank_params: Annotated[float | None, typer.Option("--rank-params", help="With --rank-metric sv-grad: the "
                                                      "fraction of the --low-rank matrices' parameters kept, e.g. "
                                                      "0.6 (the rest of --target-params is pruned from the other "
                                                      "blocks); without it low rank alone meets "
                                                      "--target-params.")] = None,
    rank_method: Annotated[str | None, typer.Option("--rank-method", help="How low_rank steps factorise: svd "
                                                    "(default), whitened (SVD-LLM: output error on the "
                                                    "--data activations) or asvd (W scaled by the mean |x| of "
                                                    "each input channel ^ alpha); the last two need --data.")] = None,
    asvd_alpha: Annotated[float | None, typer.Option("--asvd-alpha", help="asvd's exponent on the mean |x| "
                                                     "(default 0.5).")] = None,
    reconstruct: Annotated[bool, typer.Option("--reconstruct", help="Add a reconstruct step: refit o_proj / "
                                              "down_proj of every cut layer on the --data text (least squares, "
                                              "no training).")] = False,
    data: Annotated[str | None, typer.Option("--data", "-d", help="Calibration text for --reconstruct, "
                                             "--rank-method whitened and --axes (each axis priced by the "
                                             "measured loss of its own cuts): .txt, .jsonl, .parquet or hf:NAME; "
                                             "its token fingerprint goes into the plan.")] = None,
    calib_tokens: Annotated[int, typer.Option("--calib-tokens", help="Calibration tokens (the first "
                                              "tokens // seq-len blocks of --data).")] = 8192,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per calibration block.")] = 256,
    ridge: Annotated[float, typer.Option("--ridge", help="Reconstruct's ridge term, relative to the mean "
                                         "diagonal of each Gram matrix; pulls toward the plain cut.")] = 0.1,
    recon_inputs: Annotated[str, typer.Option("--recon-inputs", help="Reconstruct's layer inputs: original "
                                              "(default, measured better on the demo) or pruned (from the pruned, "
                                              "refit prefix).")] = "original",
    text_field: Annotated[str | None, typer.Option("--text-field", help="Field/column holding the text "
                                                   "(.jsonl / .parquet --data).")] = None,
    out_file: Annotated[Path | None, typer.Option("--out", "-o", help="Plan file to write (default: print "
                                                  "the plan on stdout).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Use scores computed for other weights or data.")] = False,
    json_out: JsonOpt = False,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
) -> None:
    """Turn scores into a valid plan for a size target (uniform across layers unless --non-uniform)."""
    from surgery.importance.axes import parse_axes
    from surgery.importance.ranks import parse_low_rank
    # torch: imported only when needed
    from surgery.suggest import Target, check_removes_something, parse_amount, suggest_for_source

    if not scores:
        raise UserError("no scores: pass --scores FILE (from `workbench score`)")
    target = Target(
        params=target_params,
        heads=parse_amount(heads, "heads") if heads is not None else None,
        neurons=parse_amount(neurons, "neurons") if neurons is not None else None,
        layers=parse_amount(layers, "layers") if layers is not None else None,
        low_rank=parse_low_rank(low_rank) if low_rank is not None else None,
        rank_keep=rank_keep,
        rank_params=rank_params,
        serve=serve,
        axes=parse_axes(axes) if axes is not None else None,
    )
    metrics = {"heads": head_metric, "neurons": neuron_metric, "layers": layer_metric, "kv": kv_metric,
               "ranks": rank_metric, "hidden": channel_metric, "experts": expert_metric}
    measured = target.axes is not None and data is not None  # --axes priced by measured loss curves on --data
    calibrated = (reconstruct or rank_method not in (None, "svd") or (data is not None and not measured)
                  or asvd_alpha is not None)
    if calibrated:
        _check_calibration_options(data, rank_method, ridge, recon_inputs)
    with status(not json_out) as progress:
        if measured:
            from surgery.importance.measured import suggest_measured_for_source

            s = suggest_measured_for_source(source, scores, target, data, tokens=calib_tokens, seq_len=seq_len,
                                            text_field=text_field, uniform=not non_uniform, metrics=metrics,
                                            force=force, allow_pickle=allow_pickle,
                                            trust_remote_code=trust_remote_code, progress=progress)
        else:
            s = suggest_for_source(source, scores, target, uniform=not non_uniform, metrics=metrics, force=force,
                                   allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                                   progress=progress)
        check_removes_something(s, target)  # an empty plan is no answer to a target (it wrote one, exit 0)
        if calibrated:
            from surgery.plan import Reconstruct
            from surgery.reconstruct import calibrate_for_source

            progress("tokenizing calibration data")
            step = Reconstruct(op="reconstruct", inputs=recon_inputs, ridge=ridge) if reconstruct else None
            s.plan = calibrate_for_source(s.plan, data, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                                          tokens=calib_tokens, seq_len=seq_len, text_field=text_field,
                                          reconstruct=step, rank_method=rank_method, alpha=asvd_alpha)
    if out_file is not None:
        s.plan.save(out_file)
    kept = s.params_after / s.params_before
    if json_out:
        print_json({
            "out": str(out_file) if out_file else None,
            "plan": s.plan.model_dump(mode="json", exclude_none=True),
            "params_before": s.params_before,
            "params_after": s.params_after,
            "target_params": s.target_params,
            "granularity": s.granularity,
            "kept_fraction": round(kept, 6),
            "summary": s.summary,
        })
        return
    if out_file is None:
        print(s.plan.to_json(), end="")
    parts = [p for p in (
        f"dropped layers {s.summary['layers_dropped']}" if s.summary.get("layers_dropped") else "",
        _per_layer(s.summary.get("heads_removed", {}), "heads"),
        _per_layer(s.summary.get("neurons_removed", {}), "neurons"),
        f"{s.summary['hidden_removed']} residual channels" if s.summary.get("hidden_removed") else "",
        _per_layer(s.summary.get("experts_removed", {}), "experts"),
        f"{len(s.summary['low_rank'])} matrices low-rank" if s.summary.get("low_rank") else "",
        f"then refits on {fmt_int(s.plan.calibration.tokens)} calibration tokens" if reconstruct else "",
    ) if p]
    if s.summary.get("low_rank_choice"):
        _print_gradient_choice(s.summary["low_rank_choice"], out if out_file else err)
    if s.summary.get("measured"):
        _print_measured(s.summary, out if out_file else err)
    elif s.summary.get("axes"):
        (out if out_file else err).print("axes (lowest score removed per parameter first):")
        _print_axes(s.summary["axes"], out if out_file else err)
        (out if out_file else err).print("  (first-order gate prices; --data FILE prices each axis by measured "
                                         "calibration loss instead)")
    target = f" (target {fmt_int(s.target_params)}, step {fmt_int(s.granularity)})" if s.target_params else ""
    where = f"wrote {out_file}" if out_file else "plan"
    loads = "plain transformers" if not non_uniform else "surgery.load (per-layer shapes)"
    if s.summary.get("low_rank"):
        loads = "surgery.load (low-rank factors)"
    (out if out_file else err).print(
        f"[green]{where}[/]: {len(s.plan.steps)} step(s); params {fmt_int(s.params_before)} -> "
        f"{fmt_int(s.params_after)} ({kept:.1%} kept){target}; removes {'; '.join(parts) or 'nothing'}; "
        f"by {', '.join(f'{k}={v}' for k, v in s.plan.provenance.get('metrics', {}).items())}; "
        f"{'uniform' if not non_uniform else 'non-uniform'}, "
        f"expected to load with {loads}" + (f"; exports to {serve} without padding" if serve else "")
    )
