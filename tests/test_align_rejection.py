"""Rejection sampling: best-of-K picks the argmax, pooling competes with earlier best answers, sampling
resumes after a kill, and the kept answers are fine-tuned on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llama2.align.config import RejectionConfig
from llama2.align.preferences import Prompt
from llama2.align.rejection import choose_best, collect_best, read_pool
from llama2.align.rewards import CombinedReward
from llama2.align.sampling import best_of, policy_sampler
from llama2.chat import Llama2ChatFormat
from llama2.config import model_args_from_preset
from llama2.model import meta_transformer
from llama2.tokenizer import Tokenizer, llama2_tokenizer_path
from llama2.train.model_setup import init_weights

from train_helpers import one_thread  # noqa: F401 (one_thread: autouse fixture)

PROMPTS = Path(__file__).parent / "fixtures" / "align" / "prompts.jsonl"


def test_best_of_k_picks_the_argmax():
    assert best_of([[0.1, 0.9, 0.3], [-2.0, -1.0], [5.0, 5.0, 1.0]]) == [1, 1, 0]


def length_reward() -> CombinedReward:
    return CombinedReward(lambda dialogs, answers: [float(len(a)) / 10 for a in answers])


def test_choose_best_scores_every_candidate_including_pooled_ones():
    prompts = [Prompt([{"role": "user", "content": "a"}]), Prompt([{"role": "user", "content": "b"}])]
    records = choose_best(prompts, [["xx", "xxxx", "x"], ["yyy", "pooled yyyy"]], length_reward())
    assert [r["best"] for r in records] == [1, 1]
    assert records[1]["rewards"] == pytest.approx(torch.sigmoid(torch.tensor([0.3, 1.1])).tolist())


class Crash(Exception):
    pass


def test_sampling_resumes_after_a_kill_and_pools(tmp_path):
    torch.manual_seed(0)
    model = meta_transformer(model_args_from_preset("tiny"))
    model.to_empty(device="cpu")
    init_weights(model)
    tokenizer = Tokenizer.from_file(llama2_tokenizer_path())
    config = RejectionConfig(
        output_dir=str(tmp_path / "rs"),
        data=[str(PROMPTS)],
        model="tiny",
        reward_model="x",
        samples=2,
        max_gen_len=4,
        sample_batch_size=8,
        seed=1,
    ).resolved()
    calls = []

    def reward_then_crash(dialogs, answers):
        calls.append(len(answers))
        if len(calls) == 2:
            raise Crash
        return [float(len(a)) for a in answers]

    with policy_sampler(model, tokenizer, Llama2ChatFormat(tokenizer), 96, 8, seed=1) as llama:
        with pytest.raises(Crash):
            collect_best(config, CombinedReward(reward_then_crash), llama)
        partial = tmp_path / "rs" / "samples" / "all.jsonl.partial"
        assert len(partial.read_text().splitlines()) == 4  # the first round of 4 prompts x 2 samples
        best = collect_best(config, CombinedReward(reward_then_crash), llama)
    assert calls == [8] * 7  # 6 rounds of 4 prompts: round 1, round 2 killed, rounds 2 to 6 after resuming
    kept = [json.loads(line) for line in best.read_text().splitlines()]
    assert len(kept) == 24 and all(k["messages"][-1]["role"] == "assistant" for k in kept)
    pooled = read_pool([str(best)])
    assert len(pooled) == len({json.dumps(k["messages"][:-1], sort_keys=True) for k in kept})
