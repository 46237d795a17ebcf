"""Reference log-probs for the preference trainer, one of four ways:

- ``none``: the losses need no reference (orpo, simpo, cpo, sft): no forward at all;
- ``model``: an explicit reference model (or, failing all else, a frozen copy of the policy);
- ``adapters_off``: the policy is a PeftModel: the same model with its adapters disabled,
  so no second copy of the weights exists;
- precomputed: any of the above run once over the dataset before training, the results
  stored as ``ref_*`` columns and cached on disk under a key of model, data and settings.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .logps import batch_logps
from .models import adapters_disabled, is_peft_model
from .sharding import broadcast_module, fsdp_requested, gathered

CACHE_VERSION = 2  # 2: the file holds a checksum beside the columns
REFERENCE_FILE = "reference_model.safetensors"  # TR-DPO's moving reference, per checkpoint


def default_cache_dir() -> Path:
    root = os.environ.get("RLHF_EXT_CACHE", os.path.join(Path.home(), ".cache", "rlhf_ext"))
    return Path(root) / "ref_logps"


def model_fingerprint(model) -> str:
    """A hash of the weights the reference sees (LoRA weights excluded): names, shapes and
    a strided sample plus the sum of every tensor. Cheap, and changes when weights do."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if "lora_" in name:
            continue
        t = p.detach().reshape(-1).float()
        step = max(1, t.numel() // 2048)
        h.update(f"{name}{tuple(p.shape)}{p.dtype}{t.sum().item():.6e}".encode())
        h.update(t[::step].cpu().numpy().tobytes())
    return h.hexdigest()


def data_fingerprint(dataset) -> str:
    """A hash of the token ids (and labels) the reference log-probs are computed from."""
    h = hashlib.sha256()
    for column in sorted(c for c in dataset.column_names if c.endswith("_ids") or c == "label"):
        h.update(column.encode())
        h.update(json.dumps(list(dataset[column])).encode())
    return h.hexdigest()


def engine_precision_copy(trainer):
    """The policy with its parameters cast as DeepSpeed's engine will cast them, for a
    reference computed from the policy (adapters off, or as it starts) before ``train`` makes
    that engine: under ZeRO-0/1/2 with bf16 or fp16 the engine casts the parameters (not the
    buffers) to half precision, and a reference from the float32 ones started LoRA DPO at a
    loss 2e-3 off log 2 under ZeRO-2 + bf16. None when nothing is cast (no DeepSpeed,
    float32, or ZeRO-3, whose partitions are made in the engine's dtype)."""
    args, plugin = trainer.args, trainer.accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage == 3 or not (args.bf16 or args.fp16):
        return None
    model = copy.deepcopy(trainer.model)
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(torch.bfloat16 if args.bf16 else torch.float16)
    return model


class ReferenceLogps:
    def __init__(self, mode: str, model=None, ld_alpha: float | None = None):
        self.mode, self.model, self.ld_alpha = mode, model, ld_alpha
        self.initial_fingerprint: str | None = None  # initial_policy: the weights before training

    @classmethod
    def choose(cls, policy, ref_model, args) -> ReferenceLogps:
        ld_alpha = getattr(args, "ld_alpha", None)  # the policy's log-probs are LD's too
        if not args.needs_reference:
            return cls("none")
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
            return cls("model", ref_model, ld_alpha)
        if is_peft_model(policy):
            return cls("adapters_off", None, ld_alpha)
        if args.precompute_ref_log_probs:
            # computed before the first update: no copy needed
            return cls("initial_policy", None, ld_alpha)
        return cls("model", _frozen_copy(policy).eval().requires_grad_(False), ld_alpha)

    def prepare(self, accelerator) -> None:
        """Place an explicit reference model for the launch: under DeepSpeed it becomes an
        inference engine with the policy's precision (DeepSpeed casts the policy's weights
        to bf16 itself: a float32 reference beside it made DPO's first loss 0.69333, not
        log 2), ZeRO-3's partitioned weights gathered per layer on each forward, no
        partitioning below stage 3; under FSDP2 sharded as the policy is (with
        ``cpu_ram_efficient_loading`` only process 0 loaded real weights, which this
        broadcasts: left alone, the other processes' reference held whatever memory the
        empty model had, and DPO's first loss was 0.6966, not log 2); otherwise
        accelerate's evaluation-mode preparation."""
        if self.model is None:
            return
        plugin = accelerator.state.deepspeed_plugin
        if plugin is not None:
            import deepspeed

            config = copy.deepcopy(plugin.deepspeed_config)
            config.pop("optimizer", None)
            config.pop("scheduler", None)
            if plugin.zero_stage != 3:  # nothing to train: no optimizer state to shard
                config.setdefault("zero_optimization", {})["stage"] = 0
            self.model = deepspeed.initialize(model=self.model, config=config)[0]
            self.model.eval()  # DeepSpeedEngine.eval returns None
        elif accelerator.is_fsdp2:
            from accelerate.utils import fsdp2_prepare_model

            self.model = fsdp2_prepare_model(accelerator, self.model).eval()
        else:
            self.model = accelerator.prepare_model(self.model, evaluation_mode=True)

    @torch.no_grad()
    def logps(self, policy, inputs: dict, prefix: str = ""):
        """Reference (summed log-probs, counts) of the sequences ``prefix`` names in
        ``inputs`` (``logps.batch_logps``)."""
        if self.mode == "model":
            return batch_logps(self.model, inputs, prefix, ld_alpha=self.ld_alpha)
        if self.mode == "adapters_off":
            with adapters_disabled(policy):
                return batch_logps(policy, inputs, prefix, ld_alpha=self.ld_alpha)
        if self.mode == "initial_policy":
            return batch_logps(policy, inputs, prefix, ld_alpha=self.ld_alpha)
        raise RuntimeError(f"reference log-probs requested but the reference mode is {self.mode}")

    def precompute(self, trainer, dataset, name: str):
        """``dataset`` plus ref_chosen_logps/ref_rejected_logps (paired) or ref_logps/
        ref_kl_logps (unpaired), computed once (sharded over processes) or read from cache."""
        args = trainer.args
        trained = self.mode == "initial_policy" and trainer.state.global_step > 0
        if trained:  # the reference is the policy as it was: only its cache can answer
            fingerprint = self.initial_fingerprint
        else:
            _process_0_weights(self.model or trainer.model, trainer.accelerator)
            with gathered(self.model or trainer.model):  # hash the real weights
                fingerprint = model_fingerprint(self.model or trainer.model)
            if self.mode == "initial_policy":
                self.initial_fingerprint = fingerprint
        key = hashlib.sha256(json.dumps({
            "model": fingerprint,
            "data": data_fingerprint(dataset), "max_length": args.max_length,
            "truncation_mode": args.truncation_mode, "version": CACHE_VERSION,
            **({"ld_alpha": self.ld_alpha} if self.ld_alpha is not None else {}),
        }).encode()).hexdigest()[:24]
        path = Path(args.ref_logps_cache_dir or default_cache_dir()) / f"{key}.pt"
        columns = read_cache(path, len(dataset)) if path.exists() else None
        self.cache_hit = columns is not None
        if columns is None and trained:
            raise ValueError(
                f"{name} dataset: precompute_ref_log_probs without a ref_model takes the "
                "reference from the policy before training, and the policy has trained since "
                f"(step {trainer.state.global_step}), so this dataset's reference log-probs "
                "can no longer be computed (it was not given at construction). Pass it as "
                "eval_dataset when making the trainer, or pass ref_model=, or train with LoRA "
                "(the reference is then the base with adapters off).")
        if columns is None:
            writable = cache_writable(path.parent) if trainer.accelerator.is_main_process \
                else True
            columns = self._compute(trainer, dataset, name)
            if trainer.accelerator.is_main_process and writable:
                write_cache(path, columns)
            trainer.accelerator.wait_for_everyone()
        self.cache_path = path
        for column, values in columns.items():
            dataset = dataset.add_column(column, values.tolist())
        return dataset

    def _compute(self, trainer, dataset, name: str) -> dict:
        args = trainer.args
        loader = DataLoader(dataset, shuffle=False, collate_fn=trainer.data_collator,
                            batch_size=args.precompute_ref_batch_size
                            or args.per_device_train_batch_size)
        loader = trainer.accelerator.prepare(loader)
        policy = trainer.model  # a reference model of its own is an engine already
        if self.model is None:
            policy = engine_precision_copy(trainer) or policy
        was_training = policy.training
        policy.eval()
        out = defaultdict(list)
        with gathered(self.model or policy), trainer.compute_loss_context_manager():
            for batch in tqdm(loader, desc=f"reference log-probs ({name})",
                              disable=not trainer.accelerator.is_local_main_process):
                self._collect(policy, batch, out, trainer.accelerator)
        policy.train(was_training)
        return {k: torch.cat(v) for k, v in out.items()}

    def _collect(self, policy, batch, out, accelerator) -> None:
        logps, _ = self.logps(policy, batch)
        if "desirable" in batch:
            kl, _ = self.logps(policy, batch, prefix="kl_")
            parts = {"ref_logps": logps, "ref_kl_logps": kl}
        else:
            half = logps.shape[0] // 2
            parts = {"ref_chosen_logps": logps[:half], "ref_rejected_logps": logps[half:]}
        for k, v in parts.items():
            out[k].append(accelerator.gather_for_metrics(v).float().cpu())


    # TR-DPO (sync_ref_model): the reference moves towards the policy during training --------

    def _reference_module(self):
        from .logps import unwrap

        return unwrap(self.model)

    @torch.no_grad()
    def mix_from(self, policy, alpha: float) -> None:
        """reference <- alpha * policy + (1 - alpha) * reference, parameter by parameter
        (TR-DPO's soft update, Gorbatovski et al. 2024, eq. 5)."""
        reference = dict(self._reference_module().named_parameters())
        policy_params = dict(policy.named_parameters())
        if policy_params.keys() != reference.keys():
            raise ValueError("sync_ref_model needs a reference with the policy's parameters; "
                             "this ref_model has others (another architecture?)")
        for name, p in policy_params.items():
            reference[name].mul_(1 - alpha).add_(p.detach().to(reference[name].dtype),
                                                 alpha=alpha)

    def save_weights(self, folder: str, accelerator) -> None:
        """The moving reference's weights, beside a checkpoint (main process; tied
        weights stored once)."""
        from safetensors.torch import save_model

        if accelerator.is_main_process:
            os.makedirs(folder, exist_ok=True)
            save_model(self._reference_module(), os.path.join(folder, REFERENCE_FILE))
        accelerator.wait_for_everyone()

    def load_weights(self, folder: str) -> None:
        from safetensors.torch import load_model

        path = os.path.join(folder, REFERENCE_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: this checkpoint was not written with "
                                    "sync_ref_model, so the reference it trained against is lost")
        load_model(self._reference_module(), path, device=str(
            next(self._reference_module().parameters()).device))


# The shared cache of reference log-probs ----------------------------------------------------

def write_cache(path: Path, columns: dict[str, torch.Tensor]) -> None:
    """Write ``columns`` with a checksum of their values, under a temporary name unique to
    this process, then rename it into place: a reader sees the whole file or none, and two
    runs computing the same key never touch each other's temporary file."""
    import uuid

    payload = {"version": CACHE_VERSION, "sha256": _checksum(columns), "columns": columns}
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_cache(path: Path, rows: int) -> dict[str, torch.Tensor] | None:
    """The columns cached in ``path`` for a dataset of ``rows`` rows, or None (with a
    warning naming the file) when the file is unreadable, not ours, of another shape or
    its values do not match their checksum: the caller then computes them again."""
    import warnings

    problem = None
    try:
        payload = torch.load(path, weights_only=True)  # tensors only: never unpickle code
    except Exception as error:  # noqa: BLE001 - truncated, empty or garbage: all unreadable
        payload, problem = None, f"unreadable ({type(error).__name__})"
    if problem is None:
        columns = payload.get("columns") if isinstance(payload, dict) else None
        if payload is None or not isinstance(columns, dict) or not columns or any(
                not isinstance(v, torch.Tensor) for v in columns.values()):
            problem = "not a reference log-prob cache of this version"
        elif any(v.shape != (rows,) for v in columns.values()):
            shapes = sorted({tuple(v.shape) for v in columns.values()})
            problem = f"holds values of shape {shapes} for a dataset of {rows} rows"
        elif payload.get("sha256") != _checksum(columns):
            problem = "its values do not match their checksum (changed or damaged)"
    if problem is not None:
        warnings.warn(f"reference log-prob cache {path} is {problem}: computing the values "
                      "again and replacing it", stacklevel=3)
        return None
    return columns


def cache_writable(folder: Path) -> bool:
    """Whether the cache folder can be created and written, checked before the reference
    pass: if not, the values stay in memory for this run (a warning says so) instead of the
    run failing after the whole pass."""
    import warnings

    from .trainer_utils import probe_write

    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe_write(folder)
        return True
    except OSError as error:
        warnings.warn(f"reference log-prob cache folder {folder} is not writable ({error}); "
                      "keeping this run's reference log-probs in memory only (set "
                      "ref_logps_cache_dir or $RLHF_EXT_CACHE to a writable folder to share "
                      "them between runs)", stacklevel=3)
        return False


def _checksum(columns: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(columns):
        h.update(name.encode())
        h.update(columns[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _frozen_copy(policy):
    """A copy of the policy's weights for the reference. Under ZeRO-3 the policy's weights
    are already partitioned, which a deepcopy cannot reproduce: load it again instead."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return copy.deepcopy(policy)
    path = getattr(policy.config, "_name_or_path", "")
    if not path:
        raise ValueError("Under DeepSpeed ZeRO-3 the reference model is loaded again from the "
                         "policy's path, and this policy has none: pass ref_model=, use LoRA "
                         "(the reference is then the base with adapters off), or set "
                         "precompute_ref_log_probs=True.")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=policy.dtype)


def _process_0_weights(model, accelerator) -> None:
    """Before the precompute, which runs before the trainer shards anything: under FSDP
    with ``cpu_ram_efficient_loading`` only process 0 loaded real weights, so the others'
    share of the reference log-probs came from uninitialised memory (DPO's first loss
    0.6948, not log 2). They get process 0's weights first (accelerate's FSDP preparation
    broadcasts them again later)."""
    from torch.distributed.fsdp import FSDPModule

    if fsdp_requested() and accelerator.num_processes > 1 and \
            not any(isinstance(m, FSDPModule) for m in model.modules()):
        broadcast_module(model)
