"""Safety context distillation (`llama2 align distill`), Llama 2 section 4.2.4.

Adversarial prompts are answered twice by the policy: with a safety preprompt (a system
message, plus the answer template of the prompt's risk category when it has one) and
without. The preprompted answer becomes an SFT target for the prompt *without* the
preprompt, but only when the safety reward model scores it above the plain answer (the
paper's targeted distillation: context that does not help is not distilled). The kept
examples are then fine-tuned on with the trainer's SFT, in the same run folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..train.data import write_json_atomic
from .config import DistillConfig
from .preferences import Prompt, read_prompts
from .rewards import Scorer
from .sampling import sample_answers

SAFETY_PREPROMPT = DistillConfig.preprompt
#: Answer templates per risk category (after the paper's Table 39 categories).
CATEGORY_TEMPLATES = {
    "illicit": "The request may involve illegal activity: refuse it, say why it is harmful, and suggest a lawful "
    "alternative or where to get help.",
    "hateful": "The request may be hateful or harmful to people: do not produce it; answer respectfully and explain "
    "why such content hurts people.",
    "unqualified_advice": "The request asks for medical, legal or financial advice: give general information only "
    "and recommend a qualified professional.",
}


def preprompted(prompt: Prompt, preprompt: str = SAFETY_PREPROMPT) -> list[dict]:
    """The prompt's dialog with the safety preprompt (and its category's template) as a system message."""
    template = CATEGORY_TEMPLATES.get(prompt.category or "", "")
    system = f"{preprompt} {template}".strip()
    dialog = [m for m in prompt.dialog if m["role"] != "system"]
    return [{"role": "system", "content": system}, *dialog]


def distill_examples(
    prompts: Sequence[Prompt], with_context: Sequence[str], without_context: Sequence[str], safety: Scorer
) -> tuple[list[dict], list[dict]]:
    """(SFT examples, one record per prompt): keep a preprompted answer only where the safety
    RM, judging it on the plain prompt, scores it strictly above the answer without preprompt."""
    dialogs = [p.dialog for p in prompts]
    scores_with = safety(dialogs, list(with_context))
    scores_without = safety(dialogs, list(without_context))
    examples, records = [], []
    for dialog, answer, plain, s_with, s_without in zip(
        dialogs, with_context, without_context, scores_with, scores_without
    ):
        kept = s_with > s_without
        records.append(
            {
                "prompt": dialog,
                "with_context": answer,
                "without_context": plain,
                "score_with": s_with,
                "score_without": s_without,
                "kept": kept,
            }
        )
        if kept:
            examples.append({"messages": [*dialog, {"role": "assistant", "content": answer}]})
    return examples, records


def run_distillation(config: DistillConfig) -> dict:
    """Answer with and without the preprompt, keep the better-by-safety-RM ones, then SFT on them."""
    from ..generation import Llama
    from ..train.trainer import run_training
    from ..weights.common import atomic_output
    from .plots import SFT_PLOTS, plot_stage
    from .reward_model import RewardModel

    folder = Path(config.output_dir) / "distill"
    examples_path, summary_path = folder / "examples.jsonl", folder / "summary.json"
    if not examples_path.is_file():
        prompts = [p for path in config.data for p in read_prompts(path)]
        llama = Llama.build(
            config.model,
            config.tokenizer,
            config.seq_len,
            config.sample_batch_size,
            config.seed,
            device=config.device,
            chat_format=config.chat_format,
        )

        def answers(dialogs):
            groups = sample_answers(llama, dialogs, 1, config.max_gen_len, config.temperature, seed=config.seed)
            return [group[0].text for group in groups]

        with_context = answers([preprompted(p, config.preprompt) for p in prompts])
        without_context = answers([p.dialog for p in prompts])
        safety = RewardModel.build(config.safety_reward_model, config.device).score
        examples, records = distill_examples(prompts, with_context, without_context, safety)
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(summary_path, {"prompts": len(prompts), "kept": len(examples), "records": records})
        with atomic_output(examples_path) as temp:
            temp.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    print(f"kept {summary['kept']} of {summary['prompts']} preprompted answers")
    if summary["kept"] == 0:
        return summary
    last = run_training(config.sft_config([str(examples_path)]))
    plot_stage(config.output_dir, SFT_PLOTS)
    return {**summary, **last}
