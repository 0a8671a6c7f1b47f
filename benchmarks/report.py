"""Results: medians with min-max and the paired ratio to native, as Markdown, JSON and PNGs.

The ratio is paired: each round's value is divided by the same round's native value, then the
median of those ratios is taken, so a slow round (another job on a shared machine) affects
every target of that round alike instead of skewing one column.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NATIVE = "native"


@dataclass
class Row:
    """One line of the table: a workload's metric, per target the value of each round."""

    key: str
    label: str
    group: str
    unit: str
    plot: tuple[str, float] | None = None
    values: dict[str, list[float | None]] = field(default_factory=dict)
    # Warm rows: per target and round, the workload's Warmth (None: no value, nothing checked).
    warmth: dict[str, list[Any]] = field(default_factory=dict)

    def not_warm(self, target: str) -> int:
        """Rounds whose timed pass was still found cold after its retries."""
        return sum(1 for warmth in self.warmth.get(target, []) if warmth and not warmth.warm)

    def summary(self, target: str) -> dict[str, Any] | None:
        values = [value for value in self.values.get(target, []) if value is not None]
        if not values:
            return None
        return {"median": statistics.median(values), "min": min(values), "max": max(values),
                "n": len(values), "ratio": self.ratio(target)}

    def ratio(self, target: str) -> float | None:
        natives = self.values.get(NATIVE, [])
        ratios = [value / native
                  for value, native in zip(self.values.get(target, []), natives, strict=False)
                  if value is not None and native]
        return statistics.median(ratios) if ratios else None


def format_value(value: float, unit: str) -> str:
    if unit == "s":
        if value < 1e-3:
            return f"{value * 1e6:.0f} µs"
        if value < 1:
            return f"{value * 1e3:.3g} ms"
        return f"{value:.3g} s"
    if unit == "us":
        return f"{value:.3g} µs"
    return f"{value:,.0f} {unit}"


def format_range(low: float, high: float, unit: str) -> str:
    return f"{format_value(low, unit)}-{format_value(high, unit)}"


def format_cell(row: Row, target: str) -> str:
    summary = row.summary(target)
    if summary is None:
        return "—"
    text = format_value(summary["median"], row.unit)
    if summary["n"] > 1:
        text += f" ({format_range(summary['min'], summary['max'], row.unit)})"
    if target != NATIVE and summary["ratio"] is not None:
        text += f" x{summary['ratio']:.3g}"
    if cold := row.not_warm(target):
        text += f" **not warm** ({cold}/{summary['n']} rounds)"
    return text


def warm_check_lines(rows: list[Row], targets: list[str]) -> list[str]:
    """The warm checks: how many passed, and every retry or failure with its reason."""
    checked = retried = 0
    lines = []
    for row in rows:
        if not row.warmth:
            continue
        for target in targets:
            for round_index, warmth in enumerate(row.warmth.get(target, [])):
                if warmth is None:
                    continue
                checked += 1
                if warmth.problems:
                    retried += 1
                    verdict = (f"warm at attempt {warmth.attempts}" if warmth.warm
                               else "NOT warm, marked")
                    lines.append(f"- {row.key} on {target}, round {round_index + 1}: {verdict}"
                                 f" ({' | '.join(warmth.problems)})")
    if not checked:
        return []
    failed = sum(row.not_warm(target) for row in rows if row.warmth
                 for target in targets)
    summary = (f"{checked} warm measurements checked: {checked - failed} warm "
               f"({retried} needed a retry), {failed} not warm.")
    return [summary, "", *lines] if lines else [summary]


def markdown(results: dict[str, Any], rows: list[Row]) -> str:
    """The results as a Markdown document: machine, method, the table, problems."""
    targets: list[str] = results["targets"]
    lines = [f"# cowfs copy-up cost: {results['mode']} run, {results['started']}", ""]
    lines += ["## Machine", ""]
    lines += [f"- {name}: {value}" for name, value in results["machine"].items()]
    lines += ["", "## Method", ""]
    lines += [f"- {note}" for note in results["notes"]]
    skipped = results.get("skipped_targets", {})
    if skipped:
        lines += [f"- skipped target {name}: {reason}" for name, reason in skipped.items()]
    lines += ["", "## Tree check", ""]
    for target, outcome in results["tree_check"].items():
        lines.append(f"- {target}: {outcome}")
    lines += ["", "## Results", "",
              f"Median over {results['rounds']} round(s), (min-max), x ratio to native "
              "(paired per round, median). Lower is better.", ""]
    lines.append("| workload | " + " | ".join(targets) + " |")
    lines.append("|---|" + "---|" * len(targets))
    group = None
    for row in rows:
        if row.group != group:
            group = row.group
            lines.append(f"| **{group}** |" + " |" * len(targets))
        cells = [format_cell(row, target) for target in targets]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    if warm_lines := warm_check_lines(rows, targets):
        lines += ["", "## Warm checks", "", *warm_lines]
    if results.get("cowfs_stats"):
        lines += ["", "## cowfs copy-up statistics (trusted.cowfs.stats, last round)", ""]
        for key, stats in results["cowfs_stats"].items():
            lines.append(f"- {key}: `{json.dumps(stats, sort_keys=True)}`")
    if results["errors"]:
        lines += ["", "## Errors", ""]
        lines += [f"- {error}" for error in results["errors"]]
    lines += ["", f"Lower layers unchanged after the run: {results['lowers_unchanged']}.",
              f"Run time: {results['duration_s']:.0f} s.", ""]
    plots = results.get("plots", [])
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    return "\n".join(lines)


def rows_json(rows: list[Row], targets: list[str]) -> list[dict[str, Any]]:
    return [{"key": row.key, "label": row.label, "group": row.group, "unit": row.unit,
             "targets": {target: {"values": row.values.get(target, []),
                                  **(row.summary(target) or {}),
                                  **({"warm_checked": [_warmth_json(warmth) for warmth
                                                       in row.warmth.get(target, [])],
                                      "not_warm_rounds": row.not_warm(target)}
                                     if row.warmth else {})}
                         for target in targets}}
            for row in rows]


def _warmth_json(warmth: Any) -> dict[str, Any] | None:
    if warmth is None:
        return None
    return {"warm": warmth.warm, "attempts": warmth.attempts, "problems": list(warmth.problems)}


def plot(rows: list[Row], targets: list[str], out: Path) -> tuple[list[str], str | None]:
    """PNG plots if matplotlib is there; returns their file names and a notice if not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return [], ("matplotlib is not installed, so no plots "
                    "(.venv/bin/pip install -e '.[bench]')")
    names = []
    for name, series, xlabel, titles in (
        ("copyup-latency.png", ("copy-up",), "lower file size (bytes)",
         "first write (copy-up) latency; native = in-kernel copy + write"),
        ("stat-depth.png", ("stat-cold", "stat-warm"), "lower layers",
         "stat of every file against layer depth (solid cold, dashed warm)"),
    ):
        figure, axes = pyplot.subplots(figsize=(8, 5))
        drawn = False
        for index, target in enumerate(targets):
            color = f"C{index}"
            for style, serie in zip(("-", "--"), series, strict=False):
                points = sorted((row.plot[1], summary["median"] * 1e3) for row in rows
                                if row.plot and row.plot[0] == serie
                                and (summary := row.summary(target)) is not None)
                if not points:
                    continue
                xs, ys = zip(*points, strict=True)
                label = target if style == "-" else None
                axes.plot(xs, ys, style, marker="o", color=color, label=label)
                drawn = True
        if not drawn:
            pyplot.close(figure)
            continue
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel(xlabel)
        axes.set_ylabel("milliseconds (median)")
        axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axes.set_title(titles, fontsize=10)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
        if name == "stat-depth.png":
            depths = sorted({row.plot[1] for row in rows
                             if row.plot and row.plot[0] == "stat-cold"})
            axes.set_xticks(depths, [f"{depth:g}" for depth in depths])
        figure.tight_layout()
        figure.savefig(out / name, dpi=100)
        pyplot.close(figure)
        names.append(name)
    return names, None


def write_all(results: dict[str, Any], rows: list[Row], out: Path) -> list[str]:
    """results.json, results.md and the PNGs in *out*; returns notices for the user."""
    out.mkdir(parents=True, exist_ok=True)
    notices = []
    names, notice = plot(rows, results["targets"], out)
    if notice:
        notices.append(notice)
    results["plots"] = names
    results["rows"] = rows_json(rows, results["targets"])
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results, rows))
    return notices
