"""`workbench compare A B C ...`: one table, rows = metrics, columns = models, deltas against the first column.

Every model is evaluated with the same settings (stored records are reused when model, data and settings match);
`--json` and `--markdown` print the same table for machines and reports. Rec model directories (LLM recommenders
and SASRec/GRU4Rec baselines) get HR/NDCG/MRR rows with `--rec-data`; a baseline, not a language model, leaves the
language-model rows blank.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from surgery.errors import UserError
from workbench.cli_common import JsonOpt, eval_settings, out, print_json, shared_options
from workbench.commands.evaluate import EVAL_OPTIONS, fail_on_skipped, print_notes, progress_bar, render_table


@shared_options(EVAL_OPTIONS)
def compare(
    sources: Annotated[list[str], typer.Argument(help="Models to compare; the first one is the baseline.")],
    json_out: JsonOpt = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="A Markdown table on stdout (for reports).")] = False,
    *,
    options: dict,
) -> None:
    """Compare models side by side: one table of metrics with deltas against the first model."""
    from surgery.metrics.runner import compare_sources
    from surgery.metrics.table import build_comparison

    if json_out and markdown:
        raise UserError("choose one of --json and --markdown")
    settings, store = eval_settings(options)
    with progress_bar() as progress:
        evals = compare_sources(sources, settings, store=store, fresh=options["fresh"], progress=progress)
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
