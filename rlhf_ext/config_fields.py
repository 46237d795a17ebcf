"""Data and loading fields that TRL's DPO, KTO, CPO, ORPO and Reward configs share, in one
mixin, and the vLLM fields of the sampling trainers (``VLLMFields``), with what each one does (``apply_tokenizer_fields``, ``model_init``,
``activation_offloading``, ``pad_multiple``)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

# every column the preference and reward trainers read: the Trainer's
# remove_unused_columns keeps these (they are not arguments of the model's forward)
TRAINING_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids", "completion_ids",
                    "kl_completion_ids", "label", "margin", "ref_chosen_logps",
                    "ref_rejected_logps", "ref_logps", "ref_kl_logps", "chosen_probability"]


@dataclass
class DataFields:
    """Mixed into the preference and reward configs (before TrainingArguments)."""

    dataset_num_proc: int | None = field(default=None, metadata={
        "help": "Processes that tokenize the datasets."})
    pad_to_multiple_of: int | str | None = field(default=None, metadata={
        "help": "Pad each batch's length to a multiple of this; 'auto' (TRL's default) is "
                "no padding off AWS Neuron."})
    pad_token: str | None = field(default=None, metadata={
        "help": "Token that pads (default: the tokenizer's pad token, else eos)."})
    padding_value: int | None = field(default=None, metadata={
        "help": "Token id that pads input_ids (default: the pad token's id)."})
    eos_token: str | None = field(default=None, metadata={
        "help": "Token that ends a completion (default: the tokenizer's eos)."})
    chat_template_path: str | None = field(default=None, metadata={
        "help": "A Jinja chat template file, or a tokenizer folder whose chat template to use."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Allow a model given by name to run its repository's own code."})
    activation_offloading: bool = field(default=False, metadata={
        "help": "Keep the activations saved for backward in CPU memory (on an accelerator; "
                "on a CPU they are there already)."})


@dataclass
class VLLMFields:
    """TRL's vLLM fields, for the trainers that sample (online RL, online DPO)."""

    use_vllm: bool = field(default=False, metadata={
        "help": "Sample with vLLM (rlhf_ext.vllm_engine) instead of transformers' generate; "
                "the policy's weights reach it after the optimizer steps between samplings."})
    vllm_mode: str = field(default="colocate", metadata={
        "help": "colocate (vLLM in the training process) or server (a vLLM server started "
                "with rlhf-ext vllm-serve; every process sends it prompts)."})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={
        "help": "colocate: the share of GPU memory vLLM takes (weights and KV cache)."})
    vllm_tensor_parallel_size: int = field(default=1, metadata={
        "help": "colocate: GPUs one vLLM engine spans."})
    vllm_enable_sleep_mode: bool = field(default=False, metadata={
        "help": "colocate, GPU: vLLM frees its memory between rollouts."})
    vllm_max_model_length: int | None = field(default=None, metadata={
        "help": "colocate: vLLM's context length; None: the longest prompt plus the "
                "completion length."})
    vllm_server_base_url: str | None = field(default=None, metadata={
        "help": "server: its URL (http://host:port); overrides host and port."})
    vllm_server_host: str = "0.0.0.0"
    vllm_server_port: int = 8000
    vllm_server_timeout: float = field(default=240.0, metadata={
        "help": "server: seconds to wait for it to answer."})

    def check_vllm_mode(self) -> None:
        if self.vllm_mode not in ("colocate", "server"):
            raise ValueError(f"vllm_mode must be colocate or server, got {self.vllm_mode!r}")


def pad_multiple(value):
    """pad_to_multiple_of as given in Python or on the command line: an int, None, or
    TRL's 'auto' (a multiple of 128 only on AWS Neuron, which this package does not
    target: no padding)."""
    if isinstance(value, str):
        if value == "auto" or value.lower() in ("none", "null"):
            return None
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f"pad_to_multiple_of must be an integer, None or 'auto', got "
                             f"{value!r}") from None
    if value is not None and value < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {value}")
    return value


def apply_tokenizer_fields(tokenizer, args) -> int:
    """Set ``pad_token``, ``eos_token`` and ``chat_template_path`` on the tokenizer, as
    TRL does, and return the id that pads input_ids (``padding_value`` if set)."""
    vocab = tokenizer.get_vocab()
    for name in ("pad_token", "eos_token"):
        token = getattr(args, name)
        if token is not None:
            if token not in vocab:
                raise ValueError(f"{name} {token!r} is not in the tokenizer's vocabulary; use "
                                 f"one of its tokens (its eos is {tokenizer.eos_token!r})")
            setattr(tokenizer, name, token)
    if args.chat_template_path is not None:
        path = args.chat_template_path
        if os.path.isdir(path):
            from transformers import AutoTokenizer

            tokenizer.chat_template = AutoTokenizer.from_pretrained(path).chat_template
        else:
            with open(path) as f:
                tokenizer.chat_template = f.read()
    return tokenizer.pad_token_id if args.padding_value is None else args.padding_value


def model_init(args) -> dict:
    """Keyword arguments for loading a model given by name: ``model_init_kwargs``, with
    dtype float32 unless they name one, as TRL's trainers do. (transformers 5 would take
    the checkpoint's dtype: a bf16 checkpoint would then train in pure bf16, where AdamW's
    small updates round away; ``bf16=True`` is mixed precision over float32 weights.)"""
    given = args.model_init_kwargs or {}
    if isinstance(given, str):  # JSON, as on a command line
        import json

        given = json.loads(given)
    extra = {"trust_remote_code": True} if args.trust_remote_code else {}
    return {"dtype": "float32", **extra, **given}


def activation_offloading(model, args):
    """A context for the training forward: with ``activation_offloading`` on an
    accelerator, the tensors saved for backward wait in pinned CPU memory; on a CPU (or
    when off) nothing changes."""
    device = next(model.parameters()).device
    if args.activation_offloading and device.type != "cpu" and model.training:
        import torch

        return torch.autograd.graph.save_on_cpu(pin_memory=True)
    return contextlib.nullcontext()
