"""What the trainers share around the Trainer: the finite-value guards, the hub token kept
out of saved arguments, device precision, and resuming from the newest complete
checkpoint (``CheckedTraining``, mixed into every trainer)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field


class NonFiniteError(FloatingPointError):
    """A NaN or infinity where training cannot go on: raised before anything is saved."""


def check_finite_fields(args, names: tuple[str, ...]) -> None:
    """At config time: each named field (a number, a list of numbers or None) is finite.
    NaN passes every ``<=``/``>`` check, so range checks alone let it through."""
    import math

    for name in names:
        value = getattr(args, name, None)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, (int, float)) and not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v}: set --{name} "
                                 "to a real value")


def check_finite_loss(trainer, loss, hint: str) -> None:
    """Each step: stop on a non-finite loss, naming the step and likely causes (``hint``),
    before the optimizer applies it and before anything is saved. One device sync."""
    import torch

    finite = torch.isfinite(loss.detach()).all().reshape(1)
    if trainer.args.world_size > 1:  # every process stops, none waits for a dead peer
        finite = trainer.accelerator.gather(finite).all()
    if not bool(finite):
        raise NonFiniteError(
            f"step {trainer.state.global_step + 1}: the loss is {loss.detach().float().item()}. "
            f"Likely causes: {hint}, or a learning rate too high for this model. Nothing "
            "from this step was applied or saved; the last checkpoint is intact.")


def check_finite_weights(model, output_dir: str, state_dict: dict | None = None) -> None:
    """Before a save: refuse to write a model with a non-finite trained parameter. Only
    trained ones: they are what diverges, and a frozen 4-bit weight is packed bytes whose
    storage dtype (bf16 with bnb_4bit_quant_storage) can read as NaN. Under ZeRO-3 and
    FSDP the process's parameters are slices (a DTensor, or an empty ZeRO-3 placeholder)
    and reading a whole one is a collective that the other processes never join: the
    gathered ``state_dict`` the Trainer saves is what is checked there."""
    import torch

    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        value = None if state_dict is None else state_dict.get(name)
        if value is None:
            if _sharded(param):
                continue  # not in the saved state dict: not saved from here
            value = param.detach()
        if value.numel() and not bool(torch.isfinite(value).all()):
            raise NonFiniteError(f"not saving to {output_dir}: parameter {name} holds NaN or "
                                 "infinite values (training diverged)")


def _sharded(param) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor) or hasattr(param, "ds_id")


def start_run(args) -> None:
    """What every trainer does first with its arguments, before loading anything: keep the
    hub token out of them, refuse transformers' DataParallel fallback, and check that
    ``output_dir`` can be written."""
    keep_token_out_of_args(args)
    refuse_data_parallel(args.n_gpu)
    check_output_dir(args.output_dir)


def refuse_data_parallel(n_gpu: int) -> None:
    """A script run without a launcher on a machine with several GPUs makes the Trainer
    wrap the model in ``nn.DataParallel``, which splits each batch's rows over the GPUs but
    copies the rest of the inputs whole (the packed span layouts, the prompt width): wrong
    results or a crash. Refused, with the two ways that work."""
    if n_gpu > 1:
        raise ValueError(f"this process sees {n_gpu} GPUs without a distributed launcher, so "
                         "the Trainer would fall back to nn.DataParallel, which rlhf_ext does "
                         "not support: launch with `accelerate launch --num_processes "
                         f"{n_gpu} ...` (or torchrun), or make one GPU visible "
                         "(CUDA_VISIBLE_DEVICES=0)")


def device_precision(use_cpu: bool, fp16: bool, cuda: bool, bf16_supported: bool,
                     capability: tuple[int, int] | None) -> tuple[bool, bool | None]:
    """The defaults of ``bf16`` and ``tf32`` when left at None: bf16 on a CUDA device that
    supports it (unless fp16 or use_cpu), off on a CPU (where bf16 is far slower without
    AVX512-BF16, and results would differ between CPUs); TF32 matmuls on Ampere and newer
    GPUs (compute capability >= 8), else left as PyTorch has it (None). -> (bf16, tf32)."""
    on_gpu = cuda and not use_cpu
    bf16 = on_gpu and bf16_supported and not fp16
    tf32 = True if on_gpu and capability is not None and capability[0] >= 8 else None
    return bf16, tf32


@dataclass
class DevicePrecision:
    """Mixed into the package's configs: ``bf16`` and ``tf32`` default to None, resolved by
    ``device_precision`` for the machine the run is on."""

    bf16: bool | None = field(default=None, metadata={
        "help": "bf16 mixed precision; None: on with a CUDA GPU that supports it, off on CPU."})
    tf32: bool | None = field(default=None, metadata={
        "help": "TF32 matmuls; None: on with an Ampere or newer GPU, else PyTorch's setting."})

    def __post_init__(self):
        import torch

        cuda = torch.cuda.is_available()
        bf16, tf32 = device_precision(
            self.use_cpu, self.fp16, cuda, cuda and torch.cuda.is_bf16_supported(),
            torch.cuda.get_device_capability() if cuda else None)
        if self.bf16 is None:
            self.bf16 = bf16
        if self.tf32 is None:
            self.tf32 = tf32
        super().__post_init__()


def nearest_existing(path: str) -> str:
    """``path`` made absolute, or its nearest parent that exists."""
    import os

    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return folder


def probe_write(folder) -> None:
    """Create and remove a file in ``folder``: raises the OSError a real write would."""
    import tempfile

    with tempfile.NamedTemporaryFile(dir=folder, prefix=".rlhf_ext-probe"):
        pass


def check_output_dir(path: str) -> None:
    """``output_dir`` must be a folder this process can write, or not exist yet under one
    it can: found now, not at the first save after loading and tokenizing (a file there
    gave a bare FileExistsError; an unwritable folder failed at the first checkpoint)."""
    import os

    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"output_dir {path} is a file, not a folder: choose another "
                         "output_dir (or move the file)")
    folder = nearest_existing(path)  # nothing is created here: probe the nearest parent
    try:
        probe_write(folder)
    except OSError as error:
        raise ValueError(f"output_dir {path} cannot be written ({folder}: {error}): choose "
                         "a folder you can write, or fix its permissions") from None


def keep_token_out_of_args(args) -> None:
    """Move a ``hub_token`` given as an argument into the process environment (HF_TOKEN,
    where huggingface_hub reads it): arguments are pickled into training_args.bin, which
    checkpoints and pushes carry, and a token must never be written anywhere."""
    import os

    if getattr(args, "hub_token", None):
        os.environ["HF_TOKEN"] = args.hub_token
        args.hub_token = None


# ---------------------------------------------------------------------------------------
# Checkpoints: resume from the newest one that was written completely
# ---------------------------------------------------------------------------------------

_FALSE = {"", "false", "no", "none", "0"}
_LAST = {"true", "yes", "last", "1"}


def checkpoint_problem(folder: str) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or None when it is. The Trainer writes
    trainer_state.json last, so a save cut short lacks it; every JSON must parse, every
    safetensors header must match its file's size, and every torch file (a zip) must
    have its directory, which sits at the end of the file."""
    import json
    import os
    import zipfile

    from safetensors import safe_open

    if not os.path.isfile(os.path.join(folder, "trainer_state.json")):
        return "no trainer_state.json (the save was cut short)"
    weights = False
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            try:
                if name.endswith(".json"):
                    with open(path) as f:
                        json.load(f)
                elif name.endswith(".safetensors"):
                    weights = True
                    with safe_open(path, "pt"):
                        pass
                elif name.endswith((".pt", ".pth", ".bin")):
                    weights = weights or name.startswith("pytorch_model")
                    with zipfile.ZipFile(path):
                        pass
            except Exception as e:  # noqa: BLE001 - any unreadable file makes it incomplete
                return f"{os.path.relpath(path, folder)} is unreadable ({type(e).__name__})"
        weights = weights or any(d.startswith("global_step") for d in os.listdir(root))
    return None if weights else "no model weights"


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint-<step> folder of ``output_dir`` that ``checkpoint_problem``
    accepts; newer incomplete ones are named in a warning and skipped."""
    import os
    import re
    import warnings

    if not os.path.isdir(output_dir):
        return None
    steps = sorted(((int(m.group(1)), name) for name in os.listdir(output_dir)
                    if (m := re.fullmatch(r"checkpoint-(\d+)", name))
                    and os.path.isdir(os.path.join(output_dir, name))), reverse=True)
    for _, name in steps:
        folder = os.path.join(output_dir, name)
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        warnings.warn(f"skipping incomplete checkpoint {folder}: {problem}", stacklevel=2)
    return None


def resolve_checkpoint(value, output_dir: str) -> str | None:
    """``resume_from_checkpoint`` as recipes and ``train()`` take it -> a folder or None.
    True (or "true"/"last" from a command line) is the newest complete checkpoint in
    ``output_dir``, or a fresh start when there is none; a path must be complete."""
    import logging

    if value is None or value is False or (isinstance(value, str) and value.lower() in _FALSE):
        return None
    if value is True or (isinstance(value, str) and value.lower() in _LAST):
        folder = last_complete_checkpoint(output_dir)
        if folder is None:
            logging.getLogger(__name__).warning(
                "resume_from_checkpoint: no complete checkpoint in %s; starting from the "
                "beginning", output_dir)
        return folder
    problem = checkpoint_problem(str(value))
    if problem is not None:
        raise ValueError(f"resume_from_checkpoint={value!r} is not a complete checkpoint: "
                         f"{problem}. Pass true to resume from the newest complete one.")
    return str(value)


class SaveError(OSError):
    """A save that could not be written, naming the folder and the space left there."""


@contextlib.contextmanager
def naming_failed_writes(folder: str):
    """Around a save: an OSError or a torch or safetensors write failure (a full disk gives
    'enforce fail at inline_container.cc ... unexpected pos', which names nothing) becomes a
    SaveError that names the folder, the cause and the space left there. A checkpoint cut
    short this way lacks trainer_state.json, so resuming skips it."""
    import shutil

    from safetensors import SafetensorError

    try:
        yield
    except SaveError:
        raise
    except (OSError, RuntimeError, SafetensorError) as error:
        free = shutil.disk_usage(nearest_existing(folder)).free / 2**20
        raise SaveError(f"saving to {folder} failed: {type(error).__name__}: "
                        f"{str(error).strip()[:300]}. Free space there: {free:.0f} MiB. Free some "
                        "space (or lower save_total_limit) and resume: the cut checkpoint is "
                        "skipped") from error


def usual_permissions(folder: str) -> None:
    """Files a save wrote with owner-only permissions (transformers writes weights through a
    temporary file: 0600) get the permissions the user's umask gives any new file. The
    checkpoint folders inside an output_dir were fixed when they were saved."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith("checkpoint-")]
        for name in files:
            path = os.path.join(root, name)
            if os.stat(path).st_mode & 0o777 == 0o600:
                os.chmod(path, 0o666 & ~mask)


class CheckedTraining:
    """Mixed into every trainer of the package: ``train(resume_from_checkpoint=True)``
    resumes from the newest complete checkpoint; SIGTERM saves a checkpoint at the end of
    the step and exits with status 143 (``rlhf_ext.preemption``); a non-finite gradient
    norm stops training before the optimizer step; a non-finite model is never saved."""

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        from .preemption import StopOnSigterm, raise_if_preempted, sigterm_stops
        from .run_record import check_resume, run_record

        folder = resolve_checkpoint(resume_from_checkpoint, self.args.output_dir)
        self._run_record = run_record(self)
        if folder is not None:
            check_resume(self, folder)
        stop = StopOnSigterm(self)
        self.add_callback(stop)
        try:
            with sigterm_stops(stop):
                result = super().train(resume_from_checkpoint=folder, trial=trial, **kwargs)
        finally:
            self.remove_callback(stop)
        raise_if_preempted(stop, self.args.output_dir)
        return result

    def _prepare_input(self, data):
        """A batch's tensors to the device in their own dtype. Under DeepSpeed the Trainer
        casts every floating tensor of a batch to the engine's dtype (made for models whose
        inputs are floats); this package's floating columns are data: precomputed reference
        log-probs, soft labels, advantages. In bf16 they lost their precision: a precomputed
        DPO reference log-prob of -68.93 arrived as -69.0 under ZeRO-2 + bf16."""
        import torch

        if isinstance(data, torch.Tensor):
            return data.to(self.args.device)
        return super()._prepare_input(data)

    def create_accelerator_and_postprocess(self):
        """The Trainer's accelerator, sharding with FSDP on CPU processes too
        (``sharding.shard_on_cpu``: accelerate would replicate the model with DDP)."""
        from .sharding import shard_on_cpu

        super().create_accelerator_and_postprocess()
        if shard_on_cpu(self.accelerator):
            self.is_fsdp_enabled = True

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, refused before any step where ZeRO-Offload would swap
        it for another (``sharding.offload_optimizer_refusal``)."""
        from .sharding import offload_optimizer_refusal

        optimizer = super().create_optimizer(model)
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        why = offload_optimizer_refusal(plugin.deepspeed_config if plugin else None, optimizer)
        if why is not None:
            raise ValueError(why)
        return optimizer

    def _get_grad_norm(self, model, grad_norm=None):
        import math

        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        # fp16's loss scaler expects overflows and skips those steps itself
        if grad_norm is not None and not self.args.fp16 and not math.isfinite(float(grad_norm)):
            raise NonFiniteError(
                f"step {self.state.global_step + 1}: the gradient norm is {float(grad_norm)} "
                "while the loss was finite. Likely causes: an overflow in low precision or a "
                "learning rate too high; nothing from this step was applied or saved.")
        return grad_norm

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        folder = output_dir or self.args.output_dir
        check_finite_weights(self.model, folder, state_dict)
        with naming_failed_writes(folder):
            super()._save(output_dir, state_dict)
        usual_permissions(folder)

    def _save_checkpoint(self, model, trial) -> None:
        """What the run is trained with goes beside each checkpoint (``run_record``)."""
        import os

        from .run_record import write_record

        folder = os.path.join(self._get_output_dir(trial=trial),
                              f"checkpoint-{self.state.global_step}")
        with naming_failed_writes(folder):  # the weights go through _save (permissions)
            if getattr(self, "_run_record", None) is not None:
                write_record(self, folder)
            super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        """After loading a checkpoint's schedule, set each learning rate to the schedule's
        value at the current step. The saved rates are those the old schedule gave: a
        finished 4-step run resumed with max_steps=8 would run step 5 at its final rate 0
        and then jump; now step 5 runs at what an 8-step schedule gives there (a resumed
        run of unchanged length is unaffected: the values are the same)."""
        super()._load_optimizer_and_scheduler(checkpoint)
        scheduler = getattr(self, "lr_scheduler", None)
        if checkpoint is None or not hasattr(scheduler, "lr_lambdas"):
            return
        step = scheduler.last_epoch
        rates = [base * rate(step) for rate, base in zip(scheduler.lr_lambdas,
                                                         scheduler.base_lrs)]
        for group, rate in zip(scheduler.optimizer.param_groups, rates):
            group["lr"] = rate
        scheduler._last_lr = rates
