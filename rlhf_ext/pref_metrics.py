"""The preference trainer's metrics under TRL's names, averaged over the steps between two
logs and over processes: a mixin that owns ``self._metrics`` ({"train"|"eval": key ->
values}) and ``self._train_tokens``, and adds them to the Trainer's logs."""

from __future__ import annotations

from collections import defaultdict

import torch

from . import losses as L
from .trainer_utils import add_averaged_metrics


class PreferenceMetrics:
    """Mixed into PreferenceTrainer before ``transformers.Trainer`` (``log`` calls on)."""

    def _init_metrics(self) -> None:
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._train_tokens = 0

    def _ratio(self, mode: str, key: str, total: torch.Tensor, count: torch.Tensor) -> None:
        """Log sum(total) / sum(count) over the batch and every process."""
        both = self.accelerator.gather(torch.stack([total.detach().float().sum(),
                                                    count.detach().float().sum()])[None])
        if both[:, 1].sum() > 0:
            self._metrics[mode][key].append((both[:, 0].sum() / both[:, 1].sum()).item())

    def _record_token_stats(self, mode: str, stats: dict, counts, b: int | None) -> None:
        """TRL's per-token metrics: entropy over every completion token; for pairs the
        mean logit of chosen and of rejected tokens, and mean_token_accuracy (how often
        the chosen token is the model's argmax)."""
        self._ratio(mode, "entropy", stats["entropy"], counts)
        if b is not None:
            self._ratio(mode, "logits/chosen", stats["mean_logit"][:b], counts[:b])
            self._ratio(mode, "logits/rejected", stats["mean_logit"][b:], counts[b:])
            self._ratio(mode, "mean_token_accuracy", stats["top1"][:b], counts[:b])

    def _count_tokens(self, mode: str, inputs: dict) -> None:
        """TRL's num_tokens: input tokens trained on so far, every process together
        (padding excluded; a prompt shared by a pair counts for both sequences, as in
        separate rows, so the count does not depend on the layout)."""
        if mode != "train":
            return
        if "attention_mask" in inputs:
            n = inputs["attention_mask"].sum()
        elif "segment_ids" in inputs:
            n = (inputs["segment_ids"] >= 0).sum() + (inputs["segment_ids"] == 0).sum()
        else:
            n = torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device)
        self._train_tokens += int(self.accelerator.gather(n.reshape(1)).sum())
        self._metrics[mode]["num_tokens"] = [float(self._train_tokens)]

    def _mean(self, mode: str, key: str, values: torch.Tensor) -> None:
        values = values.detach().float().reshape(-1)
        total = self.accelerator.gather(values.sum().reshape(1)).sum()
        count = self.accelerator.gather(torch.tensor([values.numel()], device=values.device,
                                                     dtype=torch.float32)).sum()
        if count > 0:
            self._metrics[mode][key].append((total / count).item())

    def _record(self, mode: str, batch, out: L.LossOutput) -> None:
        spec = self.loss_specs[0]
        if isinstance(batch, L.PairedLogps):
            chosen, rejected = batch.chosen, batch.rejected
            if spec.logps == "mean":
                chosen = chosen / batch.chosen_tokens.clamp(min=1)
                rejected = rejected / batch.rejected_tokens.clamp(min=1)
            self._mean(mode, "rewards/accuracies",
                       (out.chosen_rewards > out.rejected_rewards).float())
            self._mean(mode, "rewards/margins", out.chosen_rewards - out.rejected_rewards)
        else:
            labels = batch.labels.bool()
            chosen, rejected = batch.logps[labels], batch.logps[~labels]
        self._mean(mode, "rewards/chosen", out.chosen_rewards)
        self._mean(mode, "rewards/rejected", out.rejected_rewards)
        self._mean(mode, "logps/chosen", chosen)
        self._mean(mode, "logps/rejected", rejected)
        if not isinstance(batch, L.PairedLogps) and self._metrics[mode]["rewards/rejected"] \
                and self._metrics[mode]["rewards/chosen"]:
            self._metrics[mode]["rewards/margins"].append(
                self._metrics[mode]["rewards/chosen"][-1]
                - self._metrics[mode]["rewards/rejected"][-1])
        for key, value in out.metrics.items():
            self._mean(mode, key, value)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        add_averaged_metrics(self._metrics, logs)
        super().log(logs, start_time)
