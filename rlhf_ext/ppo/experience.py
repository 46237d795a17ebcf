"""PPO's train dataloader: each epoch one rollout (one PPO iteration), then its experience
in shuffled minibatches, num_ppo_epochs times.

A DataLoader over a batch sampler, so that the Trainer's own resume (accelerate's
``skip_first_batches``) can skip the minibatches a mid-iteration checkpoint had done.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .config import PPOConfig

MakeExperience = Callable[[int], dict[str, torch.Tensor]]


class Experience(torch.utils.data.Dataset):
    """The current rollout's experience (tensors with one row per sequence), fetched a
    minibatch at a time."""

    def __init__(self, size: int):
        self.size, self.tensors = size, {}

    def __len__(self) -> int:
        return self.size

    def __getitems__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        index = torch.tensor(rows)
        return {k: v[index.to(v.device)] for k, v in self.tensors.items()}


class IterationSampler(torch.utils.data.Sampler):
    """One PPO iteration per epoch: iterating runs the rollout (into ``experience``), then
    yields its rows' indices in shuffled minibatches, num_ppo_epochs times."""

    def __init__(self, args: PPOConfig, make_experience: MakeExperience, experience: Experience):
        self.args, self.make_experience, self.experience, self.epoch = (
            args, make_experience, experience, 0)
        self.per_rollout = math.ceil(args.rollout_batch_size / args.per_device_train_batch_size)

    def __len__(self) -> int:
        return self.per_rollout * self.args.num_ppo_epochs

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        args = self.args
        self.experience.tensors = self.make_experience(self.epoch)
        n = self.experience.tensors["input_ids"].shape[0]
        generator = torch.Generator().manual_seed(args.seed * 1000 + self.epoch)
        unit = args.shared_prompt_group  # prefix sharing: shuffle whole groups
        for _ in range(args.num_ppo_epochs):
            order = minibatch_order(n, unit, generator)
            for start in range(0, n, args.per_device_train_batch_size):
                yield order[start:start + args.per_device_train_batch_size].tolist()


def minibatch_order(n: int, unit: int, generator: torch.Generator) -> torch.Tensor:
    """A seeded shuffle of n rows in blocks of ``unit`` (whole groups with prefix
    sharing). -> [n] row indices."""
    return (torch.randperm(n // unit, generator=generator)[:, None] * unit
            + torch.arange(unit)).flatten()


def _as_batch(batch):
    return batch


class ExperienceLoader(torch.utils.data.DataLoader):
    """The Trainer's train dataloader: one rollout per epoch (``make_experience(epoch)``,
    the trainer's), then its minibatches."""

    def __init__(self, args: PPOConfig, make_experience: MakeExperience):
        experience = Experience(args.rollout_batch_size)
        super().__init__(experience, batch_sampler=IterationSampler(args, make_experience,
                                                                    experience),
                         collate_fn=_as_batch)

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)
