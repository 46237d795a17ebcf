"""PPO: the pure math (``core``), rollouts (``rollout``) and the Trainer (``trainer``)."""

from .trainer import PPOConfig, PPOTrainer

__all__ = ["PPOConfig", "PPOTrainer"]
