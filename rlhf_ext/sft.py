"""SFT: TRL's SFTTrainer with the package's guards (trainer_utils.CheckedTraining, the
finite-loss check) and rlhf_ext's model card (method, hyperparameters, final metrics,
tags), so every recipe pushes the same kind of card."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig as _TRLSFTConfig
from trl import SFTTrainer as _TRLSFTTrainer

from .hub import trainer_model_card
from .models import disable_dropout
from .run_record import ResumeFields
from .trainer_utils import CheckedTraining, check_finite_loss, start_run


@dataclass
class SFTConfig(ResumeFields, _TRLSFTConfig):
    """``trl.SFTConfig`` plus ``disable_dropout`` (on by default, as in every trainer of
    the package; TRL's SFT keeps dropout)."""

    disable_dropout: bool = field(default=True, metadata={
        "help": "Turn off dropout in the model (LoRA's and attention's too)."})


class SFTTrainer(CheckedTraining, _TRLSFTTrainer):
    """``trl.SFTTrainer``, with the package's guards (a non-finite loss or gradient stops
    training, nothing non-finite is saved, resume picks the newest complete checkpoint)
    and its model card."""

    _tag_names = ["rlhf-ext", "sft"]
    RESUME_FIELDS = ("max_length",)  # rlhf_ext.run_record

    def __init__(self, model, *args, **kwargs):
        if args or kwargs.get("args") is not None:
            start_run(args[0] if args else kwargs["args"])
        self.base_model_name = model if isinstance(model, str) else \
            getattr(model.config, "_name_or_path", None)
        super().__init__(model, *args, **kwargs)
        if getattr(self.args, "disable_dropout", True):  # after TRL added any adapters
            disable_dropout(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            check_finite_loss(self, out[0] if return_outputs else out,
                              "non-finite weights or inputs")
        return out

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, **kwargs):
        args = self.args
        trainer_model_card(
            self, method="sft", model_name=model_name, dataset_name=dataset_name, tags=tags,
            summary=f"Supervised fine-tuning of `{self.base_model_name}`.",
            hyperparameters={"learning_rate": args.learning_rate, "max_length": args.max_length,
                             "num_train_epochs": args.num_train_epochs,
                             "max_steps": args.max_steps,
                             "per_device_train_batch_size": args.per_device_train_batch_size,
                             "gradient_accumulation_steps": args.gradient_accumulation_steps,
                             "completion_only_loss": args.completion_only_loss,
                             "packing": args.packing, "seed": args.seed})
