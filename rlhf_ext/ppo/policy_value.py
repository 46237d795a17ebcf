"""The value as a head on the policy's own final hidden states (``value_head_on_policy``).

One network for both: the head is a linear map H -> 1 (zero at the start, as ValueModel's),
and the policy's forward that gives the response log-probs gives the values too, so PPO
runs one forward and one backward per minibatch instead of two of each, and holds no
second model with its gradients and optimizer state. The value loss (scaled by vf_coef)
then trains the policy's weights too: TRL 0.x's ``AutoModelForCausalLMWithValueHead``
and the PPO of Ziegler et al. (2019) share the trunk the same way.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..heads import ValueOutput
from ..logps import final_hidden
from .single_base import new_value_head

FILE, CONFIG = "value_head.safetensors", "value_head.json"


class PolicyValueHead(nn.Module):
    """V(s) = w . h(s) + b over ``policy``'s final (normalised) hidden states h.

    The policy is kept out of this module's parameters (the optimizer reaches it through
    the policy itself). Called alone it runs the policy's forward: values [B, T]; the
    rollout and the update instead apply ``head`` to the hidden states of the policy's
    own forward (``rollout.response_logps(..., value_head=head)``)."""

    def __init__(self, policy, hidden_size: int):
        super().__init__()
        self._policy = [policy]  # a list: not a registered submodule (no parameter twice)
        self.head = new_value_head(hidden_size)

    @property
    def policy(self):
        return self._policy[0]

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] hidden states -> [...] values (float32)."""
        return self.head(hidden.to(self.head.weight.dtype))[..., 0].float()

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        hidden = final_hidden(self.policy, input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids)
        values = self.values(hidden)
        return ValueOutput(values=values, logits=values[..., None])

    def on(self, policy) -> PolicyValueHead:
        """A head like this one (same weights) on another policy: the whole rollout copy's
        under ZeRO-3 and FSDP (``sharding.RolloutCopies``)."""
        twin = PolicyValueHead(policy, self.head.in_features)
        twin.head.to(dtype=self.head.weight.dtype)
        return twin

    def save_pretrained(self, directory: str, state_dict: dict | None = None) -> None:
        """The head alone (the policy is saved as the policy); ``state_dict``: this
        module's weights gathered from the shards (ZeRO-3, FSDP), else its own."""
        os.makedirs(directory, exist_ok=True)
        state = self.state_dict() if state_dict is None else state_dict
        save_file({k[len("head."):]: v.contiguous() for k, v in state.items()
                   if k.startswith("head.")}, os.path.join(directory, FILE))
        with open(os.path.join(directory, CONFIG), "w") as f:
            json.dump({"kind": "value_head_on_policy",
                       "hidden_size": self.head.in_features}, f)

    def load_checkpoint(self, directory: str) -> None:
        path = os.path.join(directory, FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: this checkpoint was not written with "
                                    "value_head_on_policy=True")
        self.head.load_state_dict(load_file(path))
