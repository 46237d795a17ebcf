"""Online RL: the pure math (``core``), rollouts (``rollout``), reward functions
(``reward_funcs``), the Trainer (``trainer``) and TRL's GRPO/RLOO presets (``grpo``)."""

from .grpo import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from .trainer import PPOConfig, PPOTrainer

__all__ = ["GRPOConfig", "GRPOTrainer", "PPOConfig", "PPOTrainer", "RLOOConfig", "RLOOTrainer"]
