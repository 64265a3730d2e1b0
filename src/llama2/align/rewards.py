"""The reward a policy is judged by: one reward model, or Llama 2's safety/helpfulness combination."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .losses import SAFETY_THRESHOLD, combined_reward
from .preferences import Prompt

#: (dialogs, answers) -> one raw score per answer, e.g. `RewardModel.score`.
Scorer = Callable[[Sequence[list[dict]], Sequence[str]], list[float]]


@dataclass
class CombinedReward:
    """R_c of the Llama 2 paper (section 3.2.3) as a probability per answer.

    Attributes:
        helpfulness: scorer of the helpfulness reward model.
        safety: scorer of the safety reward model (None: the helpfulness RM alone).
        threshold: safety probabilities strictly below it take precedence (paper: 0.15).
    """

    helpfulness: Scorer
    safety: Scorer | None = None
    threshold: float = SAFETY_THRESHOLD

    def __call__(self, prompts: Sequence[Prompt], answers: Sequence[str]) -> torch.Tensor:
        """R_c in (0, 1) for each answer [N]: sigmoid of the chosen reward model's score."""
        dialogs = [p.dialog for p in prompts]
        helpful = torch.sigmoid(torch.tensor(self.helpfulness(dialogs, answers), dtype=torch.float32))
        if self.safety is None:
            return helpful
        safe = torch.sigmoid(torch.tensor(self.safety(dialogs, answers), dtype=torch.float32))
        tagged = torch.tensor([p.safety for p in prompts])
        return combined_reward(safe, helpful, tagged, self.threshold)


def load_reward(reward_model: str, safety_reward_model: str | None, threshold: float, device=None) -> CombinedReward:
    """A `CombinedReward` from saved reward model run folders."""
    from .reward_model import RewardModel

    helpfulness = RewardModel.build(reward_model, device).score
    safety = RewardModel.build(safety_reward_model, device).score if safety_reward_model else None
    return CombinedReward(helpfulness, safety, threshold)
