"""Figures, rows and targets, and their markdown and JSON forms.

Variants are measured interleaved, so repetition ``i`` of a row and repetition ``i`` of its
baseline ran back to back under the same machine conditions. Comparisons therefore use
*paired* statistics: the median (and IQR) of the per-repetition ratios, or differences, of a
row to its baseline. On a noisy machine these are much steadier than a ratio of medians.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from benchmarks.common import Summary


@dataclass(frozen=True)
class Target:
    """A goal for one row against its baseline row, judged on the paired median:
    ``ratio`` (row ÷ baseline ≤ limit) or ``delta`` (row − baseline ≤ limit, in the unit)."""

    kind: Literal["ratio", "delta"]
    limit: float
    text: str


@dataclass
class Row:
    """One variant of a figure: its value per repetition, in the figure's unit."""

    key: str
    label: str
    values: list[float]
    baseline: str | None = None
    """The key of the row this one is compared with (its ratio column)."""
    target: Target | None = None
    note: str = ""
    short: str = ""
    """A short name for the ratio column of rows compared with this one (default: label)."""

    @property
    def summary(self) -> Summary:
        """Median and spread of the values."""
        return Summary.of(self.values)


@dataclass
class Figure:
    """One figure: rows measured interleaved, in one unit."""

    id: str
    title: str
    unit: str
    params: str
    higher_is_better: bool = False
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self, key: str) -> Row | None:
        """The row with ``key``, if it was measured."""
        return next((r for r in self.rows if r.key == key), None)

    @property
    def base_unit(self) -> str:
        """The unit without its per-part (``µs`` of ``µs/exit``)."""
        return self.unit.split("/")[0]


def fmt(value: float) -> str:
    """A number with three significant digits (thousands separated when large)."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def fmt_delta(value: float) -> str:
    """A signed difference with two decimals, as the verdicts show it (``+0.26``), or with
    three significant digits when large (``+1,250``)."""
    if abs(value) < 100:
        return f"{value:+.2f}"
    return ("-" if value < 0 else "+") + fmt(abs(value))


def fmt_ratio(value: float) -> str:
    """A ratio with three significant digits."""
    return f"{value:,.0f}" if value >= 1000 else f"{value:.3g}"


def paired_ratios(row: Row, base: Row) -> Summary:
    """The row's values divided by its baseline's, repetition by repetition."""
    return Summary.of([a / b for a, b in zip(row.values, base.values, strict=True)])


def paired_deltas(row: Row, base: Row) -> Summary:
    """The row's values minus its baseline's, repetition by repetition."""
    return Summary.of([a - b for a, b in zip(row.values, base.values, strict=True)])


@dataclass(frozen=True)
class Verdict:
    """A target judged: whether it is met, and the paired median it was judged on."""

    met: bool
    value: float

    def text(self, target: Target, unit: str) -> str:
        """``pass``/``MISS``, the target and the measured paired median."""
        got = f"{self.value:.3g}×" if target.kind == "ratio" else f"{self.value:+.2f} {unit}"
        return f"{'pass' if self.met else 'MISS'} ({target.text}; paired median {got})"


def judge(fig: Figure, row: Row, base: Row, target: Target) -> Verdict:
    """Judges ``target`` on the paired median of ``row`` against ``base``."""
    if target.kind == "ratio":
        value = paired_ratios(row, base).median
    else:
        value = paired_deltas(row, base).median
    return Verdict(value <= target.limit, value)


def ratio_text(s: Summary, name: str) -> str:
    """``1.02× NAME [q1–q3]`` for a summary of ratios (no IQR for a single value)."""
    text = f"{fmt_ratio(s.median)}× {name}"
    if s.n >= 2:
        text += f" [{fmt_ratio(s.q1)}–{fmt_ratio(s.q3)}]"
    return text


def figure_markdown(fig: Figure) -> list[str]:
    """The figure as a markdown section with a table."""
    better = "higher" if fig.higher_is_better else "lower"
    lines = [f"### {fig.title}", "", f"{fig.params}. Unit: {fig.unit}, {better} is better.", ""]
    lines.append(
        f"| variant | median ({fig.unit}) | min – max | IQR | ÷ baseline, paired: median [IQR] "
        "| target |"
    )
    lines.append("|---|---:|---:|---:|---|---|")
    for row in fig.rows:
        s = row.summary
        base = fig.row(row.baseline) if row.baseline else None
        vs = "(baseline)"
        target = ""
        if base is not None:
            vs = ratio_text(paired_ratios(row, base), base.short or base.label)
            if row.target is not None:
                target = judge(fig, row, base, row.target).text(row.target, fig.base_unit)
        label = row.label + (f" ({row.note})" if row.note else "")
        lines.append(
            f"| {label} | {fmt(s.median)} | {fmt(s.min)} – {fmt(s.max)} "
            f"| {fmt(s.q1)} – {fmt(s.q3)} | {vs} | {target} |"
        )
    if fig.notes:
        lines.append("")
        lines.extend(f"- {n}" for n in fig.notes)
    lines.append("")
    return lines


@dataclass(frozen=True)
class Headline:
    """One headline comparison: ``row`` of figure ``fig`` against row ``base``, shown as
    their paired time ratio or, with ``kind="delta"``, their paired difference."""

    label: str
    fig: str
    row: str
    base: str
    target: Target | None = None
    kind: Literal["ratio", "delta"] = "ratio"


def headline_rows(figures: list[Figure], headlines: list[Headline]) -> list[dict[str, Any]]:
    """The headline comparisons whose rows were both measured, as time ratios (kvmpy ÷
    baseline; for throughput figures, the inverse of the throughput ratio) and differences
    (kvmpy − baseline, in the figure's unit)."""
    by_id = {f.id: f for f in figures}
    out: list[dict[str, Any]] = []
    for h in headlines:
        fig = by_id.get(h.fig)
        row = fig.row(h.row) if fig else None
        base = fig.row(h.base) if fig else None
        if fig is None or row is None or base is None:
            continue
        if fig.higher_is_better:
            ratios = paired_ratios(base, row)
        else:
            ratios = paired_ratios(row, base)
        entry: dict[str, Any] = {
            "label": h.label,
            "figure": h.fig,
            "row": h.row,
            "baseline": h.base,
            "kind": h.kind,
            "time_ratio": ratios.as_dict(),
            "delta": paired_deltas(row, base).as_dict(),
            "value": row.summary.median,
            "baseline_value": base.summary.median,
            "unit": fig.unit,
        }
        if h.target is not None:
            verdict = judge(fig, row, base, h.target)
            entry["target"] = h.target.text
            entry["met"] = verdict.met
            entry["verdict"] = verdict.text(h.target, fig.base_unit)
        out.append(entry)
    return out


def headline_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The headline table: paired time ratios (÷ rows) or differences (− rows), with the
    absolute medians beside them."""
    lines = [
        "| comparison | paired: median [IQR] | measured (median) | baseline (median) | target |",
        "|---|---:|---:|---:|---|",
    ]
    for h in rows:
        unit = h["unit"]
        if h.get("kind") == "delta":
            d = h["delta"]
            paired = f"{fmt_delta(d['median'])} {unit}"
            if d["n"] >= 2:
                paired += f" [{fmt_delta(d['q1'])} to {fmt_delta(d['q3'])}]"
        else:
            r = h["time_ratio"]
            paired = f"{fmt_ratio(r['median'])}×"
            if r["n"] >= 2:
                paired += f" [{fmt_ratio(r['q1'])}–{fmt_ratio(r['q3'])}]"
        lines.append(
            f"| {h['label']} | {paired} | {fmt(h['value'])} {unit} "
            f"| {fmt(h['baseline_value'])} {unit} | {h.get('verdict', '')} |"
        )
    return lines


def figure_json(fig: Figure) -> dict[str, Any]:
    """The figure with every repetition's value, for the JSON file."""
    rows = []
    for row in fig.rows:
        base = fig.row(row.baseline) if row.baseline else None
        entry: dict[str, Any] = {
            "key": row.key,
            "label": row.label,
            "note": row.note,
            "values": row.values,
            **row.summary.as_dict(),
        }
        if base is not None:
            entry["baseline"] = base.key
            entry["paired_ratio"] = paired_ratios(row, base).as_dict()
            entry["paired_delta"] = paired_deltas(row, base).as_dict()
            if row.target is not None:
                verdict = judge(fig, row, base, row.target)
                entry["target"] = row.target.text
                entry["met"] = verdict.met
        rows.append(entry)
    return {
        "id": fig.id,
        "title": fig.title,
        "unit": fig.unit,
        "params": fig.params,
        "higher_is_better": fig.higher_is_better,
        "rows": rows,
        "notes": fig.notes,
    }
