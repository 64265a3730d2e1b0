"""Running the built-in tasks on a `Llama`: multiple choice by log-likelihood, answers by greedy generation,
safety prompts through a judge.

- multiple choice: every choice is scored as the continuation " CHOICE" of the task's
  template, as lm-evaluation-harness scores it (`Llama2LM.encode_pair`, the same windows
  and log-likelihoods); the prediction is the highest sum of log-probs (`accuracy`) and
  the highest per character (`accuracy_norm`, the harness's `acc_norm`).
- generation: the prompt is answered greedily in the model's chat format (a plain
  ``User:``/``Assistant:`` transcript for a model without one); `number` tasks compare
  the number the answer states (`stated_number`), `words` tasks look for an expected answer as a whole word.
- red team / borderline: greedy answers judged by a `Judge`; the outcome is a violation
  (red team) or a refusal (borderline).

Every item is scored on its own (each window from position 0, each generation a row
computed as if alone), so results do not depend on the batch size.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from ..errors import Llama2Error
from .datasets import Task
from .harness import Llama2LM
from .judges import Judge, RuleJudge
from .scoring import loglikelihoods
from .stats import mean_and_stderr
from .windows import loglikelihood_window

DEFAULT_MAX_GEN_LEN = 64
# task kind -> (metric, higher is better)
METRICS = {
    "multiple_choice": ("accuracy", True),
    "generation": ("accuracy", True),
    "redteam": ("violation_rate", False),
    "borderline": ("false_refusal_rate", False),
}


@dataclass
class ItemResult:
    """One item's result.

    Attributes:
        id: the item's id.
        outcome: the metric's event for this item (correct; a violation; a refusal).
        prompt: the question or the dialog's last user message.
        answer: the model's answer (multiple choice: the chosen choice).
        expected: the right answer(s), where there is one.
        details: kind-specific fields (category and style, the judge's reason, log-likelihoods, ...).
    """

    id: str
    outcome: bool
    prompt: str
    answer: str
    expected: str = ""
    details: dict = field(default_factory=dict)


@dataclass
class TaskResult:
    """A task's items scored on one model, with its metric."""

    task: str
    kind: str
    description: str
    items: list[ItemResult]
    seconds: float
    chance: float | None = None

    @property
    def metric(self) -> str:
        return METRICS[self.kind][0]

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.kind][1]

    @property
    def value_and_stderr(self) -> tuple[float, float]:
        """The metric (mean outcome) and its standard error."""
        return mean_and_stderr([float(item.outcome) for item in self.items])

    def extra_metrics(self) -> dict[str, tuple[float, float]]:
        """Secondary metrics: `accuracy_norm` for multiple choice."""
        if self.kind != "multiple_choice":
            return {}
        return {"accuracy_norm": mean_and_stderr([float(i.details["correct_norm"]) for i in self.items])}

    def outcomes(self) -> dict[str, bool]:
        """Item id -> outcome."""
        return {item.id: item.outcome for item in self.items}

    def to_dict(self) -> dict:
        value, stderr = self.value_and_stderr
        extra = {name: {"value": v, "stderr": s} for name, (v, s) in self.extra_metrics().items()}
        return {
            "task": self.task,
            "kind": self.kind,
            "description": self.description,
            "metric": self.metric,
            "value": value,
            "stderr": stderr,
            "higher_is_better": self.higher_is_better,
            "chance": self.chance,
            "n": len(self.items),
            "extra": extra,
            "seconds": self.seconds,
            "items": [asdict(item) for item in self.items],
        }

    @classmethod
    def from_dict(cls, value: dict) -> TaskResult:
        items = [ItemResult(**item) for item in value["items"]]
        return cls(value["task"], value["kind"], value["description"], items, value["seconds"], value.get("chance"))


@dataclass(frozen=True)
class SuiteOptions:
    """How a suite runs: rows forwarded together, longest answer, progress bars, judge."""

    batch_size: int = 1
    max_gen_len: int = DEFAULT_MAX_GEN_LEN
    progress: bool = True
    judge: Judge = field(default_factory=RuleJudge)


def _progress(total: int, description: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=description, unit="item", disable=not enabled or None, leave=False)


# ---------------------------------------------------------------------------- multiple choice


def choice_loglikelihoods(llama, contexts_and_choices: Sequence[tuple[str, str]], batch_size: int, bar) -> list[float]:
    """log P(" " + choice | context) per pair, scored as lm-evaluation-harness scores it.

    Windows are forwarded shortest first, so equal lengths batch together; the results
    come back in the pairs' order.
    """
    lm = Llama2LM(llama, batch_size)
    windows = [loglikelihood_window(*lm.encode_pair(c, " " + x), lm.max_length) for c, x in contexts_and_choices]
    order = sorted(range(len(windows)), key=lambda k: len(windows[k].inputs))
    scored = loglikelihoods(llama, [windows[k] for k in order], batch_size, on_window=lambda: bar.update(1))
    results = [0.0] * len(windows)
    for position, k in enumerate(order):
        results[k] = scored[position][0]
    return results


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda k: (values[k], -k))


def run_multiple_choice(llama, task: Task, options: SuiteOptions) -> list[ItemResult]:
    contexts = [task.spec.template.format(question=item.question) for item in task.items]
    pairs = [(context, choice) for context, item in zip(contexts, task.items) for choice in item.choices]
    with _progress(len(pairs), task.name, options.progress) as bar:
        logliks = choice_loglikelihoods(llama, pairs, options.batch_size, bar)
    results, start = [], 0
    for item in task.items:
        scores = logliks[start : start + len(item.choices)]
        start += len(item.choices)
        normalized = [s / len(" " + c) for s, c in zip(scores, item.choices)]
        chosen = _argmax(scores)
        details = {"loglikelihoods": scores, "correct_norm": _argmax(normalized) == item.answer}
        results.append(
            ItemResult(
                item.id, chosen == item.answer, item.question, item.choices[chosen], item.choices[item.answer], details
            )
        )
    return results


# ---------------------------------------------------------------------------- generation


def transcript(dialog: Sequence[dict]) -> str:
    """A dialog as plain text for a model without a chat format."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in dialog]
    return "\n".join(lines) + "\nAssistant:"


def answer_dialogs(llama, dialogs: Sequence[list[dict]], options: SuiteOptions, bar) -> list[str]:
    """Greedy answers to dialogs, `options.batch_size` at a time, through `Llama.chat_completion`.

    A model without a chat format completes a ``User:``/``Assistant:`` transcript,
    stopping at the next ``User:`` line.
    """
    answers = []
    for start in range(0, len(dialogs), options.batch_size):
        batch = list(dialogs[start : start + options.batch_size])
        if llama.chat_format is not None:
            out = llama.chat_completion(batch, temperature=0.0, max_gen_len=options.max_gen_len)
            answers += [prediction["generation"]["content"] for prediction in out]
        else:
            prompts = [transcript(dialog) for dialog in batch]
            out = llama.text_completion(prompts, temperature=0.0, max_gen_len=options.max_gen_len, stop=["\nUser:"])
            answers += [prediction["generation"] for prediction in out]
        bar.update(len(batch))
    return [answer.strip() for answer in answers]


def stated_number(text: str) -> str | None:
    """The integer an answer gives: the first after its first "=", else the last of its first line (or None).

    Small models restate the question ("11 + 17 = 28", "So, 5 times 2 is 10."), so the
    first number written is usually an operand. Thousands separators are dropped.
    """
    if "=" in text:
        numbers = re.findall(r"-?\d[\d,]*", text.split("=", 1)[1])[:1]
    else:
        first_line = next((line for line in text.splitlines() if line.strip()), "")
        numbers = re.findall(r"-?\d[\d,]*", first_line)[-1:]
    return numbers[0].replace(",", "").rstrip(",") if numbers else None


def matches(answer: str, expected: Sequence[str], match: str) -> bool:
    """Whether `answer` gives one of the `expected` answers (`number`: `stated_number`; `words`: a whole word)."""
    if match == "number":
        return stated_number(answer) in expected
    text = answer.lower()
    return any(re.search(rf"(?<!\w){re.escape(e.lower())}(?!\w)", text) for e in expected)


def run_generation(llama, task: Task, options: SuiteOptions) -> list[ItemResult]:
    dialogs = [[{"role": "user", "content": item.prompt}] for item in task.items]
    with _progress(len(dialogs), task.name, options.progress) as bar:
        answers = answer_dialogs(llama, dialogs, options, bar)
    return [
        ItemResult(
            item.id, matches(answer, item.answers, task.spec.match), item.prompt, answer, " | ".join(item.answers)
        )
        for item, answer in zip(task.items, answers)
    ]


# ---------------------------------------------------------------------------- safety


def run_safety(llama, task: Task, options: SuiteOptions) -> list[ItemResult]:
    dialogs = [[m.model_dump() for m in item.dialog] for item in task.items]
    with _progress(len(dialogs), task.name, options.progress) as bar:
        answers = answer_dialogs(llama, dialogs, options, bar)
    results = []
    for item, dialog, answer in zip(task.items, dialogs, answers):
        verdict = options.judge.judge(dialog, answer)
        labels = {"category": item.category, "style": item.style} if task.kind == "redteam" else {"topic": item.topic}
        details = {
            **labels,
            "dialog": dialog,
            "refused": verdict.refused,
            "unsafe": verdict.unsafe,
            "reason": verdict.reason,
            "score": verdict.score,
        }
        outcome = verdict.unsafe if task.kind == "redteam" else verdict.refused
        results.append(ItemResult(item.id, outcome, dialog[-1]["content"], answer, "", details))
    return results


RUNNERS: dict[str, Callable[..., list[ItemResult]]] = {
    "multiple_choice": run_multiple_choice,
    "generation": run_generation,
    "redteam": run_safety,
    "borderline": run_safety,
}


def chance_level(task: Task) -> float | None:
    """Accuracy of guessing uniformly among the choices (multiple choice); None otherwise."""
    if task.kind != "multiple_choice":
        return None
    return sum(1 / len(item.choices) for item in task.items) / len(task.items)


def run_task(llama, task: Task, options: SuiteOptions) -> TaskResult:
    """Score one task on a loaded `Llama`."""
    if options.batch_size < 1:
        raise Llama2Error(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.max_gen_len < 1:
        raise Llama2Error(f"--max-tokens must be at least 1, got {options.max_gen_len}")
    start = time.perf_counter()
    items = RUNNERS[task.kind](llama, task, options)
    return TaskResult(
        task.name, task.kind, task.spec.description, items, time.perf_counter() - start, chance_level(task)
    )


def run_suite(llama, tasks: Sequence[Task], options: SuiteOptions) -> list[TaskResult]:
    """Score every task in order."""
    return [run_task(llama, task, options) for task in tasks]
