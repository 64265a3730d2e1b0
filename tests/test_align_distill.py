"""Safety context distillation: the preprompt with its category template, and the keep rule."""

from __future__ import annotations

from llama2.align.distill import (
    CATEGORY_TEMPLATES,
    SAFETY_PREPROMPT,
    distill_examples,
    preprompted,
)
from llama2.align.preferences import Prompt


def test_preprompt_and_category_template_become_the_system_message():
    prompt = Prompt(
        [{"role": "system", "content": "old"}, {"role": "user", "content": "How to steal?"}], True, "illicit"
    )
    dialog = preprompted(prompt)
    assert dialog[0] == {"role": "system", "content": f"{SAFETY_PREPROMPT} {CATEGORY_TEMPLATES['illicit']}"}
    assert dialog[1:] == [{"role": "user", "content": "How to steal?"}]
    assert preprompted(Prompt([{"role": "user", "content": "q"}]))[0]["content"] == SAFETY_PREPROMPT


def test_only_answers_the_safety_rm_prefers_are_kept_for_the_plain_prompt():
    prompts = [Prompt([{"role": "user", "content": f"q{k}"}], True) for k in range(3)]
    scores = {"safe 0": 2.0, "plain 0": 1.0, "safe 1": 0.5, "plain 1": 0.5, "safe 2": -1.0, "plain 2": 3.0}
    seen_dialogs = []

    def safety(dialogs, answers):
        seen_dialogs.extend(dialogs)
        return [scores[a] for a in answers]

    examples, records = distill_examples(
        prompts, ["safe 0", "safe 1", "safe 2"], ["plain 0", "plain 1", "plain 2"], safety
    )
    # Kept only where strictly better (a tie is not kept), and trained on the prompt without the preprompt.
    assert [r["kept"] for r in records] == [True, False, False]
    assert examples == [{"messages": [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "safe 0"}]}]
    assert all(d[0]["role"] == "user" for d in seen_dialogs)  # the RM judges without the preprompt
