"""Reward and value heads as real transformers models: a backbone plus a linear head.

After ``import rlhf_ext`` the Auto classes know them (no trust_remote_code):

| config (model_type)                   | model        | Auto class                            |
|---------------------------------------|--------------|---------------------------------------|
| ``RewardModelConfig`` (rlhf_ext_reward) | RewardModel | AutoModelForSequenceClassification |
| ``ValueModelConfig`` (rlhf_ext_value)   | ValueModel  | AutoModelForTokenClassification    |

The backbone is any decoder ``AutoModel`` builds (Llama, Qwen2, GPT-2, ...). The head
``score`` is ``Linear(hidden, K)`` initialised with std 1 / sqrt(hidden + 1) and zero bias
(the scale of Stiennon et al. 2020), so initial rewards are O(1).

RewardModel pools the hidden state of the last real token, found from the attention mask
(not from token ids), so it is right with left or right padding, with pad == eos, and for
sequences that fill max_length. With K > 1 objectives (``objective_names``) the K rewards
are combined into one: fixed weights, or learned (ArmoRM-style) gating weights
softmax(gate(h)) computed from the same pooled state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.utils import ModelOutput


class RewardModelConfig(PretrainedConfig):
    model_type = "rlhf_ext_reward"
    sub_configs = {"backbone_config": AutoConfig}

    def __init__(self, backbone_config=None, objective_names: list[str] | None = None,
                 combination: str = "fixed", combination_weights: list[float] | None = None,
                 **kwargs):
        if isinstance(backbone_config, dict):
            backbone_config = AutoConfig.for_model(**backbone_config)
        self.backbone_config = backbone_config
        self.objective_names = list(objective_names or ["reward"])
        k = len(self.objective_names)
        if combination not in ("fixed", "learned"):
            raise ValueError(f"combination must be 'fixed' or 'learned', got {combination!r}")
        self.combination = combination
        self.combination_weights = list(combination_weights or [1.0 / k] * k)
        if len(self.combination_weights) != k:
            raise ValueError(f"combination_weights has {len(self.combination_weights)} values "
                             f"for {k} objectives {self.objective_names}")
        impl = getattr(backbone_config, "_attn_implementation", None)
        super().__init__(**kwargs)
        if impl is not None and "attn_implementation" not in kwargs:
            # PretrainedConfig would reset the sub-config's attention (sdpa, ...) to None
            backbone_config._attn_implementation = impl
        if backbone_config is not None:
            for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
                if getattr(self, key, None) is None:
                    setattr(self, key, getattr(backbone_config, key, None))

    @property
    def hidden_size(self) -> int:
        return self.backbone_config.get_text_config().hidden_size


class ValueModelConfig(RewardModelConfig):
    model_type = "rlhf_ext_value"

    def __init__(self, **kwargs):  # transformers 5 would generate one that skips ours
        super().__init__(**kwargs)


@dataclass
class RewardOutput(ModelOutput):
    """``rewards`` [B] (the combined scalar); ``logits`` [B, K] (one per objective);
    ``gate`` [B, K] when the combination is learned."""

    rewards: Tensor | None = None
    logits: Tensor | None = None
    gate: Tensor | None = None


def scalar_rewards(output) -> Tensor:
    """The scalar reward per sequence of a reward model's output: ``rewards`` of a
    RewardModel, or the single logit of a transformers ``*ForSequenceClassification``
    model with one label (TRL's reward models). [B]."""
    rewards = getattr(output, "rewards", None)
    if rewards is not None:
        return rewards
    if output.logits.shape[-1] != 1:
        raise ValueError(f"a reward model has one output per sequence; this one has "
                         f"{output.logits.shape[-1]} labels: load it with num_labels=1")
    return output.logits[:, 0]


def check_scalar_head(model) -> None:
    """Refuse what is surely not a reward model: a sequence classifier with other than one
    label, or a causal language model. (RewardModel, a one-label classifier and heads such
    as the single-base PPO's reward adapter pass.)"""
    base = getattr(model, "get_base_model", lambda: model)()
    name = type(base).__name__
    labels = getattr(getattr(base, "config", None), "num_labels", None)
    if (name.endswith("ForSequenceClassification") and labels != 1) or \
            name.endswith("ForCausalLM"):
        raise ValueError(f"{name} (num_labels={labels}) is not a reward model: pass a path "
                         "(a backbone gets a fresh scalar head), a RewardModel, or "
                         "AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)")


@dataclass
class ValueOutput(ModelOutput):
    """``values`` [B, T]: one value per position; ``logits`` the same as [B, T, 1]."""

    values: Tensor | None = None
    logits: Tensor | None = None


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last position whose mask is 1, per row. [B, T] -> [B] (long).

    Left padding: T - 1; right padding: the last real token; a full row: T - 1. Reading
    the mask, not the ids, keeps a real eos that equals pad."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


class _HeadModel(PreTrainedModel):
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    # the attention is the backbone's: let transformers choose its implementation for it
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules: list[str] = []

    def __init__(self, config, backbone=None):
        super().__init__(config)
        self.backbone = backbone if backbone is not None else AutoModel.from_config(
            config.backbone_config)
        k = len(config.objective_names)
        self.score = nn.Linear(config.hidden_size, k)
        self.gate = (nn.Linear(config.hidden_size, k)
                     if config.combination == "learned" and k > 1 else None)
        self.post_init()

    def _init_weights(self, module):
        if module is getattr(self, "score", None) or module is getattr(self, "gate", None):
            nn.init.normal_(module.weight, std=1 / math.sqrt(self.config.hidden_size + 1))
            nn.init.zeros_(module.bias)
        elif hasattr(self, "backbone"):
            # the backbone's own rule (buffers such as rotary frequencies included); modules
            # already loaded from a checkpoint are marked initialised and left alone
            self.backbone._init_weights(module)

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.backbone.set_input_embeddings(value)

    def _hidden(self, input_ids, attention_mask, **kwargs) -> Tensor:
        kwargs.pop("use_cache", None)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                            **kwargs)
        return out.last_hidden_state

    @classmethod
    def from_backbone(cls, name_or_path: str, objective_names: list[str] | None = None,
                      combination: str = "fixed", combination_weights=None, seed: int = 0,
                      **load_kwargs):
        """Backbone weights from a causal-LM, base or reward/value checkpoint (a head model
        gives its backbone, e.g. a value model started from the reward model); a fresh
        head (seeded)."""
        from .models import keep_4bit_differentiable

        backbone = keep_4bit_differentiable(AutoModel.from_pretrained(name_or_path, **load_kwargs))
        if isinstance(backbone, _HeadModel):
            backbone = backbone.backbone
        config_cls = cls.config_class
        config = config_cls(backbone_config=backbone.config, objective_names=objective_names,
                            combination=combination, combination_weights=combination_weights)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = cls(config, backbone=backbone)
        model.name_or_path = name_or_path
        return model


class RewardModel(_HeadModel):
    """r(x, y) = W h_last + b (K objectives, combined into one scalar)."""

    config_class = RewardModelConfig

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                segment_ids: Tensor | None = None, **kwargs) -> RewardOutput:
        """Rewards of padded rows [B, T] -> [B]; or, with ``segment_ids`` [B, T] (prefix
        sharing: rows [prompt | chosen | rejected], 0/1/2, -1 padding, and their
        ``position_ids``), both completions' rewards -> [2B], chosen first."""
        if segment_ids is not None:
            from .logps import additive_mask, prefix_sharing_mask

            mask = prefix_sharing_mask(segment_ids)
            if self.backbone.config._attn_implementation == "eager":  # adds the mask
                mask = additive_mask(mask, self.dtype)
            hidden = self._hidden(input_ids, mask, **kwargs)
            rows = torch.arange(hidden.shape[0], device=hidden.device).repeat(2)
            ends = torch.cat([last_token_index(segment_ids == 1),
                              last_token_index(segment_ids == 2)])
            pooled = hidden[rows, ends]
        else:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            hidden = self._hidden(input_ids, attention_mask, **kwargs)
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            pooled = hidden[rows, last_token_index(attention_mask)]
        logits = self.score(pooled.to(self.score.weight.dtype))  # [B, K]
        if logits.shape[-1] == 1:
            return RewardOutput(rewards=logits[:, 0], logits=logits)
        if self.gate is not None:
            gate = torch.softmax(self.gate(pooled.to(self.gate.weight.dtype)), -1)
            return RewardOutput(rewards=(gate * logits).sum(-1), logits=logits, gate=gate)
        weights = logits.new_tensor(self.config.combination_weights)
        return RewardOutput(rewards=logits @ weights, logits=logits)


class ValueModel(_HeadModel):
    """V(x, y_<=t) = W h_t + b at every position (the PPO critic).

    A new head starts at zero (V = 0 everywhere): with the reward head's random init the
    values of SmolLM2-135M differed by about 1.2 from one token to the next, twice the
    spread of its VADER rewards, so GAE's first advantages were mostly that noise and
    PPO drifted away from the reference without gaining reward. From zero, the first
    advantages are the (discounted) returns themselves."""

    config_class = ValueModelConfig

    def _init_weights(self, module):
        if module is self.score:
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                **kwargs) -> ValueOutput:
        hidden = self._hidden(input_ids, attention_mask, **kwargs)
        logits = self.score(hidden.to(self.score.weight.dtype))
        return ValueOutput(values=logits[..., 0], logits=logits)


AutoConfig.register(RewardModelConfig.model_type, RewardModelConfig)
AutoConfig.register(ValueModelConfig.model_type, ValueModelConfig)
AutoModelForSequenceClassification.register(RewardModelConfig, RewardModel)
AutoModelForTokenClassification.register(ValueModelConfig, ValueModel)
AutoModel.register(RewardModelConfig, RewardModel)
AutoModel.register(ValueModelConfig, ValueModel)
