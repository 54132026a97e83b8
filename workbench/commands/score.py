"""`workbench score SOURCE --data FILE --method ... --out scores.safetensors`: importance scores on calibration text.

A progress bar (tokens done, tokens/s, ETA) on a terminal; with `--json`, one JSON document and nothing else.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from surgery.errors import UserError
from workbench.cli_common import (
    AllowPickleOpt,
    JsonOpt,
    LateNotes,
    TrustRemoteCodeOpt,
    err,
    fmt_int,
    out,
    print_json,
)


def _check_out(path: Path) -> None:
    """Fail before loading anything when the score file cannot be written."""
    if path.is_dir():
        raise UserError(f"--out {path} is a directory: name a file, e.g. {path / 'scores.safetensors'}")
    probe = path.absolute().parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: {probe} is not a writable directory")


def _progress_bar(enabled: bool):
    """(rich Progress or None, status(message), progress(done, total), phase(name, total, unit)) for the library
    callbacks; without a terminal, a one-line note per phase instead of a bar."""
    if not enabled:
        return None, None, None, None
    from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Count(ProgressColumn):
        def render(self, task):
            if task.total is None:
                return Text("")
            return Text(f"{int(task.completed):,}/{int(task.total):,} {task.fields.get('unit', 'tokens')}")

    class Rate(ProgressColumn):
        def render(self, task):
            unit = {"tokens": "tok/s", "matrices": "matrices/s"}.get(task.fields.get("unit", "tokens"), "/s")
            return Text(f"{task.speed:,.3g} {unit}" if task.speed else "", style="cyan")

    # one update per batch can be a minute apart on a CPU: rich's default 30 s speed window would never hold two
    # samples, and the ETA would stay -:--:--
    bar = Progress(TextColumn("{task.description}"), BarColumn(), Count(), Rate(), TimeRemainingColumn(),
                   console=err, transient=True, speed_estimate_period=3600)
    task = bar.add_task("starting", total=None, unit="tokens")

    def status(message: str) -> None:
        bar.update(task, description=message)

    def phase(name: str, total: int, unit: str) -> None:
        bar.reset(task, total=total, completed=0, description=name, unit=unit)  # its own bar, rate and ETA

    def progress(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return bar, status, progress, phase


def score(
    source: Annotated[str, typer.Argument(help="Model source: HF directory, hub id, .gguf file or smollm2-135m.")],
    out_file: Annotated[Path, typer.Option("--out", "-o", help="Score file to write (.safetensors).")],
    data: Annotated[str | None, typer.Option("--data", "-d", help="Calibration text: .txt, .jsonl, .parquet or "
                                             "hf:NAME[:CONFIG[:SPLIT]].")] = None,
    method: Annotated[str, typer.Option("--method", help="Comma-separated: head-grad, kv-group-grad, head-taylor, "
                                        "neuron-taylor, head-act, neuron-act, neuron-wanda, layer-bi, head-ablate, "
                                        "layer-ablate, sv, sv-act, sv-grad, head-magnitude, neuron-magnitude, "
                                        "channel-norm, channel-taylor (residual channels), expert-freq, "
                                        "expert-reap, expert-grad (MoE experts); or fast (all but ablation, "
                                        "only the axes the model has), ablate, all.")] = "fast",
    tokens: Annotated[int, typer.Option(help="Calibration tokens (the first tokens // seq-len blocks).")] = 16384,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per block.")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Blocks per forward+backward.")] = 8,
    device: Annotated[str | None, typer.Option(help="cpu (default), cuda, cuda:N or mps.")] = None,
    device_map: Annotated[str | None, typer.Option("--device-map", help="Spread the layers over all GPUs "
                                                   "instead of --device: auto, balanced, balanced_low_0 or "
                                                   "sequential (a model larger than one GPU).")] = None,
    dtype: Annotated[str, typer.Option(help="Weights dtype: float32, bfloat16, float16 or auto.")] = "float32",
    autocast: Annotated[str, typer.Option(help="Run the passes under torch.autocast: none, bf16 or fp16 "
                                          "(for GPUs).")] = "none",
    text_field: Annotated[str | None, typer.Option("--text-field", help="Field/column holding the text "
                                                   "(.jsonl / .parquet / hf:).")] = None,
    layerwise: Annotated[bool, typer.Option("--layerwise", help="Hold one decoder block at a time on --device "
                                            "(read from the safetensors shards), so a model larger than the "
                                            "device scores on it: forward-only and weight methods (head-act, "
                                            "neuron-act, neuron-wanda, layer-bi, sv-act, channel-norm, expert-freq, "
                                            "expert-reap, sv, *-magnitude); fast / all then mean the ones of these the model has, a gradient or "
                                            "ablation method named explicitly is refused.")] = False,
    json_out: JsonOpt = False,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
) -> None:
    """Score heads, KV groups, neurons, layers, singular values, residual channels and MoE experts on calibration
    text; write one score file."""
    from surgery.importance import parse_methods, save_scores, score_source  # torch: imported only when needed
    from surgery.importance.layerwise import layerwise_methods

    (layerwise_methods if layerwise else parse_methods)(method)  # a typo fails before anything loads
    _check_out(out_file)
    bar, status, progress, phase = _progress_bar(not json_out and err.is_terminal)
    notes = LateNotes() if bar is None and not json_out else None  # off a terminal: a line per long step
    if notes is not None:
        status, phase = notes, lambda name, total, unit: notes(f"scoring: {name} ({total:,} {unit})")
    if bar is not None:
        bar.start()
    try:
        scores = score_source(source, data, method, tokens=tokens, seq_len=seq_len, batch_size=batch_size,
                              device=device, device_map=device_map, dtype=dtype, autocast=autocast,
                              text_field=text_field, layerwise=layerwise,
                              allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, progress=progress,
                              status=status, phase=phase)
        if status:
            status("writing scores")
        save_scores(out_file, scores)
    finally:
        if bar is not None:
            bar.stop()
        if notes is not None:
            notes.close()
    meta = scores.meta
    if json_out:
        print_json({"out": str(out_file), "metrics": sorted(scores.metrics()), "tensors": len(scores.tensors),
                    **meta.model_dump(exclude_none=True)})
        return
    out.print(
        f"[green]wrote[/] {out_file}: {len(scores.metrics())} metric(s), {fmt_int(len(scores.tensors))} tensors, "
        f"{fmt_int(meta.tokens)} calibration tokens, {meta.seconds:.1f}s of scoring (passes and SVDs)"
    )
