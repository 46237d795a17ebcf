"""rlhf_ext: the RLHF pipeline on the Hugging Face stack.

Importing the package registers the reward and value heads with the Auto classes.
"""

from .heads import RewardModel, RewardModelConfig, ValueModel, ValueModelConfig
from .judges import FunctionJudge, LMJudge, PairwiseJudge, RewardModelJudge, label_samples
from .losses import LOSSES, LossParams, compute_loss, resolve_loss_types
from .online_dpo import OnlineDPOConfig, OnlineDPOTrainer
from .ppo import GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer, RLOOConfig, RLOOTrainer
from .preference import PreferenceConfig, PreferenceTrainer
from .reward import RewardConfig, RewardTrainer, load_reward_model, score
from .trl_compat import (
    CPOConfig,
    CPOTrainer,
    DPOConfig,
    DPOTrainer,
    KTOConfig,
    KTOTrainer,
    ORPOConfig,
    ORPOTrainer,
)

__all__ = [
    "CPOConfig", "CPOTrainer", "DPOConfig", "DPOTrainer", "KTOConfig", "KTOTrainer",
    "ORPOConfig", "ORPOTrainer", "LOSSES", "LossParams", "PPOConfig", "PPOTrainer",
    "GRPOConfig", "GRPOTrainer", "RLOOConfig", "RLOOTrainer",
    "PreferenceConfig", "PreferenceTrainer", "OnlineDPOConfig", "OnlineDPOTrainer",
    "PairwiseJudge", "LMJudge", "RewardModelJudge", "FunctionJudge", "label_samples",
    "RewardConfig", "RewardModel", "RewardModelConfig", "RewardTrainer", "ValueModel",
    "ValueModelConfig",
    "compute_loss", "load_reward_model", "resolve_loss_types", "score",
]
