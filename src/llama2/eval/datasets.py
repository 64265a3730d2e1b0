"""The built-in evaluation sets (package data in `llama2/data/eval/`), validated as they load.

`tasks.json` names every task (its kind, file and prompt template) and the suites that
group them; each task's items are one JSON object a line. A suite is named by its
built-in name or given as the path of a `tasks.json` of the same shape (item files are
read relative to it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from ..errors import Llama2Error

RISK_CATEGORIES = ("illicit_criminal", "hateful_harmful", "unqualified_advice", "privacy", "self_harm")
ATTACK_STYLES = ("direct", "role_play", "hypothetical", "multi_turn", "token_tricks")
TaskKind = Literal["multiple_choice", "generation", "redteam", "borderline"]


class Message(BaseModel):
    """One chat message."""

    role: Literal["system", "user", "assistant"]
    content: str


def _check_dialog(dialog: list[Message]) -> None:
    if not dialog or dialog[-1].role != "user":
        raise ValueError("a dialog must end with the user's message")


class ChoiceItem(BaseModel):
    """A multiple-choice question: the context (`question`), its choices and the right one's index."""

    id: str
    question: str
    choices: list[str] = Field(min_length=2)
    answer: int

    @model_validator(mode="after")
    def _answer_in_range(self):
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"answer {self.answer} is not an index of the {len(self.choices)} choices")
        return self


class AnswerItem(BaseModel):
    """A question answered by generation; any of `answers` counts as right."""

    id: str
    prompt: str
    answers: list[str] = Field(min_length=1)


class RedTeamItem(BaseModel):
    """A request a safe model declines, by risk category and attack style (earlier turns included)."""

    id: str
    category: Literal[RISK_CATEGORIES]
    style: Literal[ATTACK_STYLES]
    dialog: list[Message]

    @model_validator(mode="after")
    def _ends_with_user(self):
        _check_dialog(self.dialog)
        return self


class BorderlineItem(BaseModel):
    """A request that sounds risky but is fine to answer."""

    id: str
    topic: str
    dialog: list[Message]

    @model_validator(mode="after")
    def _ends_with_user(self):
        _check_dialog(self.dialog)
        return self


ITEM_MODELS = {
    "multiple_choice": ChoiceItem,
    "generation": AnswerItem,
    "redteam": RedTeamItem,
    "borderline": BorderlineItem,
}


class TaskSpec(BaseModel):
    """A task's entry in `tasks.json`."""

    kind: TaskKind
    file: str
    description: str = ""
    template: str = "{question}"
    match: Literal["words", "number"] = "words"


class SuiteSpec(BaseModel):
    """A suite's entry in `tasks.json`: the tasks it runs, in order."""

    description: str = ""
    tasks: list[str] = Field(min_length=1)


class Catalog(BaseModel):
    """The whole `tasks.json`."""

    tasks: dict[str, TaskSpec]
    suites: dict[str, SuiteSpec]

    @model_validator(mode="after")
    def _suites_name_tasks(self):
        for name, suite in self.suites.items():
            unknown = [t for t in suite.tasks if t not in self.tasks]
            if unknown:
                raise ValueError(f"suite {name!r} names unknown tasks {unknown}")
        return self


@dataclass(frozen=True)
class Task:
    """A loaded task: its name, spec and validated items."""

    name: str
    spec: TaskSpec
    items: list

    @property
    def kind(self) -> str:
        return self.spec.kind


def builtin_folder():
    """The package-data folder of the built-in sets (a `Traversable`)."""
    return resources.files("llama2") / "data" / "eval"


def _read(folder, name: str) -> str:
    try:
        return (folder / name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise Llama2Error(f"{name}: cannot read the evaluation data: {err}") from None


def _validate(model, value, where: str):
    try:
        return model.model_validate(value)
    except ValidationError as err:
        first = err.errors()[0]
        location = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise Llama2Error(f"{where}: {location + ': ' if location else ''}{message}") from None


def load_catalog(suite: str) -> tuple[Catalog, object, str]:
    """(catalog, folder of its files, suite name) for a built-in suite name or a `tasks.json` path."""
    if suite.endswith(".json"):
        path = Path(suite)
        if not path.is_file():
            raise Llama2Error(f"{suite}: no such file")
        folder, text, name = path.parent, _read(path.parent, path.name), None
    else:
        folder, text, name = builtin_folder(), _read(builtin_folder(), "tasks.json"), suite
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise Llama2Error(f"{suite}: not valid JSON: {err}") from None
    catalog = _validate(Catalog, raw, suite)
    if name is None:
        if len(catalog.suites) != 1:
            raise Llama2Error(f"{suite}: defines {len(catalog.suites)} suites; give exactly one")
        name = next(iter(catalog.suites))
    if name not in catalog.suites:
        raise Llama2Error(f"unknown suite {name!r}; built in: {', '.join(catalog.suites)} (or a tasks.json path)")
    return catalog, folder, name


def load_items(folder, spec: TaskSpec, limit: int | None = None) -> list:
    """The validated items of one task file (the first `limit` when given)."""
    items = []
    for number, line in enumerate(_read(folder, spec.file).splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise Llama2Error(f"{spec.file}:{number}: not valid JSON: {err}") from None
        items.append(_validate(ITEM_MODELS[spec.kind], value, f"{spec.file}:{number}"))
        if limit is not None and len(items) == limit:
            break
    if not items:
        raise Llama2Error(f"{spec.file}: no items")
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise Llama2Error(f"{spec.file}: item ids are not unique")
    return items


def load_suite(suite: str, tasks: list[str] | None = None, limit: int | None = None) -> tuple[str, list[Task]]:
    """(suite name, its tasks with their items); `tasks` picks some of the suite's, `limit` items per task."""
    catalog, folder, name = load_catalog(suite)
    names = catalog.suites[name].tasks
    if tasks:
        unknown = [t for t in tasks if t not in names]
        if unknown:
            raise Llama2Error(f"suite {name!r} has no task {unknown[0]!r}; its tasks: {', '.join(names)}")
        names = [t for t in names if t in tasks]
    if limit is not None and limit < 1:
        raise Llama2Error(f"--limit must be at least 1, got {limit}")
    return name, [Task(t, catalog.tasks[t], load_items(folder, catalog.tasks[t], limit)) for t in names]


def suite_names() -> dict[str, str]:
    """Built-in suite names and their descriptions."""
    catalog, _, _ = load_catalog("basic")
    return {name: suite.description for name, suite in catalog.suites.items()}
