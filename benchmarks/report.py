"""Figures, rows and targets, and their markdown and JSON forms."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Literal

from benchmarks.common import Summary


@dataclass(frozen=True)
class Target:
    """A goal for one row, relative to its baseline row: ``ratio`` (median ÷ baseline
    median ≤ limit) or ``delta`` (median − baseline median ≤ limit, in the figure's unit)."""

    kind: Literal["ratio", "delta"]
    limit: float
    text: str

    def met(self, value: float, baseline: float) -> bool:
        """Whether ``value`` meets the target against ``baseline`` (both medians)."""
        if self.kind == "ratio":
            return value <= self.limit * baseline
        return value - baseline <= self.limit


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


def paired_ratios(row: Row, base: Row) -> list[float]:
    """Ratios of the row's values to its baseline's, repetition by repetition."""
    return [a / b for a, b in zip(row.values, base.values, strict=False) if b]


def target_status(fig: Figure, row: Row, base: Row) -> str:
    """``pass``/``MISS`` and the target, for a row with a target."""
    assert row.target is not None
    ok = row.target.met(row.summary.median, base.summary.median)
    text = f"{'pass' if ok else 'MISS'} ({row.target.text}"
    if row.target.kind == "delta":
        text += f"; {row.summary.median - base.summary.median:+.2f} {fig.unit.split('/')[0]}"
    return text + ")"


def ratio_text(row: Row, base: Row) -> str:
    """The row's median relative to its baseline's, with the range of the paired ratios."""
    ratio = row.summary.median / base.summary.median
    pairs = paired_ratios(row, base)
    text = f"{ratio:.3g}×" if ratio < 100 else f"{ratio:,.0f}×"
    text += f" {base.short or base.label}"
    if len(pairs) >= 2:
        text += f" ({min(pairs):.3g}–{max(pairs):.3g})"
    return text


def figure_markdown(fig: Figure) -> list[str]:
    """The figure as a markdown section with a table."""
    better = "higher" if fig.higher_is_better else "lower"
    lines = [f"### {fig.title}", "", f"{fig.params}. Unit: {fig.unit}, {better} is better.", ""]
    lines.append(
        f"| variant | median ({fig.unit}) | min – max | IQR | ÷ baseline (paired range) | target |"
    )
    lines.append("|---|---:|---:|---:|---|---|")
    for row in fig.rows:
        s = row.summary
        base = fig.row(row.baseline) if row.baseline else None
        vs = ratio_text(row, base) if base else "(baseline)"
        target = target_status(fig, row, base) if row.target and base else ""
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
    """One headline comparison: ``row`` of figure ``fig`` against row ``base``."""

    label: str
    fig: str
    row: str
    base: str
    target: Target | None = None


def headline_rows(figures: list[Figure], headlines: list[Headline]) -> list[dict[str, Any]]:
    """The headline comparisons that could be computed (both rows measured)."""
    by_id = {f.id: f for f in figures}
    out: list[dict[str, Any]] = []
    for h in headlines:
        fig = by_id.get(h.fig)
        row = fig.row(h.row) if fig else None
        base = fig.row(h.base) if fig else None
        if fig is None or row is None or base is None:
            continue
        a, b = row.summary.median, base.summary.median
        ratio = a / b if not fig.higher_is_better else b / a
        pairs = paired_ratios(row, base)
        if fig.higher_is_better:
            pairs = [1 / p for p in pairs if p]
        entry: dict[str, Any] = {
            "label": h.label,
            "figure": h.fig,
            "row": h.row,
            "baseline": h.base,
            "time_ratio": ratio,
            "paired_min": min(pairs) if pairs else None,
            "paired_max": max(pairs) if pairs else None,
            "value": a,
            "baseline_value": b,
            "unit": fig.unit,
        }
        if h.target is not None:
            entry["target"] = h.target.text
            entry["target_kind"] = h.target.kind
            entry["met"] = h.target.met(a, b)
        out.append(entry)
    return out


def headline_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The headline table: time ratios (kvmpy ÷ baseline) with absolute numbers beside."""
    lines = [
        "| comparison | time ratio (paired range) | kvmpy | baseline | target |",
        "|---|---:|---:|---:|---|",
    ]
    for h in rows:
        ratio = f"{h['time_ratio']:.3g}×"
        if h["paired_min"] is not None and h["paired_max"] != h["paired_min"]:
            ratio += f" ({h['paired_min']:.3g}–{h['paired_max']:.3g})"
        target = ""
        unit = h["unit"]
        if "target" in h:
            target = f"{'pass' if h['met'] else 'MISS'} ({h['target']}"
            if h["target_kind"] == "delta":
                target += f"; {h['value'] - h['baseline_value']:+.2f} {unit.split('/')[0]}"
            target += ")"
        lines.append(
            f"| {h['label']} | {ratio} | {fmt(h['value'])} {unit} "
            f"| {fmt(h['baseline_value'])} {unit} | {target} |"
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
            entry["ratio"] = row.summary.median / base.summary.median
            entry["paired_ratio_median"] = statistics.median(paired_ratios(row, base))
            if row.target is not None:
                entry["target"] = row.target.text
                entry["met"] = row.target.met(row.summary.median, base.summary.median)
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
