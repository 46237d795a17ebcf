"""RewardConfig / RewardTrainer (Bradley-Terry reward modelling) and batched scoring.

Loss (TRL RewardTrainer's): -log sigma(r_chosen - r_rejected - margin), with the optional
``margin`` column, plus ``center_rewards_coefficient * mean((r_chosen + r_rejected)^2)``
(Eisenstein et al. 2023). Data goes through the same validation and tokenization as the
preference trainer; chosen and rejected share one forward pass.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
)

from .config_fields import (
    TRAINING_COLUMNS,
    DataFields,
    activation_offloading,
    apply_tokenizer_fields,
    model_init,
    pad_multiple,
)
from .data import (
    SOFT_LABEL,
    DataError,
    PreferenceCollator,
    check_fits_model,
    check_soft_labels,
    column_names,
    prepare_preference_dataset,
    rows_to_check,
    validate_preference_dataset,
)
from .heads import RewardModel, RewardModelConfig, check_scalar_head, scalar_rewards
from .hub import trainer_model_card
from .metric_buffer import MetricBuffer
from .models import (
    add_adapters,
    disable_dropout,
    is_peft_model,
    keep_4bit_differentiable,
    load_tokenizer,
    quiet_transformers,
)
from .run_record import ResumeFields
from .trainer_utils import (
    CheckedTraining,
    DevicePrecision,
    check_finite_fields,
    check_finite_loss,
    start_run,
)


@dataclass
class RewardConfig(DevicePrecision, ResumeFields, DataFields, TrainingArguments):
    """TrainingArguments plus TRL RewardConfig's fields, with its defaults (learning rate
    1e-4, a log every 10 steps, gradient checkpointing; bf16 off on a CPU, see docs/trl.md)."""

    learning_rate: float = field(default=1e-4, metadata={
        "help": "Initial AdamW learning rate (TRL RewardConfig's default, 1e-4)."})
    logging_steps: float = field(default=10, metadata={
        "help": "Log every X steps (an integer), or every X of the run (a float below 1)."})
    max_length: int | None = field(default=1024, metadata={
        "help": "Maximum prompt + completion tokens; longer sequences are truncated."})
    center_rewards_coefficient: float | None = field(default=None, metadata={
        "help": "Weight of mean((r_chosen + r_rejected)^2), which centres rewards on 0."})
    disable_dropout: bool = True
    model_init_kwargs: dict | None = None
    prefix_sharing: bool | None = field(default=None, metadata={
        "help": "One row per pair, [prompt | chosen | rejected], so the prompt goes through "
                "the model once; the completions are kept apart in attention (our "
                "RewardModel with sdpa or eager attention). None (the default): on where "
                "that holds."})
    padding_free: bool | None = field(default=None, metadata={
        "help": "With prefix_sharing: all the pairs of a batch in one row without padding, "
                "each attending on its own (sdpa). None (the default): on where prefix "
                "sharing is and the attention is sdpa."})
    gradient_checkpointing: bool = field(default=True, metadata={
        "help": "Recompute each layer's activations in backward instead of keeping them "
                "(TRL's default too)."})

    def __post_init__(self):
        check_finite_fields(self, ("center_rewards_coefficient", "learning_rate"))
        self.pad_to_multiple_of = pad_multiple(self.pad_to_multiple_of)
        if self.dataset_num_proc is not None and self.dataset_num_proc < 1:
            raise ValueError(f"dataset_num_proc must be a positive integer, got "
                             f"{self.dataset_num_proc!r}")
        super().__post_init__()


def adapter_config(name_or_path: str) -> dict | None:
    """The ``adapter_config.json`` of a saved LoRA adapter directory; None for a full model."""
    import json

    path = os.path.join(name_or_path, "adapter_config.json")
    if not os.path.exists(path) or os.path.exists(os.path.join(name_or_path, "config.json")):
        return None
    with open(path) as f:
        return json.load(f)


def adapter_base(name_or_path: str) -> str | None:
    """The base model of a saved LoRA adapter directory; None for a full model."""
    config = adapter_config(name_or_path)
    return None if config is None else config["base_model_name_or_path"]


def is_native_classifier(model) -> bool:
    """Whether plain transformers loads this reward model (or its adapter's base) as a
    sequence classifier with one label: a scalar RewardModel on a generic backbone, or
    a transformers classifier itself."""
    if isinstance(model, RewardModel):
        return model.native_config() is not None
    return type(model).__name__.endswith("ForSequenceClassification")


def prefix_sharing_refusal(model) -> str | None:
    """Why prefix_sharing cannot run on this model, or None: it pools two completions of
    one row, which our RewardModel does, with an attention that keeps them apart."""
    from .shared_prefix import attention_refusal

    base = model.get_base_model() if is_peft_model(model) else model
    if not isinstance(base, RewardModel):
        return (f"prefix_sharing needs rlhf_ext's RewardModel, which pools each completion "
                f"of a shared row; {type(base).__name__} pools one token per row: pass the "
                "model as a path, or turn prefix_sharing off")
    return attention_refusal(backbone_attention(base))


def backbone_attention(model) -> str | None:
    """The attention implementation of a reward model's backbone (through adapters)."""
    from .logps import attention_implementation

    base = model.get_base_model() if is_peft_model(model) else model
    return attention_implementation(getattr(base, "model", base))


def load_reward_model(name_or_path: str, new_head: bool = False, **kwargs):
    """A saved reward model: a transformers ``*ForSequenceClassification`` with one label
    (what a scalar RewardModel saves, and TRL's kind), a multi-objective RewardModel, or a
    LoRA reward adapter on its base. With ``new_head=True`` (to train one), a causal-LM
    checkpoint too, as backbone + fresh head; without, such a checkpoint is an error:
    scoring with an untrained head is scoring with noise."""
    base = adapter_base(name_or_path)
    if base is not None:
        from peft import PeftModel

        mapping = adapter_config(name_or_path).get("auto_mapping") or {}
        if mapping.get("base_model_class") == "RewardModel":  # ours, not a transformers one
            model = RewardModel.from_backbone(base, **kwargs)
        else:  # a scalar RewardModel's on a generic backbone, or TRL's: model.*, score
            with quiet_transformers():  # the score it reports missing is in the adapter
                model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1,
                                                                           **kwargs)
            saved_tokenizer = os.path.exists(os.path.join(name_or_path, "tokenizer_config.json"))
            if model.config.pad_token_id is None and saved_tokenizer:  # it knows the pad
                model.config.pad_token_id = AutoTokenizer.from_pretrained(name_or_path).pad_token_id
        model = PeftModel.from_pretrained(model, name_or_path)
        return keep_4bit_differentiable(model.eval())
    config = AutoConfig.from_pretrained(name_or_path)
    if isinstance(config, RewardModelConfig):
        return keep_4bit_differentiable(RewardModel.from_pretrained(name_or_path, **kwargs))
    if any(a.endswith("ForSequenceClassification") for a in config.architectures or []) \
            and config.num_labels == 1:  # a transformers reward model (TRL's kind)
        return keep_4bit_differentiable(
            AutoModelForSequenceClassification.from_pretrained(name_or_path, **kwargs))
    if not new_head:
        raise ValueError(f"{name_or_path} is a {config.model_type} checkpoint without a trained "
                         "reward head: train a reward model on it first (recipes/reward.py), "
                         "or pass new_head=True to start from a fresh, untrained head")
    return RewardModel.from_backbone(name_or_path, **kwargs)


class RewardTrainer(CheckedTraining, Trainer):
    """Trains a RewardModel on preference pairs; constructor as trl.RewardTrainer's."""

    RESUME_FIELDS = ("center_rewards_coefficient", "max_length")  # rlhf_ext.run_record

    def __init__(self, model, args: RewardConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None,
                 compute_metrics=None, callbacks=None, optimizers=(None, None),
                 peft_config=None):
        args = args or RewardConfig(output_dir="reward-output")
        start_run(args)
        self.base_model_name = model if isinstance(model, str) else model.name_or_path
        if isinstance(model, str):
            model = load_reward_model(model, new_head=True, **model_init(args))
        processing_class = load_tokenizer(processing_class, self.base_model_name)
        pad_id = apply_tokenizer_fields(processing_class, args)
        check_scalar_head(model)
        refusal = prefix_sharing_refusal(model)
        if args.prefix_sharing is None:  # on where it applies
            args.prefix_sharing = refusal is None
        elif args.prefix_sharing and refusal:
            raise ValueError(refusal)
        sdpa = refusal is None and backbone_attention(model) == "sdpa"
        if args.padding_free is None:
            args.padding_free = bool(args.prefix_sharing) and sdpa
        elif args.padding_free and not (args.prefix_sharing and sdpa):
            raise ValueError("padding_free reward training packs prefix-shared pairs and needs "
                             "prefix_sharing and an sdpa attention: set padding_free=False")
        if getattr(model.config, "pad_token_id", None) is None:  # a sequence classifier
            model.config.pad_token_id = pad_id                    # pools the last non-pad

        keep_4bit_differentiable(model)
        if peft_config is not None:
            # TRL's ModelConfig says CAUSAL_LM, whose PeftModel expects a generating LM;
            # a reward model is a plain module with a trained head.
            peft_config = copy.copy(peft_config)  # the caller's config stays as it was
            peft_config.task_type = None
            peft_config.modules_to_save = list({*(peft_config.modules_to_save or []), "score"})
            native = is_native_classifier(model)
            model = add_adapters(model, peft_config, args.gradient_checkpointing, args.seed)
            if native:  # saved as SEQ_CLS (no auto mapping to our class): plain peft's
                model.active_peft_config.task_type = "SEQ_CLS"  # AutoPeftModel... loads it
        if args.disable_dropout:  # after the adapters: LoRA has its own dropout
            disable_dropout(model)
        train_dataset = self._prepare(train_dataset, processing_class, args, "train")
        if isinstance(eval_dataset, dict):  # a DatasetDict too: one eval set per split
            eval_dataset = {k: self._prepare(v, processing_class, args, f"eval {k}")
                            for k, v in eval_dataset.items()}  # each logged under its name
            named = [(f"eval {k}", v) for k, v in eval_dataset.items()]
        else:
            eval_dataset = self._prepare(eval_dataset, processing_class, args, "eval")
            named = [("eval", eval_dataset)]
        for split, data in (("train", train_dataset), *named):
            if data is not None:
                check_fits_model(data, model, args.max_length, split)
        if data_collator is None:
            data_collator = PreferenceCollator(pad_id, args.max_length,
                                               pad_to_multiple_of=args.pad_to_multiple_of,
                                               padding_free=args.padding_free,
                                               prefix_sharing=args.prefix_sharing)
        super().__init__(model=model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, compute_metrics=compute_metrics,
                         callbacks=callbacks, optimizers=optimizers)
        self._metrics = MetricBuffer()

    @staticmethod
    def _prepare(dataset, tokenizer, args, name):
        if dataset is None:
            return None
        kind = validate_preference_dataset(dataset, True, ["reward"], name)
        soft = check_soft_labels(dataset, name)
        if "margin" in column_names(dataset):
            for row, example in rows_to_check(dataset):
                margin = example["margin"]
                if not isinstance(margin, (int, float)) or not math.isfinite(margin):
                    raise DataError(f"{name} dataset, row {row}, column 'margin': {margin!r} is "
                                    "not a finite number. Fix or drop the row.")
        return prepare_preference_dataset(dataset, tokenizer, kind=kind, unpair=False,
                                          max_length=args.max_length, name=name,
                                          keep=("margin", SOFT_LABEL) if soft else ("margin",),
                                          num_proc=args.dataset_num_proc)

    def _set_signature_columns_if_needed(self):
        """remove_unused_columns (TRL's default True) keeps the tokenized columns."""
        self._signature_columns = TRAINING_COLUMNS

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        with activation_offloading(model, self.args):
            if "segment_ids" in inputs:  # prefix sharing: one row per pair, or one in all
                out = model(input_ids=inputs["input_ids"], segment_ids=inputs["segment_ids"],
                            position_ids=inputs["position_ids"],
                            sequence_ids=inputs.get("sequence_ids"))
            else:
                out = model(input_ids=inputs["input_ids"],
                            attention_mask=inputs["attention_mask"])
        rewards = scalar_rewards(out)
        chosen, rejected = rewards.chunk(2)
        loss = reward_loss(chosen, rejected, inputs.get("margin"),
                           self.args.center_rewards_coefficient, inputs.get(SOFT_LABEL))
        if mode == "train":
            check_finite_loss(self, loss, "a NaN or infinite 'margin' in the data")
        rewards, diff = rewards.detach(), (chosen - rejected).detach()
        if mode == "eval":  # evaluation's last batch may repeat rows: drop them here
            rewards, diff = (self.accelerator.gather_for_metrics(x) for x in (rewards, diff))
        m = self._metrics
        m.extreme(mode, "min_reward", "min", rewards)
        m.mean(mode, "mean_reward", rewards)
        m.extreme(mode, "max_reward", "max", rewards)
        m.mean(mode, "accuracy", (diff > 0).float())
        m.mean(mode, "margin", diff)
        return (loss, out) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, out = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        # as TRL's: the predictions are (r_chosen, r_rejected), every label 0 (chosen wins),
        # so compute_metrics can read accuracy as argmax == label
        chosen, rejected = scalar_rewards(out).chunk(2)
        return loss.detach(), torch.stack([chosen, rejected], -1), torch.zeros_like(chosen).long()

    def log(self, logs: dict, start_time: float | None = None) -> None:
        # evaluation's values are every process's already (compute_loss)
        self._metrics.log_into(logs, self.accelerator.gather, eval_gather=lambda x: x)
        super().log(logs, start_time)

    def _base(self):
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if is_peft_model(model) else model

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, **kwargs):
        args = self.args
        trainer_model_card(
            self, method="reward-model", model_name=model_name, dataset_name=dataset_name,
            tags=tags, summary=f"A Bradley-Terry reward model on `{self.base_model_name}`.",
            hyperparameters={"learning_rate": args.learning_rate, "max_length": args.max_length,
                             "num_train_epochs": args.num_train_epochs,
                             "center_rewards_coefficient": args.center_rewards_coefficient,
                             "per_device_train_batch_size": args.per_device_train_batch_size},
            kind="sequence-classifier" if is_native_classifier(self._base()) else "reward-model",
            papers=["reward-model"])


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                center_coefficient: float | None = None,
                soft_labels: torch.Tensor | None = None) -> torch.Tensor:
    """-mean log sigma(r_w - r_l - margin) [+ c * mean((r_w + r_l)^2)]. Shapes [B] -> scalar.

    With soft labels p = P(chosen preferred) [B], the Bradley-Terry cross-entropy against
    them: -p log sigma(r_w - r_l - margin) - (1 - p) log sigma(r_l - r_w - margin), the
    expected loss when each pair's order is drawn from its label."""
    m = margin if margin is not None else 0.0
    losses = -F.logsigmoid(chosen - rejected - m)
    if soft_labels is not None:
        p = soft_labels.to(losses.dtype)
        losses = p * losses - (1 - p) * F.logsigmoid(rejected - chosen - m)
    loss = losses.mean()
    if center_coefficient:
        loss = loss + center_coefficient * ((chosen + rejected) ** 2).mean()
    return loss


@torch.no_grad()
def tokenizer_mismatch(reward_model, tokenizer) -> str | None:
    """Why ``tokenizer`` cannot feed ``reward_model``, or None: ids beyond its embeddings,
    or a tokenizer saved beside the reward model (or its base) whose vocabulary differs
    (same size, other tokens: every text would be scored as the wrong ids)."""
    from transformers import AutoTokenizer

    if not hasattr(reward_model, "get_input_embeddings"):
        return None  # single-base: a head over the policy's own decoder, its own tokens
    rows = reward_model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        return (f"the tokenizer has {len(tokenizer)} tokens and the reward model's embeddings "
                f"{rows} rows")
    folder = (getattr(reward_model, "name_or_path", "")
              or getattr(getattr(reward_model, "config", None), "_name_or_path", "") or "")
    if os.path.isdir(folder) and any(os.path.exists(os.path.join(folder, name)) for name in
                                     ("tokenizer.json", "tokenizer_config.json")):
        own = AutoTokenizer.from_pretrained(folder)
        if own.get_vocab() != tokenizer.get_vocab():
            return f"the reward model was saved with another tokenizer ({folder})"
    return None


def score(model, tokenizer, prompts: list[str], completions: list[str], batch_size: int = 64,
          max_length: int | None = None) -> list[float]:
    """Rewards of (prompt, completion) pairs, batched; tokenized exactly as in training
    (prompt + completion + eos). Conversational rows (lists of messages) work too."""
    from .data import tokenize_preference_row

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    collate = PreferenceCollator(tokenizer.pad_token_id, max_length)
    rewards: list[float] = []
    for start in range(0, len(prompts), batch_size):
        rows = [tokenize_preference_row({"prompt": p, "completion": c}, tokenizer, ("completion",))
                for p, c in zip(prompts[start:start + batch_size],
                                completions[start:start + batch_size])]
        batch = collate.sequences([r["prompt_ids"] for r in rows],
                                   [r["completion_ids"] for r in rows])
        out = model(input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device))
        rewards.extend(scalar_rewards(out).float().tolist())
    model.train(was_training)
    return rewards
