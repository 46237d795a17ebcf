"""Metrics held on the device and reduced once per log: by hand for two processes, and
counted in a real training run (one all-gather per log, none per micro-step)."""

import pytest
import torch

from rlhf_ext.metric_buffer import MetricBuffer


def record(buffer, a, b, c, d, e):
    buffer.ratio("train", "ratio", torch.tensor(a), len(a))
    buffer.extreme("train", "min", "min", torch.tensor(b))
    buffer.difference("train", "diff", torch.tensor(c), torch.tensor(d))
    buffer.total("train", "tokens", torch.tensor(e))


def test_two_processes_by_hand():
    """Per micro-step the value over both processes, then the mean over the steps; a
    count is a total; an empty side skips its step; eval is kept apart."""
    first, second = MetricBuffer(), MetricBuffer()
    record(first, [1.0, 2.0], [5.0, -1.0], [1.0, 3.0], [], 5.0)
    record(second, [3.0], [0.0], [], [2.0], 6.0)
    record(first, [4.0], [2.0], [1.0], [], 1.0)
    record(second, [], [7.0], [], [], 0.0)
    first.host("train", "host", 1.5)
    first.host("train", "host", 2.5)
    first.host("train", "host", float("nan"))  # e.g. a std of one scored row: left out
    first.host("train", "lone_std", float("nan"))  # nothing valid: None, as TRL logs it
    first.mean("eval", "ratio", torch.tensor([9.0]))
    sent = []
    second.reduce("train", lambda x: sent.append(x) or x)
    calls = []
    out = first.reduce("train", lambda x: calls.append(x) or torch.cat([x, sent[0]]))
    assert len(calls) == 1 and calls[0].shape == (1, 2 * (2 + 1 + 4 + 1))
    assert out.pop("lone_std") is None
    assert out == pytest.approx({"ratio": (6 / 3 + 4 / 1) / 2, "min": (-1 + 2) / 2,
                                 "diff": 4 / 2 - 2 / 1, "tokens": 12.0, "host": 2.0})
    assert first.reduce("train", lambda x: 1 / 0) == {}  # cleared, nothing gathered
    assert first.log_into({"eval_loss": 0.5}, lambda x: x) == "eval"


def test_a_training_run_gathers_once_per_log(world_dir, tmp_path):
    """DPO, 4 optimizer steps of 2 micro-steps, logged every 2 steps: the process group is
    asked once per log, whatever the number of metrics (about 15); the run's closing
    summary, with nothing left to reduce, asks nothing."""
    from rlhf_ext import DPOConfig, DPOTrainer
    from rlhf_ext.worlds.tiny import preference_pairs

    args = DPOConfig(output_dir=str(tmp_path), max_steps=4, gradient_accumulation_steps=2,
                     per_device_train_batch_size=2, logging_steps=2, learning_rate=1e-4,
                     report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = DPOTrainer(str(world_dir / "base"), args=args, train_dataset=preference_pairs(16))
    gathered = []
    gather = trainer.accelerator.gather
    trainer.accelerator.gather = lambda x: gathered.append(x.shape) or gather(x)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and "rewards/margins" in logs[0] and "entropy" in logs[0]
    assert len(gathered) == 2, gathered  # steps 2 and 4: one gather each
    assert logs[0]["num_tokens"] < logs[1]["num_tokens"]
