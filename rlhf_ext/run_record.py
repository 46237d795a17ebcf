"""What a checkpoint was trained with, written beside it (``rlhf_ext_run.json``), so that a
resume with something else is refused, saying what differs, instead of going on silently:
the model (its name and shape: the policy comes from the checkpoint, but a reference or a
value model would come from the new one), the tokenizer and its chat template, the
trainer's loss settings (each trainer's ``RESUME_FIELDS``), and the training data.

``resume_allow_changes=True`` resumes anyway (a warning lists the differences). A
checkpoint without its optimizer state (``save_only_model``) is refused the same way: its
Adam moments and schedule would silently start over.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

RECORD = "rlhf_ext_run.json"
SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                "num_attention_heads", "intermediate_size")


@dataclass
class ResumeFields:
    """Mixed into every config of the package."""

    resume_allow_changes: bool = field(default=False, metadata={
        "help": "Resume a checkpoint even when the model, tokenizer, loss settings or data "
                "differ from what it was trained with, or its optimizer state is missing "
                "(a warning lists what differs)."})


def _sha(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_identity(model) -> dict:
    """The model's name (a folder as an absolute path) and the fields that fix its shape."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    name = getattr(base, "name_or_path", "") or getattr(config, "_name_or_path", "") or ""
    if name and os.path.isdir(name):
        name = os.path.abspath(name)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    shape = {k: getattr(text, k, None) for k in SHAPE_FIELDS}
    shape["architectures"] = getattr(config, "architectures", None)
    return {"name": name, **shape}


def tokenizer_identity(tokenizer) -> str | None:
    """A hash of the vocabulary, the special tokens and the chat template."""
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        return None
    return _sha([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens,
                 getattr(tokenizer, "chat_template", None)])


def data_identity(dataset) -> str | None:
    """A hash of the dataset's size, columns and 256 rows spread over it (cheap on any
    size; a changed row elsewhere can slip through, another dataset does not). Precomputed
    reference columns (``ref_*``) are left out: they are derived, not data."""
    if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "select"):
        return None
    n = len(dataset)
    rows = sorted({round(i * (n - 1) / 255) for i in range(256)}) if n else []
    columns = sorted(c for c in dataset.column_names if not c.startswith("ref_"))
    return _sha([n, columns, dataset.select(rows).select_columns(columns).to_list()])


def run_record(trainer) -> dict:
    model = getattr(trainer, "policy", None)  # PPO: the policy inside the policy+value module
    if model is None:
        model = trainer.accelerator.unwrap_model(trainer.model)
    args = trainer.args
    return {"model": model_identity(model),
            "tokenizer": tokenizer_identity(trainer.processing_class),
            "settings": {name: getattr(args, name, None)
                         for name in getattr(trainer, "RESUME_FIELDS", ())},
            "data": data_identity(trainer.train_dataset)}


def differences(saved: dict, now: dict) -> list[str]:
    """Each difference as 'what: then -> now'."""
    out = []
    for part in ("model", "settings"):
        for key in sorted(set(saved.get(part, {})) | set(now.get(part, {}))):
            old, new = saved.get(part, {}).get(key), now.get(part, {}).get(key)
            if json.dumps(old, default=str) != json.dumps(new, default=str):
                out.append(f"{part} {key}: {old!r} -> {new!r}")
    for part, what in (("tokenizer", "tokenizer or chat template"), ("data", "training data")):
        if saved.get(part) != now.get(part):
            out.append(f"{what}: another one (hash {saved.get(part)} -> {now.get(part)})")
    return out


def write_record(trainer, folder: str) -> None:
    """Beside a checkpoint, before the Trainer's files (its trainer_state.json, written last,
    marks the checkpoint complete)."""
    if trainer.is_world_process_zero():
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, RECORD), "w") as f:
            json.dump(trainer._run_record, f, indent=1, default=str)


def has_optimizer_state(folder: str) -> bool:
    """Whether a checkpoint folder holds the optimizer's state in one of the forms the
    Trainer loads: ``optimizer.pt`` (one process, DDP), ``optimizer.bin`` (FSDP, full
    state dict), an ``optimizer*`` folder (FSDP, sharded state dict) or DeepSpeed's
    ``global_step*`` folder."""
    for name in os.listdir(folder):
        if name in ("optimizer.pt", "optimizer.bin") or (
                os.path.isdir(os.path.join(folder, name))
                and name.startswith(("optimizer", "global_step"))):
            return True
    return False


def check_resume(trainer, folder: str) -> None:
    """Refuse (or, with resume_allow_changes, warn about) a resume from ``folder`` with
    other things than it was trained with, or without its optimizer state."""
    import warnings

    problems = []
    path = os.path.join(folder, RECORD)
    if os.path.exists(path):
        with open(path) as f:
            problems = differences(json.load(f), trainer._run_record)
    if not has_optimizer_state(folder):
        problems.append("optimizer state: missing (saved with save_only_model?), so the Adam "
                        "moments and the learning-rate schedule would start over")
    if not problems:
        return
    listed = "; ".join(problems)
    if trainer.args.resume_allow_changes:
        warnings.warn(f"resuming {folder} although it differs: {listed}", stacklevel=3)
        return
    raise ValueError(f"resuming {folder}, which was trained otherwise: {listed}. Resume with "
                     "what it was trained with, start in a new output_dir, or set "
                     "resume_allow_changes=True to go on anyway.")
