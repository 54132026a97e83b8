"""`workbench compare A B C ...`: one table, rows = metrics, columns = models, deltas against the first column.

Every model is evaluated with the same settings (stored records are reused when model, data and settings match);
`--json` and `--markdown` print the same table for machines and reports.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from surgery.errors import UserError
from workbench.cli_common import AllowPickleOpt, JsonOpt, TrustRemoteCodeOpt, out, print_json
from workbench.commands.evaluate import (
    BatchOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    FreshOpt,
    GenerateOpt,
    GenTokensOpt,
    LmEvalLimitOpt,
    LmEvalOpt,
    NewTokensOpt,
    PromptLenOpt,
    RecordsOpt,
    RepeatsOpt,
    SeqLenOpt,
    SpeedBatchOpt,
    SpeedOpt,
    StrideOpt,
    TeacherOpt,
    TextFieldOpt,
    ThreadsOpt,
    TokensOpt,
    TopKOpt,
    WarmupOpt,
    fail_on_skipped,
    make_settings,
    print_notes,
    progress_bar,
    render_table,
    set_threads,
)


def compare(
    sources: Annotated[list[str], typer.Argument(help="Models to compare; the first one is the baseline.")],
    data: DataOpt = None,
    seq_len: SeqLenOpt = None,
    stride: StrideOpt = None,
    tokens: TokensOpt = None,
    batch_size: BatchOpt = 1,
    teacher: TeacherOpt = None,
    top_k: TopKOpt = 5,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    speed: SpeedOpt = True,
    prompt_len: PromptLenOpt = None,
    new_tokens: NewTokensOpt = 16,
    speed_batch: SpeedBatchOpt = 4,
    repeats: RepeatsOpt = 3,
    warmup: WarmupOpt = 1,
    generate: GenerateOpt = 0,
    gen_tokens: GenTokensOpt = 32,
    lm_eval: LmEvalOpt = None,
    lm_eval_limit: LmEvalLimitOpt = None,
    text_field: TextFieldOpt = None,
    records: RecordsOpt = None,
    fresh: FreshOpt = False,
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="A Markdown table on stdout (for reports).")] = False,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
) -> None:
    """Compare models side by side: one table of metrics with deltas against the first model."""
    from surgery.metrics.records import RecordStore
    from surgery.metrics.runner import compare_sources
    from surgery.metrics.table import build_comparison

    if json_out and markdown:
        raise UserError("choose one of --json and --markdown")
    settings = make_settings(
        data=data, text_field=text_field, seq_len=seq_len, stride=stride, max_tokens=tokens, batch_size=batch_size,
        teacher=teacher, top_k=top_k, device=device, dtype=dtype, speed=speed, prompt_len=prompt_len,
        new_tokens=new_tokens, speed_batch=speed_batch, repeats=repeats, warmup=warmup, generate=generate,
        gen_tokens=gen_tokens, lm_eval=lm_eval, lm_eval_limit=lm_eval_limit, allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
    )
    set_threads(threads)
    store = RecordStore(records)
    with progress_bar() as progress:
        evals = compare_sources(sources, settings, store=store, fresh=fresh, progress=progress)
    comp = build_comparison(evals)
    if json_out:
        print_json({**comp.to_dict(), "records_dir": str(store.root)})
    elif markdown:
        sys.stdout.write(comp.to_markdown())
        sys.stdout.flush()
    else:
        out.print(render_table(comp, f"compare · baseline {comp.columns[0]}"))
        print_notes(comp)
    fail_on_skipped(evals)
