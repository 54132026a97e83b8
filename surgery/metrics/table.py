"""The comparison table as plain data: rows = metrics, columns = models, deltas against the first column.

Front ends only draw it (rich on a terminal, Markdown, JSON); every decision about what may be compared is made
here:

- a cell of a data-dependent metric (perplexity, agreement) whose data fingerprint differs from the first column's
  is marked with a dagger and gets no delta: numbers measured on different tokens (another tokenizer, other
  blocks) are not comparable, and the note under the table says so; the same for rec metrics measured on another
  prepared split (a first column without rec metrics, a plain language model, marks nothing);
- a metric that was asked for but skipped (a teacher with another vocabulary) shows "skipped", with the reason in
  the notes;
- a timed metric whose difference is within the two spreads is "same" (noise), not better or worse; one whose
  spread is over 15% of its value is shown as "~value" with a note (and is measured again rather than reused);
- a size in another format than the first column's (a Q4_1 GGUF against float32 safetensors) is marked and gets
  no delta: "bytes as checkpoint" and "params" are the like-with-like rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from surgery.metrics.records import DATA_KINDS, KINDS, NOISY, EvalRecord, Metric

MARK_DATA = "†"
_SAME = 0.005  # relative changes below half a percent are shown as unchanged


@dataclass
class Cell:
    """One value of the table.

    Attributes:
        value: the raw value (None: not measured for this model).
        text: the value formatted with its unit (and spread).
        delta: relative change against the first column ((v - base) / |base|), None when not comparable.
        verdict: "better", "worse", "same" or None (no delta, or the metric has no good direction).
        mark: MARK_DATA when measured on other tokens than the first column; "skipped"; or None.
        reused: the number came from a stored record.
    """

    value: int | float | str | None
    text: str
    delta: float | None = None
    verdict: str | None = None
    mark: str | None = None
    reused: bool = False


@dataclass
class Row:
    """One metric across all models."""

    kind: str
    name: str
    unit: str
    better: str | None
    cells: list[Cell]
    note: str | None = None

    @property
    def label(self) -> str:
        """The row's title: the metric name, with the prompt for a generation sample."""
        return f"{self.name}: {self.note}" if self.note else self.name


@dataclass
class Comparison:
    """The whole table: column labels, model fingerprints, rows in KINDS order, notes to print under it."""

    columns: list[str]
    models: list[dict]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready data (what `workbench compare --json` prints)."""
        return {"version": 1, "columns": self.columns, "models": self.models,
                "rows": [asdict(r) for r in self.rows], "notes": self.notes}

    def to_markdown(self) -> str:
        """A GitHub-flavoured Markdown table with the notes below it."""
        head = ["metric", *(_md(c) for c in self.columns)]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(self.columns)) + "|"]
        for row in self.rows:
            cells = [_md(cell_text(c, with_delta=True)) for c in row.cells]
            lines.append("| " + " | ".join([_md(row.label), *cells]) + " |")
        text = "\n".join(lines) + "\n"
        if self.notes:
            text += "\n" + "\n".join(f"- {_md(n, table=False)}" for n in self.notes) + "\n"
        return text


def _md(text: str, table: bool = True) -> str:
    text = text.replace("\n", " ⏎ ")
    return text.replace("|", "\\|") if table else text


def cell_text(cell: Cell, *, with_delta: bool) -> str:
    """The cell as one string: value, then the mark or the delta in brackets."""
    text = cell.text
    if cell.mark == MARK_DATA:
        text += f" {MARK_DATA}"
    if with_delta and cell.delta is not None:
        text += f" ({format_delta(cell.delta)})"
    return text


def format_delta(delta: float) -> str:
    """+12.3% / -4.0% / ±0.0%."""
    return "±0.0%" if abs(delta) < 0.0005 else f"{delta:+.1%}"


def _si(value: float, unit: str) -> str:
    for prefix, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{prefix}{unit}" if not unit else f"{value / size:.2f} {prefix}{unit}"
    return f"{value:g}" + (f" {unit}" if unit else "")


def format_value(value: int | float | str | None, unit: str, spread: float | None = None) -> str:
    """A value with its unit, the way the tables show it (spread as ±)."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if unit == "params":
        text = _si(value, "")
    elif unit == "bytes":
        text = f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.1f} MiB"
    elif unit == "FLOPs":
        text = _si(value, "FLOPs")
    elif unit == "fraction":
        text = f"{value:.1%}"
    elif unit == "s":
        text = f"{value:.3g} s"
    elif unit in ("ms", "tokens/s", "MiB"):
        text = f"{value:,.1f} {unit}"
    elif unit in ("nats", "score"):
        text = f"{value:.4f}" + (f" {unit}" if unit == "nats" else "")
    else:  # perplexity and other plain numbers: 4 significant digits, thousands separated
        text = f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    if spread is not None and spread > 0:
        text += f" ±{spread:,.1f}" if unit in ("ms", "tokens/s", "MiB") else f" ±{spread:.4f}"
    return text


def _verdict(base: Metric, metric: Metric, delta: float) -> str | None:
    if metric.better is None:
        return None
    noise = (base.spread or 0) + (metric.spread or 0)
    if abs(delta) < _SAME or (noise and abs(float(metric.value) - float(base.value)) <= noise):
        return "same"
    improved = delta < 0 if metric.better == "lower" else delta > 0
    return "better" if improved else "worse"


def build_comparison(evals: list) -> Comparison:
    """Lay out the records of several ModelEvals (see runner.py) as one table.

    Args:
        evals: ModelEval objects, the first one being the baseline column.

    Returns:
        The Comparison (rows in KINDS order, then in the order metrics appear).
    """
    labels = short_labels([e.label for e in evals])
    comp = Comparison(columns=labels, models=[{"label": lab, **e.model.model_dump()} for lab, e in zip(labels, evals)])
    comp.notes += legend(labels, [e.label for e in evals], evals)
    by_col: list[dict[tuple[str, str], tuple[EvalRecord, Metric]]] = []
    order: list[tuple[str, str]] = []
    for e in evals:
        found = {}
        for rec in e.records:
            for m in rec.metrics:
                found[(rec.kind, m.name)] = (rec, m)
                if (rec.kind, m.name) not in order:
                    order.append((rec.kind, m.name))
        by_col.append(found)
    order.sort(key=lambda km: KINDS.index(km[0]))  # stable: keeps appearance order within a kind
    data_note_cols: set[tuple[int, bool]] = set()  # (column, rec metrics?)
    for kind, name in order:
        first = next(m for col in by_col if (kind, name) in col for m in [col[(kind, name)][1]])
        row = Row(kind, name, first.unit, first.better, [], note=first.note if kind == "generation" else None)
        base = by_col[0].get((kind, name))
        for i, (e, col) in enumerate(zip(evals, by_col)):
            if (kind, name) not in col:
                reason = e.skipped.get(kind)
                row.cells.append(Cell(None, "skipped" if reason else "-", mark="skipped" if reason else None))
                continue
            rec, m = col[(kind, name)]
            cell = Cell(m.value, format_value(m.value, m.unit, m.spread), reused=rec.key in e.reused)
            if m.is_noisy():
                cell.text = "~" + cell.text
                comp.notes.append(f"~ {labels[i]}: {name} {cell.text[1:]} swings more than {NOISY:.0%} between "
                                  "repeats (a busy machine?): noisy; measured again next time, not reused")
            if i > 0 and kind in DATA_KINDS and _other_data(kind, base, rec):
                cell.mark = MARK_DATA
                data_note_cols.add((i, kind == "rec"))
            elif i > 0 and kind == "size" and base is not None and m.note and base[1].note and m.note != base[1].note:
                cell.mark = MARK_DATA  # a 4-bit GGUF against float32 safetensors: bytes, but not like with like
                comp.notes.append(f"{MARK_DATA} {labels[i]}: {name} is {m.note}, {labels[0]}'s is {base[1].note}: "
                                  "other formats, no delta (see 'bytes as checkpoint' and 'params')")
            elif i > 0 and base is not None and _numeric(m.value) and _numeric(base[1].value) and base[1].value:
                cell.delta = (float(m.value) - float(base[1].value)) / abs(float(base[1].value))
                cell.verdict = _verdict(base[1], m, cell.delta)
            row.cells.append(cell)
        comp.rows.append(row)
    for i, is_rec in sorted(data_note_cols):
        comp.notes.append(_data_note(labels[i], by_col[i], by_col[0], labels[0], is_rec))
    for lab, e in zip(labels, evals):
        for kind, reason in e.skipped.items():
            comp.notes.append(f"{lab}: {reason}")
    return comp


def _numeric(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _data_fp(rec: EvalRecord) -> str | None:
    return rec.data.fingerprint if rec.data else None


def _other_data(kind: str, base: tuple[EvalRecord, Metric] | None, rec: EvalRecord) -> bool:
    """Measured on other data than the first column (for rec metrics: only when the first column has them too)."""
    if base is None:
        return kind != "rec"
    return _data_fp(base[0]) != _data_fp(rec)


def _data_note(label: str, col: dict, base_col: dict, base_label: str, is_rec: bool = False) -> str:
    def fp(c: dict) -> str:
        recs = [rec for (kind, _), (rec, _) in c.items() if kind in DATA_KINDS and (kind == "rec") == is_rec]
        if not recs or recs[0].data is None:
            return "none"
        d = recs[0].data
        if is_rec:
            return f"{d.fingerprint.removeprefix('sha256:')[:12]} ({d.users} users, {d.items} items)"
        return f"{d.fingerprint.removeprefix('sha256:')[:12]} ({d.blocks} x {d.seq_len} tokens)"

    if is_rec:
        return (f"{MARK_DATA} {label}: rec metrics measured on another split than {base_label}'s (data {fp(col)} vs "
                f"{fp(base_col)}): not comparable, no delta")
    return (f"{MARK_DATA} {label}: measured on other tokens than {base_label} (data {fp(col)} vs {fp(base_col)}; "
            "a different tokenizer or other blocks): not comparable, no delta")


def short_labels(sources: list[str]) -> list[str]:
    """A short, distinct column name per model: the last path component, with as many parent components as it
    takes to tell two apart (`work/smollm2-a`, `other/smollm2-a`); the full paths go in the legend."""
    parts = [[p for p in s.replace("\\", "/").rstrip("/").split("/") if p] or [s] for s in sources]
    depth = [1] * len(parts)
    for _ in range(max((len(p) for p in parts), default=1)):
        names = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        clash = {n for n in names if names.count(n) > 1}
        if not clash:
            break
        depth = [d + 1 if n in clash and d < len(p) else d for n, d, p in zip(names, depth, parts)]
    return _unique(["/".join(p[-d:]) for p, d in zip(parts, depth)])


def legend(labels: list[str], sources: list[str], evals: list) -> list[str]:
    """Under the table: which column is which model (when shortened) and which tokens the data rows used."""
    lines = [f"{lab} = {src}" for lab, src in zip(labels, sources) if lab != src]
    seen = set()
    for lab, e in zip(labels, evals):
        for rec in e.records:
            d = rec.data
            if rec.kind in DATA_KINDS and rec.kind != "rec" and d is not None and d.fingerprint not in seen:
                seen.add(d.fingerprint)
                lines.append(f"data: {d.source}, {d.blocks} x {d.seq_len} = {d.tokens:,} tokens "
                             f"({d.fingerprint.removeprefix('sha256:')[:12]})")
    return lines


def _unique(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 else f"{lab} ({seen[lab]})")
    return out
