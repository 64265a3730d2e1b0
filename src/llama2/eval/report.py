"""A run rendered: text tables, PNG charts (matplotlib's Agg canvas) and a self-contained HTML report.

The HTML is rendered by a sandboxed Jinja2 environment with autoescaping on: prompts and
answers are untrusted text. The charts are embedded as data: URIs, so the one file opens
anywhere. Every file is written atomically.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..weights.common import atomic_output
from .runs import Run, breakdowns, comparisons

REPORT_FILE = "report.html"
SUMMARY_FILE = "summary.md"
CHARTS_FOLDER = "charts"
TEMPLATE_FILE = "report.html.j2"


def percent(value: float | None, stderr: float | None = None) -> str:
    """'61.2%' or '61.2 +/- 5.4%'; '-' for None."""
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if stderr is None else f"{100 * value:.1f} +/- {100 * stderr:.1f}%"


def summary_rows(run: Run) -> list[list[str]]:
    """[task, metric, chance, one column a model] rows, the header first."""
    rows = [["task", "metric", "n", "chance", *[m.model for m in run.models]]]
    for name in run.task_names():
        results = [m.task(name) for m in run.models]
        first = next(r for r in results if r is not None)
        for metric in (first.metric, *first.extra_metrics()):
            cells = []
            for result in results:
                if result is None:
                    cells.append("-")
                    continue
                value, stderr = result.value_and_stderr if metric == first.metric else result.extra_metrics()[metric]
                cells.append(percent(value, stderr))
            rows.append([name, metric, str(len(first.items)), percent(first.chance), *cells])
    return rows


def comparison_rows(run: Run) -> list[list[str]]:
    """Paired comparisons against the baseline, the header first (empty for one model)."""
    header = ["task", "metric", "model", "vs", "difference [95% CI]", "agreement", "flips 1->0", "flips 0->1"]
    rows = [[*header, "McNemar p"]]
    for c in comparisons(run):
        ci = f"{100 * c['difference']:+.1f} [{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}] pts"
        rows.append(
            [
                c["task"],
                c["metric"],
                c["b"],
                c["a"],
                ci,
                percent(c["agreement"]),
                str(c["a_only"]),
                str(c["b_only"]),
                f"{c['mcnemar_p']:.3g}",
            ]
        )
    return rows if len(rows) > 1 else []


def breakdown_rows(run: Run) -> list[list[str]]:
    """Safety metrics by category, style and topic: [task, by, group, one column a model]."""
    table: dict[tuple[str, str, str], dict[str, str]] = {}
    for row in breakdowns(run):
        for group, stats in row["groups"].items():
            cell = f"{percent(stats['value'])} ({stats['n']})"
            table.setdefault((row["task"], row["by"], group), {})[row["model"]] = cell
    header = ["task", "by", "group", *[m.model for m in run.models]]
    return [header, *[[*key, *[cells.get(m.model, "-") for m in run.models]] for key, cells in table.items()]]


def markdown_table(rows: list[list[str]]) -> str:
    """A Markdown table with padded columns."""
    if not rows:
        return ""
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def summary_text(run: Run) -> str:
    """The run as Markdown: the summary table, paired comparisons and safety breakdowns."""
    parts = [
        f"suite {run.suite}: {', '.join(f'{m.model} ({m.seconds:.0f} s)' for m in run.models)}",
        "",
        markdown_table(summary_rows(run)),
    ]
    for title, rows in (
        ("paired comparison with the first model", comparison_rows(run)),
        ("safety by category, style and topic (rate, items)", breakdown_rows(run)),
    ):
        if len(rows) > 1:
            parts += ["", title, "", markdown_table(rows)]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------- charts


def short_name(model: str) -> str:
    """A model's file or folder name, for chart labels."""
    return Path(model).name or model


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def grouped_bars(
    title: str,
    groups: list[str],
    series: dict[str, list[tuple[float, float]]],
    ylabel: str,
    chance: list[float | None] | None = None,
) -> bytes:
    """A bar chart: one group of bars per `groups` entry, one bar a series (value, stderr), in percent."""
    figure = _figure(max(6.0, 1.1 * len(groups) * max(1, len(series)) ** 0.5 + 2), 4.0)
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(series))
    for k, (label, values) in enumerate(series.items()):
        x = [g + (k - (len(series) - 1) / 2) * width for g in range(len(groups))]
        axes.bar(x, [100 * v for v, _ in values], width, yerr=[100 * s for _, s in values], capsize=3, label=label)
    labelled = False
    for g, level in enumerate(chance or []):
        if level is not None:
            axes.hlines(
                100 * level,
                g - 0.45,
                g + 0.45,
                colors="black",
                linestyles="dashed",
                label=None if labelled else "chance",
            )
            labelled = True
    axes.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    axes.set_ylabel(ylabel)
    axes.set_ylim(0, 105)
    axes.set_title(title)
    axes.legend(fontsize="small")
    return _png(figure)


def difference_chart(rows: list[dict]) -> bytes:
    """Each comparison's difference (percentage points) with its bootstrap interval."""
    figure = _figure(9.0, 0.45 * len(rows) + 1.5)
    axes = figure.add_subplot()
    labels = [f"{r['task']}: {short_name(r['b'])} - {short_name(r['a'])}" for r in rows]
    values = [100 * r["difference"] for r in rows]
    below = [100 * (r["difference"] - r["ci_low"]) for r in rows]
    errors = [below, [100 * (r["ci_high"] - r["difference"]) for r in rows]]
    axes.errorbar(values, range(len(rows)), xerr=errors, fmt="o", capsize=4)
    axes.axvline(0, color="grey", linewidth=1)
    axes.set_yticks(range(len(rows)), labels)
    axes.invert_yaxis()
    axes.set_xlabel("model - baseline, points (95% paired bootstrap CI)", fontsize="small")
    return _png(figure)


def group_rate(breakdown: dict, group: str) -> tuple[float, float]:
    """(value, stderr) of one group of a breakdown row; zeros when the model has no item in it."""
    stats = breakdown["groups"].get(group, {})
    return stats.get("value", 0.0), stats.get("stderr", 0.0)


def charts(run: Run) -> dict[str, bytes]:
    """PNG charts by file name: the metrics of every task; differences; safety by category and style."""
    names = run.task_names()
    series = {}
    for model in run.models:
        found = [model.task(n) for n in names]
        series[short_name(model.model)] = [t.value_and_stderr if t else (0.0, 0.0) for t in found]
    chance = [next((m.task(n).chance for m in run.models if m.task(n)), None) for n in names]
    labels = [f"{n}\n({next(m.task(n).metric for m in run.models if m.task(n))})" for n in names]
    result = {"metrics.png": grouped_bars(f"suite {run.suite}", labels, series, "percent", chance)}
    rows = comparisons(run)
    if rows:
        result["differences.png"] = difference_chart(rows)
    for by in ("category", "style"):
        selected = [row for row in breakdowns(run) if row["by"] == by]
        if selected:
            groups = list(selected[0]["groups"])
            per_model = {short_name(row["model"]): [group_rate(row, g) for g in groups] for row in selected}
            result[f"safety_{by}.png"] = grouped_bars(f"red-team violation rate by {by}", groups, per_model, "percent")
    return result


# ---------------------------------------------------------------------------- HTML


def _template():
    from .datasets import builtin_folder

    environment = ImmutableSandboxedEnvironment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    return environment.from_string((builtin_folder() / TEMPLATE_FILE).read_text(encoding="utf-8"))


def examples(run: Run, per_kind: int = 3) -> list[dict]:
    """A few items per model and task worth reading: wrong answers, violations, refusals, false refusals."""
    sections = []
    for model in run.models:
        for task in model.tasks:
            if task.kind in ("multiple_choice", "generation"):
                picks = [("wrong", [i for i in task.items if not i.outcome])]
            elif task.kind == "redteam":
                picks = [
                    ("violation", [i for i in task.items if i.outcome]),
                    ("refused", [i for i in task.items if not i.outcome]),
                ]
            else:
                picks = [
                    ("false refusal", [i for i in task.items if i.outcome]),
                    ("answered", [i for i in task.items if not i.outcome]),
                ]
            for label, items in picks:
                if items:
                    sections.append(
                        {
                            "model": model.model,
                            "task": task.task,
                            "label": label,
                            "count": len(items),
                            "items": items[:per_kind],
                        }
                    )
    return sections


def render_html(run: Run, images: dict[str, bytes]) -> str:
    """The self-contained HTML report."""
    embedded = {name: base64.b64encode(data).decode("ascii") for name, data in images.items()}
    return _template().render(
        run=run,
        summary=summary_rows(run),
        comparisons=comparison_rows(run),
        breakdown=breakdown_rows(run),
        charts=embedded,
        examples=examples(run),
    )


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_output(path) as temp:
        temp.write_bytes(data)


def write_report(run: Run, folder: Path) -> dict[str, Path]:
    """Write summary.md, charts/*.png and report.html into the run folder; their paths by kind."""
    folder = Path(folder)
    (folder / CHARTS_FOLDER).mkdir(parents=True, exist_ok=True)
    images = charts(run)
    paths = {"summary": folder / SUMMARY_FILE, "html": folder / REPORT_FILE}
    _write_bytes(paths["summary"], summary_text(run).encode("utf-8"))
    for name, data in images.items():
        paths[name] = folder / CHARTS_FOLDER / name
        _write_bytes(paths[name], data)
    _write_bytes(paths["html"], render_html(run, images).encode("utf-8"))
    return paths
