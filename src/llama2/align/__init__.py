"""Alignment: preference data, reward models, rejection sampling, PPO, Ghost Attention, context distillation, DPO.

`from llama2.align import RewardModel` loads torch on first use only (the CLI imports this package).
"""

__all__ = ["RewardModel"]


def __getattr__(name: str):
    if name == "RewardModel":
        from .reward_model import RewardModel

        return RewardModel
    raise AttributeError(name)
