"""The preference trainer's metrics under TRL's names, averaged over the steps between two
logs and over processes: a mixin that owns ``self._metrics`` (a ``MetricBuffer``: held on
the device, reduced once per log) and ``self._train_tokens``, and adds them to the
Trainer's logs."""

from __future__ import annotations

import torch

from . import losses as L
from .metric_buffer import MetricBuffer


class PreferenceMetrics:
    """Mixed into PreferenceTrainer before ``transformers.Trainer`` (``log`` calls on)."""

    def _init_metrics(self) -> None:
        self._metrics = MetricBuffer()
        self._train_tokens = 0

    def _record_token_stats(self, mode: str, stats: dict, counts, b: int | None) -> None:
        """TRL's per-token metrics: entropy over every completion token; for pairs the
        mean logit of chosen and of rejected tokens, and mean_token_accuracy (how often
        the chosen token is the model's argmax)."""
        m = self._metrics
        m.ratio(mode, "entropy", stats["entropy"], counts)
        if b is not None:
            m.ratio(mode, "logits/chosen", stats["mean_logit"][:b], counts[:b])
            m.ratio(mode, "logits/rejected", stats["mean_logit"][b:], counts[b:])
            m.ratio(mode, "mean_token_accuracy", stats["top1"][:b], counts[:b])

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
        self._metrics.total(mode, "num_tokens", n)

    def _record(self, mode: str, batch, out: L.LossOutput) -> None:
        spec, m = self.loss_specs[0], self._metrics
        if isinstance(batch, L.PairedLogps):
            chosen, rejected = batch.chosen, batch.rejected
            if spec.logps == "mean":
                chosen = chosen / batch.chosen_tokens.clamp(min=1)
                rejected = rejected / batch.rejected_tokens.clamp(min=1)
            m.mean(mode, "rewards/accuracies",
                   (out.chosen_rewards > out.rejected_rewards).float())
            m.mean(mode, "rewards/margins", out.chosen_rewards - out.rejected_rewards)
        else:  # unpaired: TRL's margin is the step's mean chosen minus mean rejected reward
            labels = batch.labels.bool()
            chosen, rejected = batch.logps[labels], batch.logps[~labels]
            m.difference(mode, "rewards/margins", out.chosen_rewards.detach(),
                         out.rejected_rewards.detach())
        m.mean(mode, "rewards/chosen", out.chosen_rewards)
        m.mean(mode, "rewards/rejected", out.rejected_rewards)
        m.mean(mode, "logps/chosen", chosen)
        m.mean(mode, "logps/rejected", rejected)
        for key, value in out.metrics.items():
            m.mean(mode, key, value)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        mode = self._metrics.log_into(logs, self.accelerator.gather)
        if mode == "train" and "num_tokens" in logs:  # this log's count: add it to the total
            self._train_tokens += int(logs["num_tokens"])
            logs["num_tokens"] = float(self._train_tokens)
        super().log(logs, start_time)
