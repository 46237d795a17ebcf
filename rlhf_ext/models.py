"""Loading models the one way: dtype, 4-bit/8-bit quantization, LoRA adapters."""

from __future__ import annotations

import contextlib

import torch
from transformers import AutoModelForCausalLM


def quantization_config(load_in_4bit: bool = False, load_in_8bit: bool = False,
                        quant_type: str = "nf4", use_double_quant: bool = False,
                        compute_dtype: torch.dtype = torch.bfloat16,
                        quant_storage: torch.dtype = torch.uint8):
    """A ``BitsAndBytesConfig`` or None (bitsandbytes runs on CPU too: ../shared/NOTES.md).
    ``quant_storage``: the dtype packing the 4-bit weights; ZeRO-3 and FSDP need it equal
    to the other weights' dtype (bfloat16) to partition them."""
    if not (load_in_4bit or load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit,
                              bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=use_double_quant,
                              bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_quant_storage=quant_storage)


def model_init_kwargs(model_args) -> dict:
    """``from_pretrained`` keyword arguments from TRL's ``ModelConfig``: revision, dtype,
    attn_implementation, and load_in_4bit/8bit with bnb_4bit_quant_type,
    use_bnb_nested_quant and bnb_4bit_quant_storage (4-bit compute in the model dtype,
    bfloat16 when that is auto)."""
    dtype = model_args.dtype
    compute = getattr(torch, dtype) if dtype in ("bfloat16", "float16", "float32") \
        else torch.bfloat16
    quant = quantization_config(
        model_args.load_in_4bit, model_args.load_in_8bit, model_args.bnb_4bit_quant_type,
        model_args.use_bnb_nested_quant, compute,
        getattr(torch, model_args.bnb_4bit_quant_storage or "uint8"))
    kwargs = {"revision": model_args.model_revision, "dtype": dtype,
              "attn_implementation": model_args.attn_implementation,
              "quantization_config": quant}
    return {k: v for k, v in kwargs.items() if v is not None}


def load_causal_lm(name_or_path: str, model_args=None, **kwargs):
    """``AutoModelForCausalLM`` from a path or Hub id, honouring TRL's ``ModelConfig``
    (``model_init_kwargs``); explicit keyword arguments win."""
    if model_args is not None:
        kwargs = {**model_init_kwargs(model_args), **kwargs}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return keep_4bit_differentiable(AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs))


def keep_4bit_differentiable(model):
    """Keep every bitsandbytes 4-bit layer of ``model`` on bitsandbytes' generic kernel,
    the same on every CPU; returns ``model``.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit weight for its inference
    kernel at the layer's first eval-mode forward without gradients (a PPO rollout, an
    evaluation), and from then on runs *every* forward through that kernel, training ones
    included. That kernel has no backward: no gradient reaches the layers below, so their
    LoRA adapters stop learning, silently. The repacking also needs in_features to be a
    multiple of 64 and out_features a multiple of 32 (else ``shape '[32, 0]' is
    invalid``), and undoing it re-quantizes the scales (lossy). On CPUs without
    AVX512-BF16, and on GPUs, nothing changes."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes Linear4bit
            module.support_avx512bf16_for_cpu = False
    return model


def disable_dropout(model):
    """Turn every dropout of ``model`` off; returns ``model``. Covers ``nn.Dropout`` modules
    (LoRA's ``lora_dropout`` included: call this after adding adapters) and dropout rates
    that attention layers read as plain floats (``attention_dropout`` in Llama, Qwen2...),
    which no ``nn.Dropout`` holds. TRL's ``disable_dropout`` default, made complete."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            for key, value in config.to_dict().items():
                if "dropout" in key and isinstance(value, float) and value > 0:
                    setattr(config, key, 0.0)
    return model


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or
                getattr(model, "is_loaded_in_8bit", False))


def add_adapters(model, peft_config, gradient_checkpointing: bool = False,
                 seed: int | None = None):
    """Wrap ``model`` in a PeftModel (preparing a quantized model for k-bit training first).
    ``seed`` fixes the adapters' random init, so every process and every launch of the
    same run starts from the same adapters."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if seed is not None:
        torch.manual_seed(seed)
    keep_4bit_differentiable(model)
    if is_quantized(model):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing)
    return get_peft_model(model, peft_config)


def is_peft_model(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


@contextlib.contextmanager
def adapters_disabled(model):
    """Run ``model`` as its base model: every LoRA layer off, then back as it was.

    Unlike peft's ``disable_adapter()``, this leaves ``requires_grad`` alone (peft
    re-activates the active adapter on exit and freezes every other one, which would stop
    a second trained adapter, such as single-base PPO's value adapter, from learning)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    previous = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, old in zip(layers, previous):
            m._disable_adapters = old


@contextlib.contextmanager
def active_adapter(model, name: str):
    """Make adapter ``name`` the active one in every LoRA layer of ``model``, then restore
    (``requires_grad`` untouched, unlike peft's ``set_adapter``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    previous = [m._active_adapter for m in layers]
    for m in layers:
        m._active_adapter = [name]
    try:
        yield
    finally:
        for m, old in zip(layers, previous):
            m._active_adapter = old


@contextlib.contextmanager
def quiet_transformers():
    """transformers' logging at error level for the block (e.g. its load report listing
    a classifier's head as unexpected when only the backbone is wanted), then restored."""
    from transformers.utils import logging

    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(previous)


def load_tokenizer(processing_class, name_or_path: str):
    """The given tokenizer, else the model's; a missing pad token becomes eos."""
    from transformers import AutoTokenizer

    tokenizer = processing_class or AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
