"""Rejection sampling fine-tuning (`llama2 align rejection-sampling`), Llama 2 section 3.2.3.

For every prompt, `samples` answers are drawn from the policy (batched generation), scored
by the reward (one RM, or R_c with a safety RM), and the best one is kept, competing with
the best answers of earlier iterations (`pool`) when given. The kept answers are
then fine-tuned on with the trainer's SFT (loss on the answers only), in the same run folder.

Files in the run folder, besides the trainer's:

    samples/all.jsonl     every prompt's samples with their rewards (appended per batch, so a
                          killed run resumes where sampling stopped)
    samples/best.jsonl    the kept answers as chat dialogs ({"messages": [...], "reward": R}),
                          written once sampling is complete
    samples/summary.json  mean reward of all samples and of the kept ones
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import Llama2Error
from ..train.data import write_json_atomic
from ..train.distributed import barrier, init_distributed, shutdown
from .config import RejectionConfig
from .preferences import Prompt, read_prompts
from .rewards import CombinedReward, load_reward
from .sampling import best_of, sample_answers

SAMPLES = "samples"
ALL_FILE = "all.jsonl"
BEST_FILE = "best.jsonl"
SUMMARY_FILE = "summary.json"


def dialog_key(dialog: list[dict]) -> str:
    return json.dumps(dialog, sort_keys=True)


def read_pool(paths: Sequence[str]) -> dict[str, list[str]]:
    """Earlier iterations' kept answers, by prompt dialog."""
    pooled: dict[str, list[str]] = {}
    for path in paths:
        for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
            try:
                messages = json.loads(line)["messages"]
                pooled.setdefault(dialog_key(messages[:-1]), []).append(messages[-1]["content"])
            except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                raise Llama2Error(f"{path}:{number}: not a line of a samples/best.jsonl file") from None
    return pooled


def _done_records(path: Path) -> list[dict]:
    """The complete lines of a partly written all.jsonl (a torn last line is dropped and rewritten)."""
    if not path.is_file():
        return []
    records, keep_bytes = [], 0
    with path.open("rb") as file:
        for line in file:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
            keep_bytes += len(line)
    os.truncate(path, keep_bytes)
    return records


def choose_best(prompts: Sequence[Prompt], answers: Sequence[Sequence[str]], reward: CombinedReward) -> list[dict]:
    """Score every candidate answer and keep the argmax per prompt; one record per prompt."""
    flat_prompts = [p for p, group in zip(prompts, answers) for _ in group]
    flat_answers = [a for group in answers for a in group]
    flat_rewards = reward(flat_prompts, flat_answers).tolist()
    records, cursor = [], 0
    for prompt, group in zip(prompts, answers):
        rewards = flat_rewards[cursor : cursor + len(group)]
        cursor += len(group)
        best = best_of([rewards])[0]
        records.append({"prompt": prompt.dialog, "answers": list(group), "rewards": rewards, "best": best})
    return records


def collect_best(config: RejectionConfig, reward: CombinedReward | None = None, llama=None) -> Path:
    """Sample, score and keep the best answer of every prompt; returns samples/best.jsonl (resumable)."""
    folder = Path(config.output_dir) / SAMPLES
    best_path = folder / BEST_FILE
    if best_path.is_file():
        return best_path
    folder.mkdir(parents=True, exist_ok=True)
    prompts = [p for path in config.data for p in read_prompts(path)]
    reward = reward or load_reward(config.reward_model, config.safety_reward_model, config.safety_threshold)
    llama = llama or build_sampler(config)
    pooled = read_pool(config.pool)
    partial = folder / f"{ALL_FILE}.partial"
    records = _done_records(partial)
    per_round = max(1, config.sample_batch_size // config.samples)
    from tqdm import tqdm

    with (
        partial.open("a", encoding="utf-8") as log,
        tqdm(total=len(prompts), initial=len(records), desc="sampling") as bar,
    ):
        for first in range(len(records), len(prompts), per_round):
            chunk = prompts[first : first + per_round]
            sampled = sample_answers(
                llama,
                [p.dialog for p in chunk],
                config.samples,
                config.max_gen_len,
                config.temperature,
                config.top_p,
                seed=config.seed + first,
            )
            candidates = [
                [a.text for a in group] + pooled.get(dialog_key(p.dialog), []) for p, group in zip(chunk, sampled)
            ]
            for record in choose_best(chunk, candidates, reward):
                log.write(json.dumps(record) + "\n")
                records.append(record)
            log.flush()
            os.fsync(log.fileno())
            bar.update(len(chunk))
    _write_best(folder, records)
    os.replace(partial, folder / ALL_FILE)
    return best_path


def _write_best(folder: Path, records: list[dict]) -> None:
    from ..weights.common import atomic_output

    lines = []
    for r in records:
        answer = r["answers"][r["best"]]
        lines.append(
            json.dumps(
                {
                    "messages": [*r["prompt"], {"role": "assistant", "content": answer}],
                    "reward": r["rewards"][r["best"]],
                }
            )
        )
    all_rewards = [x for r in records for x in r["rewards"]]
    summary = {
        "prompts": len(records),
        "mean_reward": sum(all_rewards) / len(all_rewards),
        "mean_best_reward": sum(r["rewards"][r["best"]] for r in records) / len(records),
    }
    write_json_atomic(folder / SUMMARY_FILE, summary)
    with atomic_output(folder / BEST_FILE) as temp:
        temp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def build_sampler(config: RejectionConfig):
    """`Llama` on the policy: the batched engine (native CPU kernels for GGUF files)."""
    from ..generation import Llama

    seq_len = config.seq_len
    return Llama.build(
        config.model,
        config.tokenizer,
        seq_len,
        config.sample_batch_size,
        config.seed,
        device=config.device,
        chat_format=config.chat_format,
    )


def run_rejection_sampling(config: RejectionConfig) -> dict:
    """Sample and keep the best answers (rank 0), then fine-tune on them (every process); returns the
    last training metrics."""
    from ..train.trainer import Trainer
    from .plots import SFT_PLOTS, plot_stage

    env = init_distributed(config.device)
    try:
        best = collect_best(config) if env.is_main else Path(config.output_dir) / SAMPLES / BEST_FILE
        barrier(env)
        summary = json.loads((best.parent / SUMMARY_FILE).read_text(encoding="utf-8"))
        if env.is_main:
            print(
                f"kept {summary['prompts']} answers: mean reward {summary['mean_best_reward']:.3f} "
                f"(all samples {summary['mean_reward']:.3f})"
            )
        last = Trainer(config.sft_config([str(best)]), env).train()
        if env.is_main:
            plot_stage(config.output_dir, SFT_PLOTS)
        return last
    finally:
        shutdown(env)
