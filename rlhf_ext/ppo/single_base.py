"""Single-base PPO: one frozen copy of the base weights serves all four roles.

    policy     = base + LoRA adapter "default"        (trained)
    reference  = base with every adapter disabled     (free)
    value      = base + LoRA adapter "value" + head   (trained)
    reward     = base + LoRA adapter "reward" + head  (frozen; from a LoRA reward model)

The value and reward models are small modules (``AdapterHead``) that run the shared
decoder with their adapter active and apply their head. Adapters are switched by setting
each LoRA layer's active adapter for the duration of one forward pass
(``models.active_adapter``), which leaves ``requires_grad`` alone.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..heads import RewardOutput, ValueOutput, pooled_index
from ..models import active_adapter


class AdapterHead(nn.Module):
    """A value head (``kind='value'``: one value per position) or a reward head
    (``kind='reward'``: pooled as RewardModel pools, at the last real token that is not
    the pad token) over the shared decoder, with LoRA adapter ``adapter`` active."""

    def __init__(self, peft_model, adapter: str, head: nn.Linear, kind: str):
        super().__init__()
        self.adapter, self.kind, self.head = adapter, kind, head
        self._peft = [peft_model]  # a list: not registered as a submodule (no duplicate)

    @property
    def peft_model(self):
        return self._peft[0]

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        decoder = self.peft_model.get_base_model().get_decoder()
        with active_adapter(self.peft_model, self.adapter):
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, use_cache=False).last_hidden_state
        if self.kind == "value":
            logits = self.head(hidden.to(self.head.weight.dtype))
            return ValueOutput(values=logits[..., 0], logits=logits)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        pad = self.peft_model.get_base_model().config.pad_token_id
        pooled = hidden[rows, pooled_index(input_ids, attention_mask, pad)]
        logits = self.head(pooled.to(self.head.weight.dtype))
        return RewardOutput(rewards=logits[:, 0], logits=logits)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.peft_model, adapter_name=self.adapter)
        state.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        return state

    def save_pretrained(self, directory: str) -> None:
        """The adapter's LoRA weights and the head, in one safetensors file."""
        os.makedirs(directory, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.adapter_state().items()},
                  os.path.join(directory, "adapter_head.safetensors"))
        with open(os.path.join(directory, "adapter_head.json"), "w") as f:
            json.dump({"adapter": self.adapter, "kind": self.kind}, f)

    def load_checkpoint(self, directory: str) -> None:
        from peft import set_peft_model_state_dict

        state = load_file(os.path.join(directory, "adapter_head.safetensors"))
        head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        self.head.load_state_dict(head)
        lora = {k: v for k, v in state.items() if not k.startswith("head.")}
        set_peft_model_state_dict(self.peft_model, lora, adapter_name=self.adapter)


def new_value_head(hidden: int) -> nn.Linear:
    """V = 0 everywhere at the start, as ValueModel's head (rlhf_ext.heads)."""
    head = nn.Linear(hidden, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def build_single_base(base_model, policy_lora, reward_adapter_dir: str, value_lora=None):
    """(policy PeftModel, value AdapterHead, reward AdapterHead) over one copy of
    ``base_model`` (a causal LM, possibly 4-bit).

    ``reward_adapter_dir`` is a reward model trained with LoRA on the same base
    (``RewardTrainer(..., peft_config=...)`` saves it): its LoRA weights become adapter
    "reward" and its ``score`` head the reward head.
    """
    from peft import LoraConfig, set_peft_model_state_dict

    from ..models import add_adapters

    policy = add_adapters(base_model, policy_lora)
    hidden = base_model.config.get_text_config().hidden_size

    policy.add_adapter("value", value_lora or policy_lora)
    for name, p in policy.named_parameters():
        if ".value." in name or name.endswith(".value"):
            p.requires_grad_(True)
    value = AdapterHead(policy, "value", new_value_head(hidden), "value")

    config = LoraConfig.from_pretrained(reward_adapter_dir)
    config.modules_to_save = None
    config.inference_mode = True
    policy.add_adapter("reward", config)
    weights = load_file(os.path.join(reward_adapter_dir, "adapter_model.safetensors"))
    lora = {k: v for k, v in weights.items() if "lora_" in k}
    result = set_peft_model_state_dict(policy, lora, adapter_name="reward")
    if [k for k in result.unexpected_keys if "reward" in k or "lora" in k]:
        raise ValueError(f"reward adapter in {reward_adapter_dir} does not fit the base: "
                         f"{result.unexpected_keys[:4]}")
    score = {k.rsplit(".", 1)[-1]: v for k, v in weights.items() if ".score." in k}
    head = nn.Linear(hidden, 1, bias="bias" in score)
    head.load_state_dict(score)
    reward = AdapterHead(policy, "reward", head.requires_grad_(False), "reward")
    for name, p in policy.named_parameters():
        if ".reward." in name:
            p.requires_grad_(False)
    return policy, value, reward
