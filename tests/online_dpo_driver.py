"""Online DPO on the tiny world (tests/test_online_dpo.py), launched on several processes
or run as one: two rounds with the oracle as judge; process 0 writes what each process
did to ``out/driver.json``."""

import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_ext.judges import FunctionJudge
from rlhf_ext.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
from rlhf_ext.worlds.tiny import oracle_score, prompt_dataset


class CountingJudge(FunctionJudge):
    """The oracle as a Bradley-Terry judge, counting the comparisons this process judges."""

    def __init__(self):
        super().__init__(lambda prompts, texts: [oracle_score(t) for t in texts], scale=4.0)
        self.judged = 0

    def judgement(self, prompts, a, b):
        self.judged += len(prompts)
        return super().judgement(prompts, a, b)


def main(model_dir: str, out: Path) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = OnlineDPOConfig(
        output_dir=str(out), num_rounds=2, num_generations=3, max_new_tokens=16,
        per_device_train_batch_size=6 // world, num_train_epochs=1, learning_rate=0.1,
        optim="sgd",  # Adam would move rounding-sized gradients by its learning rate
        beta=0.1, max_length=64, logging_steps=1, report_to="none", use_cpu=True,
        save_strategy="no", disable_tqdm=True, seed=0,
        **({"ddp_backend": "gloo"} if world > 1 else {}))
    judge = CountingJudge()
    trainer = OnlineDPOTrainer(AutoModelForCausalLM.from_pretrained(model_dir), judge, args,
                               train_dataset=prompt_dataset(8, seed=3, split="online"),
                               processing_class=AutoTokenizer.from_pretrained(model_dir))
    rounds = trainer.train()
    last = trainer.trainer
    sums = torch.stack([p.detach().double().sum() for p in trainer.model.parameters()])
    every = last.accelerator.gather(sums.reshape(1, -1))  # [world, parameters]
    judged = last.accelerator.gather(torch.tensor([judge.judged]))
    if last.is_world_process_zero():
        (out / "driver.json").write_text(json.dumps({
            "world_size": last.args.world_size, "wrapper": type(last.model_wrapped).__name__,
            "rounds": rounds, "judged": judged.tolist(),
            "replica_drift": (every - every[0]).abs().max().item()}))
    last.accelerator.wait_for_everyone()
    if world > 1:  # leave before interpreter teardown (rlhf_ext.launch.run_main)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
