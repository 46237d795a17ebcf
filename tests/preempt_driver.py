"""A training run that tests/test_preemption.py stops with a real SIGTERM.

    python tests/preempt_driver.py KIND POLICY_DIR OUT MAX_STEPS [resume]

KIND is dpo (PreferenceTrainer), ppo (PPOTrainer, GAE with a value model, 4 optimizer
steps per iteration) or ppo_lora (the same with a LoRA policy and the value a head on
it). Each process writes its pid to OUT/pid-<rank> at start and each finished step to
OUT/step-<rank>. With $PREEMPT_AT set, each process waits at the end of that
step until its SIGTERM has arrived (at most 120 s), so the test's signal lands in that step
however loaded the machine is. The final weights go to OUT/final. Launched by accelerate for
two processes (gloo on CPU); the test runs ``main`` in its own process where no signal is
sent (the uninterrupted and the resumed runs).
"""

import os
import sys
import time
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from rlhf_ext.heads import ValueModel
from rlhf_ext.ppo import PPOConfig, PPOTrainer
from rlhf_ext.preference import PreferenceConfig, PreferenceTrainer
from rlhf_ext.worlds.tiny import oracle_score, preference_pairs, prompt_dataset


class Pace(TrainerCallback):
    def __init__(self, out: Path, rank: int, trainer):
        self.file, self.trainer = out / f"step-{rank}", trainer
        self.at = int(os.environ.get("PREEMPT_AT", "0"))

    def on_step_end(self, args, state, control, **kwargs):
        self.file.write_text(str(state.global_step))
        if state.global_step == self.at:  # hold this step's end until SIGTERM is in
            for _ in range(2400):
                if any(getattr(c, "requested", False)
                       for c in self.trainer.callback_handler.callbacks):
                    break
                time.sleep(0.05)


def main(kind: str, policy_dir: str, out: Path, max_steps: int, resume: bool = False) -> None:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pid-{rank}").write_text(str(os.getpid()))
    common = dict(output_dir=str(out), max_steps=max_steps, save_strategy="no", logging_steps=1,
                  report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
                  **({"ddp_backend": "gloo"} if world > 1 else {}))
    tok = AutoTokenizer.from_pretrained(policy_dir)
    if kind == "dpo":
        args = PreferenceConfig(per_device_train_batch_size=8 // world, learning_rate=5e-3,
                                max_length=64, **common)
        trainer = PreferenceTrainer(policy_dir, args=args, train_dataset=preference_pairs(64),
                                    processing_class=tok)
    else:
        lora = kind == "ppo_lora"
        args = PPOConfig(rollout_batch_size=8 // world, per_device_train_batch_size=2 // world,
                         num_ppo_epochs=1, response_length=8, learning_rate=1e-3,
                         value_head_on_policy=lora, **common)
        peft = None
        if lora:
            from peft import LoraConfig

            peft = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                              task_type="CAUSAL_LM")
        trainer = PPOTrainer(AutoModelForCausalLM.from_pretrained(policy_dir), args, tok,
                             prompt_dataset(32), reward=lambda p, c: [oracle_score(x) for x in c],
                             value_model=None if lora else ValueModel.from_backbone(
                                 policy_dir, seed=1), peft_config=peft)
    trainer.add_callback(Pace(out, rank, trainer))
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(out / "final"))
    if world > 1:  # leave as rlhf_ext.launch.run_main does: in interpreter teardown gloo's
        # threads can abort a finished run ("terminate called without an active exception",
        # SIGABRT: seen once in the suite on 2026-12-06)
        trainer.accelerator.wait_for_everyone()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]),
         len(sys.argv) > 5 and sys.argv[5] == "resume")
