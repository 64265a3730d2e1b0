"""An evaluation run: one suite over one or more models, kept as `results.json` in a run folder.

`llama2 eval suite|safety|compare --output-dir RUN` write it; `llama2 eval report RUN`
reads it back and renders the table, charts and HTML report. Comparisons are paired:
every model against the first (the baseline) on the items both were scored on.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from ..errors import Llama2Error
from ..weights.common import atomic_output
from .stats import mean_and_stderr, paired_comparison
from .suite import TaskResult

RESULTS_FILE = "results.json"
FORMAT = "llama2-eval-run"
VERSION = 1


@dataclass
class ModelRun:
    """A suite's results on one model."""

    model: str
    tasks: list[TaskResult]
    seconds: float
    settings: dict = field(default_factory=dict)

    def task(self, name: str) -> TaskResult | None:
        return next((t for t in self.tasks if t.task == name), None)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "seconds": self.seconds,
            "settings": self.settings,
            "tasks": [t.to_dict() for t in self.tasks],
        }

    @classmethod
    def from_dict(cls, value: dict) -> ModelRun:
        tasks = [TaskResult.from_dict(t) for t in value["tasks"]]
        return cls(value["model"], tasks, value["seconds"], value.get("settings", {}))


@dataclass
class Run:
    """One suite over several models (the first is the baseline of comparisons)."""

    suite: str
    models: list[ModelRun]
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    machine: str = field(default_factory=lambda: f"{platform.machine()} {platform.processor() or ''}".strip())

    def task_names(self) -> list[str]:
        """Every task name in first-seen order."""
        names: list[str] = []
        for model in self.models:
            names += [t.task for t in model.tasks if t.task not in names]
        return names

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "suite": self.suite,
            "created": self.created,
            "machine": self.machine,
            "models": [m.to_dict() for m in self.models],
            "comparisons": comparisons(self),
            "breakdowns": breakdowns(self),
        }

    @classmethod
    def from_dict(cls, value: dict) -> Run:
        if value.get("format") != FORMAT:
            raise Llama2Error(f"not a llama2 evaluation run (format {value.get('format')!r})")
        if value.get("version") != VERSION:
            raise Llama2Error(f"evaluation run version {value.get('version')} is not {VERSION}")
        models = [ModelRun.from_dict(m) for m in value["models"]]
        return cls(value["suite"], models, value["created"], value.get("machine", ""))


def comparisons(run: Run) -> list[dict]:
    """Every later model against the first, per task: paired comparison of the per-item outcomes."""
    if len(run.models) < 2:
        return []
    baseline, rows = run.models[0], []
    for other in run.models[1:]:
        for task in baseline.tasks:
            candidate = other.task(task.task)
            if candidate is None:
                continue
            a, b = task.outcomes(), candidate.outcomes()
            shared = [item_id for item_id in a if item_id in b]
            if not shared:
                continue
            paired = paired_comparison([a[i] for i in shared], [b[i] for i in shared])
            rows.append(
                {
                    "task": task.task,
                    "metric": task.metric,
                    "higher_is_better": task.higher_is_better,
                    "a": baseline.model,
                    "b": other.model,
                    **paired.to_dict(),
                }
            )
    return rows


def rates_by(task: TaskResult, key: str) -> dict[str, dict]:
    """The metric over the items grouped by `details[key]`: {group: {value, stderr, n}}."""
    groups: dict[str, list[float]] = {}
    for item in task.items:
        groups.setdefault(str(item.details.get(key)), []).append(float(item.outcome))
    result = {}
    for group, values in groups.items():
        value, stderr = mean_and_stderr(values)
        result[group] = {"value": value, "stderr": stderr, "n": len(values)}
    return result


BREAKDOWN_KEYS = {"redteam": ("category", "style"), "borderline": ("topic",)}


def breakdowns(run: Run) -> list[dict]:
    """Safety tasks' metric by category and style (red team) or topic (borderline), per model."""
    rows = []
    for model in run.models:
        for task in model.tasks:
            for key in BREAKDOWN_KEYS.get(task.kind, ()):
                rows.append(
                    {
                        "model": model.model,
                        "task": task.task,
                        "metric": task.metric,
                        "by": key,
                        "groups": rates_by(task, key),
                    }
                )
    return rows


def write_run(run: Run, folder: Path) -> Path:
    """Write `results.json` into `folder` (created if needed), atomically; its path."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise Llama2Error(f"{folder}: exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RESULTS_FILE
    with atomic_output(path) as temp:
        temp.write_text(json.dumps(run.to_dict(), indent=1, ensure_ascii=False), encoding="utf-8")
    return path


def read_run(folder: Path) -> Run:
    """The run in `folder` (or a results.json path)."""
    path = Path(folder)
    path = path / RESULTS_FILE if path.is_dir() else path
    if not path.is_file():
        raise Llama2Error(f"{folder}: no {RESULTS_FILE} (write one with llama2 eval suite|safety|compare --output-dir)")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
        return Run.from_dict(value)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise Llama2Error(f"{path}: cannot read the run: {err}") from None
    except (KeyError, TypeError, AttributeError) as err:
        raise Llama2Error(f"{path}: not a complete evaluation run (missing {err})") from None
