"""Sharded weights (DeepSpeed ZeRO-3, FSDP2): what the trainers need to know about them.

- ``shard_on_cpu``: accelerate drops an FSDP config when its processes run on CPUs (the
  state stays ``MULTI_CPU`` and the model gets DDP), although torch's ``fully_shard`` runs
  there with gloo; this turns the state into the FSDP one the config asked for.
- ``weights_sharded``: whether a process holds only a part of each weight, so that a
  forward needs every process (a forward on one process alone waits forever).
"""

from __future__ import annotations

import contextlib
import os


def fsdp_requested() -> bool:
    """An accelerate FSDP config (``accelerate launch --config_file fsdp.yaml``) is active."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def shard_on_cpu(accelerator) -> bool:
    """Make ``accelerator`` shard with FSDP when the launch asked for FSDP but its processes
    are CPU ones. accelerate only reads the FSDP plugin for GPU-like device types
    (``AcceleratorState.__init__``: ``MULTI_CPU`` is not in its list), so on a CPU the
    model was silently replicated with DDP. True when the state was changed."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if not fsdp_requested() or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()  # read from the launch's FSDP_* variables
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    # every later AcceleratorState() copies PartialState's type over its own: set both, as
    # accelerate's own set-up does
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def sharding_requested() -> str | None:
    """"DeepSpeed ZeRO-3" or "FSDP" when the launch shards every weight, else None. For
    set-up code that runs before any accelerator exists."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return "DeepSpeed ZeRO-3" if is_deepspeed_zero3_enabled() else \
        "FSDP" if fsdp_requested() else None


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator is not None and accelerator.distributed_type == DistributedType.FSDP


def weights_sharded(accelerator) -> bool:
    """ZeRO-3 or FSDP with several processes: each holds a slice of every weight. Read
    from the accelerator's own state (transformers' ZeRO-3 flag is off inside
    ``whole_loading``)."""
    if accelerator is None or accelerator.num_processes < 2:
        return False
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return (plugin is not None and plugin.zero_stage == 3) or is_fsdp(accelerator)


@contextlib.contextmanager
def whole_loading():
    """``from_pretrained`` in one process while ZeRO-3 is configured: transformers builds
    every model under ``deepspeed.zero.Init`` then, which partitions each weight at
    construction with a broadcast the other processes never join (a hang). Inside this,
    a model loads whole, as without DeepSpeed."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref  # what is_deepspeed_zero3_enabled reads
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def broadcast_module(module) -> None:
    """Every process's ``module`` gets process 0's weights and buffers. Collective. Under
    FSDP with ``cpu_ram_efficient_loading`` only process 0's ``from_pretrained`` (and
    copies made from it) hold real weights; a frozen model kept whole on each process
    (a reference, a reward model) needs them."""
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def whole_everywhere(model):
    """``model`` whole and the same on every process, before a Trainer shards anything:
    under ZeRO-3 a whole copy of its (possibly partitioned) weights, under FSDP process 0's
    weights broadcast (with ``cpu_ram_efficient_loading`` only process 0 loaded real ones).
    Collective."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return whole_copy(model)
    broadcast_module(model)
    return model


def full_state_dict(model) -> dict:
    """The whole weights of an FSDP-sharded ``model`` on every process (not only process 0,
    as for a save). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


@contextlib.contextmanager
def gathered(model):
    """Under ZeRO-3, ``model``'s weights whole on every process inside (collective: every
    process enters); a no-op otherwise."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        yield


def whole_copy(model):
    """A copy of ``model`` (a transformers model, or a PeftModel with one adapter) whose
    weights are whole on this process: a deepcopy, or under ZeRO-3 (weights partitioned
    since loading) a model built outside ZeRO-3, with the same adapter, loaded with the
    gathered weights. Collective under ZeRO-3."""
    import copy

    import torch
    from peft import PeftModel, get_peft_model
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return copy.deepcopy(model)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    with whole_loading(), torch.random.fork_rng(devices=[]):  # LoRA's init draws
        twin = type(base)._from_config(base.config, dtype=base.dtype)
        if isinstance(model, PeftModel):
            if len(model.peft_config) != 1:
                raise ValueError(f"a whole copy under ZeRO-3 takes one adapter; the model "
                                 f"has {sorted(model.peft_config)}")
            name = model.active_adapter
            twin = get_peft_model(twin, copy.deepcopy(model.peft_config[name]),
                                  adapter_name=name)
    with gathered(model):
        twin.load_state_dict(model.state_dict())
    return twin


def state_part(state: dict, name: str) -> dict:
    """The entries of a state dict under submodule ``name``, without the prefix."""
    prefix = name + "."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


class RolloutCopies:
    """Under ZeRO-3 and FSDP, whole copies of a model's submodules (PPO's "policy" and
    "value_model") for the rollout, refreshed from the shards before each one: sampled
    from the shards, each token's forward would be a collective per layer that every
    process must join in step, and processes stop sampling at different lengths. Costs
    one more copy of each per process. A value head on the policy
    (``PolicyValueHead``) is copied as a head on the policy's copy."""

    def __init__(self, modules: dict):
        from .ppo.policy_value import PolicyValueHead

        self.copies = {}
        for name, m in modules.items():  # the policy first: a value head sits on its copy
            if isinstance(m, PolicyValueHead):
                self.copies[name] = m.on(self.copies["policy"])
            elif m is not None:
                self.copies[name] = whole_copy(m).eval()
        self.loaded = False  # after the first refresh only trained weights change

    def refresh(self, model, accelerator) -> dict:
        """The copies, loaded with ``model``'s current weights gathered on every process:
        every weight the first time, then the trained ones (LoRA's adapters, not the frozen
        base). Collective."""
        if is_fsdp(accelerator):
            state = full_state_dict(model) if not self.loaded else {
                n: p.full_tensor() if hasattr(p, "full_tensor") else p
                for n, p in model.named_parameters() if p.requires_grad}
            for name, copy_ in self.copies.items():
                copy_.load_state_dict(state_part(state, name), strict=not self.loaded)
        else:
            import deepspeed

            for name, copy_ in self.copies.items():
                source = getattr(model, name)
                named = [(n, p) for n, p in source.named_parameters()
                         if p.requires_grad or not self.loaded]
                with deepspeed.zero.GatheredParameters([p for _, p in named]):
                    state = source.state_dict() if not self.loaded else dict(named)
                    copy_.load_state_dict(state, strict=not self.loaded)
        self.loaded = True
        return self.copies


# torch optimizers that accelerate maps onto DeepSpeed's CPU ones with the same update:
# AdamW -> DeepSpeedCPUAdam(adamw_mode=True), Adam -> (adamw_mode=False), Adagrad ->
# DeepSpeedCPUAdagrad. Anything else it silently turns into DeepSpeedCPUAdam.
OFFLOAD_FAITHFUL = ("AdamW", "Adam", "Adagrad")


def offload_optimizer_refusal(deepspeed_config: dict | None, optimizer) -> str | None:
    """Why ``optimizer`` cannot run under this DeepSpeed config, or None. With the
    optimizer's state offloaded to CPU memory (``offload_optimizer``), no optimizer in the
    config and DeepSpeed's ``zero_force_ds_cpu_optimizer`` left on, accelerate replaces the
    Trainer's optimizer with one of DeepSpeed's CPU optimizers, and every optimizer but
    torch's AdamW, Adam and Adagrad becomes Adam: ``optim="sgd"`` would train with Adam at
    SGD's learning rate, silently."""
    import torch

    config = deepspeed_config or {}
    offload = config.get("zero_optimization", {}).get("offload_optimizer", {})
    if (offload.get("device", "none") == "none" or "optimizer" in config
            or not config.get("zero_force_ds_cpu_optimizer", True)):
        return None
    if type(optimizer) in tuple(getattr(torch.optim, name) for name in OFFLOAD_FAITHFUL):
        return None
    return (f"the optimizer is {type(optimizer).__name__}, but with offload_optimizer in the "
            "DeepSpeed config accelerate would replace it with DeepSpeed's CPU Adam (it maps "
            "only torch's AdamW, Adam and Adagrad to an optimizer that updates the same way). "
            "Use optim='adamw_torch' (the default), 'adagrad' or an Adam, name the optimizer "
            "in the DeepSpeed config, set zero_force_ds_cpu_optimizer: false there to keep "
            "this one on the CPU, or use a config without offload_optimizer.")
