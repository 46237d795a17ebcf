"""PPO's rollouts on vLLM (``use_vllm``): the engine started by the first rollout, given
the policy's weights after each optimizer step, shut down with the training, and the
importance-sampling correction of the update for the gap between vLLM's kernels and the
trainer's (``sampler_correction``)."""

from __future__ import annotations

import time

import torch

from .sampler_correction import sampler_gaps, sampler_weights


class VLLMRollouts:
    """The PPOTrainer's vLLM parts (a mixin: it reads the trainer's ``args``, ``policy``,
    ``engine``, ``_synced_step``, ``_metrics``, ``state`` and ``accelerator``)."""

    def _sync_engine(self) -> None:
        """With ``use_vllm``: start vLLM from the policy's current weights (first rollout
        of a ``train`` call), or give it the weights when an optimizer step changed them
        since the last sync."""
        if not self.args.use_vllm:
            return
        start = time.perf_counter()
        if self.engine is None:  # a server is sent the weights (main process)
            from ..vllm_server import make_engine

            self.engine = make_engine(self.policy, self.processing_class, self.args,
                                      self._longest_prompt + self.args.response_length,
                                      self.args.rollout_batch_size)
            name = "timing/vllm_start"
        elif self._synced_step != self.state.global_step:
            self.engine.sync(self.policy)
            name = "timing/sync"
        else:
            return
        if self.args.world_size > 1:  # the server has the weights before anyone samples
            self.accelerator.wait_for_everyone()
        self._synced_step = self.state.global_step
        self._metrics.host("train", name, time.perf_counter() - start)

    def train(self, *args, **kwargs):
        """The Trainer's loop; a vLLM engine it started is shut down at the end (its
        process group and memory released)."""
        try:
            return super().train(*args, **kwargs)
        finally:
            if self.engine is not None:
                self.engine.close()
                self.engine = None

    def _sampler_weights(self, old_logps: torch.Tensor, inputs) -> torch.Tensor:
        """The importance-sampling correction's weights [B, C] (``sampler_correction``):
        the old log-probs against vLLM's, with TRL's sampling/* metrics."""
        args, mask = self.args, inputs["response_mask"]
        mode = args.vllm_importance_sampling_mode
        weights = sampler_weights(old_logps, inputs["sampler_logps"], mask, mode,
                                  args.vllm_importance_sampling_clip_min,
                                  args.vllm_importance_sampling_clip_max)
        gaps, ratios = sampler_gaps(old_logps, inputs["sampler_logps"], weights, mask, mode)
        gap, ratio = "sampling/sampling_logp_difference", "sampling/importance_sampling_ratio"
        if gaps.numel():
            self._metrics.mean("train", f"{gap}/mean", gaps)
            self._metrics.extreme("train", f"{gap}/max", "max", gaps)
        if ratios.numel():
            self._metrics.extreme("train", f"{ratio}/min", "min", ratios)
            self._metrics.mean("train", f"{ratio}/mean", ratios)
            self._metrics.extreme("train", f"{ratio}/max", "max", ratios)
        return weights
