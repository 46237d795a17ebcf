"""Reward and value heads as real transformers models: a backbone plus a linear head.

After ``import rlhf_ext`` the Auto classes know them (no trust_remote_code):

| config (model_type)                   | model        | Auto class                            |
|---------------------------------------|--------------|---------------------------------------|
| ``RewardModelConfig`` (rlhf_ext_reward) | RewardModel | AutoModelForSequenceClassification |
| ``ValueModelConfig`` (rlhf_ext_value)   | ValueModel  | AutoModelForTokenClassification    |

The backbone is any decoder ``AutoModel`` builds (Llama, Qwen2, GPT-2, ...), held as
``model`` as in transformers' own classifiers. The head ``score`` is ``Linear(hidden, K)``
initialised with std 1 / sqrt(hidden + 1) (the scale of Stiennon et al. 2020), so initial
rewards are O(1); a scalar reward head (K = 1) has no bias, as transformers' has none (a
pairwise loss never moves a bias), the value head and K > 1 heads have one.

A scalar RewardModel is a transformers ``<Backbone>ForSequenceClassification`` with one
label in all but name: the same weight names, no bias, and the same pooled token, the
last one that is neither masked nor the pad token (so with pad == eos, SmolLM2's case,
the token before a final eos; transformers decides by the ids alone). ``save_pretrained``
writes it in that native format, so plain transformers loads it and scores the same. With
K > 1 objectives (``objective_names``) the K rewards are combined into one: fixed weights,
or learned (ArmoRM-style) gating weights softmax(gate(h)) computed from the same pooled
state; those, and value models, are saved as our classes.
"""

from __future__ import annotations

import copy
import math
import os
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

    Left padding: T - 1; right padding: the last real token; a full row: T - 1; a row
    without any: 0."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


def pooled_index(input_ids: Tensor, keep: Tensor, pad_token_id: int | None) -> Tensor:
    """The position a reward head reads, per row: the last one that ``keep`` [B, T] marks
    and whose id [B, T] is not the pad token -> [B] (long). For padded rows (keep = the
    attention mask) this is transformers' sequence-classifier rule, the rightmost non-pad
    token; with pad == eos a final eos is skipped, as it is there."""
    if pad_token_id is not None:
        keep = keep.bool() & (input_ids != pad_token_id)
    return last_token_index(keep)


def shared_pooled_index(input_ids: Tensor, segment_ids: Tensor, sequence_ids: Tensor | None,
                        pad_token_id: int | None) -> tuple[Tensor, Tensor]:
    """Where each completion of prefix-shared pairs is pooled: the last position of its
    pair's prompt or its own tokens that is not the pad token, as in its own padded row.
    Pairs are the rows, or (``sequence_ids`` given) the ids in them.

    Shapes: input_ids, segment_ids (0/1/2, -1 padding), sequence_ids [B, L] ->
    (row [2P], column [2P]), the P chosen first.
    """
    from .shared_prefix import pair_ids

    (pair, pairs), width = pair_ids(segment_ids, sequence_ids), segment_ids.shape[1]
    flat = torch.arange(pair.numel(), device=pair.device).view_as(pair)  # row * width + col
    # a pair with nothing to pool reads its first position, as last_token_index's 0
    first = torch.full((pairs,), pair.numel(), dtype=flat.dtype, device=flat.device)
    first = first.scatter_reduce(0, pair.reshape(-1), flat.reshape(-1), "amin")
    real = segment_ids >= 0
    if pad_token_id is not None:
        real &= input_ids != pad_token_id
    lasts = []
    for completion in (1, 2):
        keep = real & ((segment_ids == 0) | (segment_ids == completion))
        lasts.append(first.scatter_reduce(0, pair[keep], flat[keep], "amax"))
    last = torch.cat(lasts)
    return last // width, last % width


def native_classifier(model_type: str):
    """transformers' sequence-classifier class for a backbone ``model_type`` if it is the
    generic one (backbone as ``model``, a bias-free ``score``: Llama, Qwen2, Mistral, ...),
    whose weights a scalar RewardModel names alike; else None (GPT-2's is ``transformer``)."""
    import transformers
    from transformers.modeling_layers import GenericForSequenceClassification
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    name = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(model_type)
    native = getattr(transformers, name, None) if name else None
    return native if native is not None and issubclass(
        native, GenericForSequenceClassification) else None


class _HeadModel(PreTrainedModel):
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    # the attention is the backbone's: let transformers choose its implementation for it
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules: list[str] = []

    def __init__(self, config, backbone=None):
        super().__init__(config)
        self.model = backbone if backbone is not None else AutoModel.from_config(
            config.backbone_config)
        k = len(config.objective_names)
        self.score = nn.Linear(config.hidden_size, k, bias=self._score_bias(k))
        self.gate = (nn.Linear(config.hidden_size, k)
                     if config.combination == "learned" and k > 1 else None)
        self.post_init()

    @staticmethod
    def _score_bias(k: int) -> bool:
        return True

    def _init_weights(self, module):
        if module is getattr(self, "score", None) or module is getattr(self, "gate", None):
            nn.init.normal_(module.weight, std=1 / math.sqrt(self.config.hidden_size + 1))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif hasattr(self, "model"):
            # the backbone's own rule (buffers such as rotary frequencies included); modules
            # already loaded from a checkpoint are marked initialised and left alone
            self.model._init_weights(module)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def _hidden(self, input_ids, attention_mask, **kwargs) -> Tensor:
        kwargs.pop("use_cache", None)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                            **kwargs)
        return out.last_hidden_state

    @classmethod
    def from_backbone(cls, name_or_path: str, objective_names: list[str] | None = None,
                      combination: str = "fixed", combination_weights=None, seed: int = 0,
                      **load_kwargs):
        """Backbone weights from a causal-LM, base or reward/value checkpoint (a head model
        gives its backbone, e.g. a value model started from the reward model); a fresh
        head (seeded)."""
        from .models import keep_4bit_differentiable, quiet_transformers

        with quiet_transformers():  # a classifier's score is not the backbone's: no report
            backbone = AutoModel.from_pretrained(name_or_path, **load_kwargs)
        backbone = keep_4bit_differentiable(backbone)
        if isinstance(backbone, _HeadModel):
            backbone = backbone.model
        config_cls = cls.config_class
        config = config_cls(backbone_config=backbone.config, objective_names=objective_names,
                            combination=combination, combination_weights=combination_weights)
        device, dtype = head_placement(backbone)
        with torch.random.fork_rng(devices=[]):  # the CPU's generator only: no GPU touched
            torch.manual_seed(seed)
            model = cls(config, backbone=backbone)  # the new head: on the CPU, float32
        for head in (model.score, model.gate):
            if head is not None:
                head.to(device=device, dtype=dtype)
        model.name_or_path = name_or_path
        return model


def head_placement(backbone: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where a new head on ``backbone`` belongs: the device of its last parameter (the
    final norm, whose output the head reads: the last GPU when a device map spreads the
    layers) and the dtype of its input embeddings, which quantization leaves unpacked
    (float32 beside 4-bit layers loaded in float32, bfloat16 in a bfloat16 model)."""
    last = list(backbone.parameters())[-1]
    return last.device, backbone.get_input_embeddings().weight.dtype


class RewardModel(_HeadModel):
    """r(x, y) = W h + b at the pooled token (K objectives, combined into one scalar)."""

    config_class = RewardModelConfig

    @staticmethod
    def _score_bias(k: int) -> bool:
        return k > 1

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                segment_ids: Tensor | None = None, sequence_ids: Tensor | None = None,
                **kwargs) -> RewardOutput:
        """Rewards of padded rows [B, T] -> [B]; or, with ``segment_ids`` [B, T] (prefix
        sharing: rows [prompt | chosen | rejected], 0/1/2, -1 padding, and their
        ``position_ids``), both completions' rewards -> [2B], chosen first; or with
        ``sequence_ids`` too (padding-free: P such pairs one after another in one row,
        ``sequence_ids`` [1, N] naming each token's pair) -> [2P]. A completion is pooled
        as it would be in its own padded row [prompt | completion]."""
        pad = self.config.pad_token_id
        if segment_ids is not None:
            from .shared_prefix import SPANS, attention_inputs, check_spans_used, span_calls

            before = span_calls()
            shared = attention_inputs(self.model.config._attn_implementation, segment_ids,
                                      self.dtype, sequence_ids)
            hidden = self._hidden(input_ids, shared.pop("attention_mask"), **shared, **kwargs)
            if sequence_ids is not None and SPANS in shared:
                check_spans_used(before)
            rows, ends = shared_pooled_index(input_ids, segment_ids, sequence_ids, pad)
            pooled = hidden[rows, ends]
        else:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            hidden = self._hidden(input_ids, attention_mask, **kwargs)
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            pooled = hidden[rows, pooled_index(input_ids, attention_mask, pad)]
        logits = self.score(pooled.to(self.score.weight.dtype))  # [B, K]
        if logits.shape[-1] == 1:
            return RewardOutput(rewards=logits[:, 0], logits=logits)
        if self.gate is not None:
            gate = torch.softmax(self.gate(pooled.to(self.gate.weight.dtype)), -1)
            return RewardOutput(rewards=(gate * logits).sum(-1), logits=logits, gate=gate)
        weights = logits.new_tensor(self.config.combination_weights)
        return RewardOutput(rewards=logits @ weights, logits=logits)

    def native_config(self):
        """The config of the transformers sequence classifier (num_labels 1) this scalar
        head is, or None where there is none that names its weights as ours (``model.*``
        and a bias-free ``score``: transformers' generic classifier, as Llama's, Qwen2's
        and Mistral's are): K > 1, or a backbone such as GPT-2."""
        native = native_classifier(self.config.backbone_config.model_type)
        if len(self.config.objective_names) != 1 or native is None:
            return None
        config = copy.deepcopy(self.model.config)
        config.architectures = [native.__name__]
        config.num_labels = 1
        config.id2label, config.label2id = {0: "reward"}, {"reward": 0}
        config.pad_token_id = self.config.pad_token_id
        return config

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        """A scalar head is saved as transformers' own ``<Backbone>ForSequenceClassification``
        (``native_config``; the weights already carry its names), which plain transformers
        loads and which scores exactly as this model does; the others as RewardModel
        (loading them needs ``import rlhf_ext``)."""
        config = self.native_config()
        super().save_pretrained(save_directory, *args, **kwargs)
        if config is not None and kwargs.get("is_main_process", True):
            config.save_pretrained(save_directory)  # over ours
        if push_to_hub:  # uploads what this method writes, into a folder of its own
            repo_id = kwargs.get("repo_id") or os.path.basename(os.path.normpath(save_directory))
            self.push_to_hub(repo_id, token=kwargs.get("token"))


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
