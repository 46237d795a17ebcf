"""Online RL against TRL on SmolLM2-135M-Instruct: PPO against TRL 1.12.0's experimental
PPOTrainer (the last TRL with PPO), GRPO against the installed TRL's GRPOTrainer.

    python benchmarks/online_vs_trl.py [--iterations 3 --rollout 16 --chunk 8 --response 48]
                                       [--lora 16] [--runs ppo-trl ppo-ours-head ...]

Same prompts (chat-templated film-review requests), response length, rollout and minibatch
sizes, one PPO epoch, float32, one thread, each run in its own process; PPO: a reward
model and a value model on SmolLM2's backbone with fresh heads, the reference a copy of
the policy (ours also with the value as a head on the policy, ``value_head_on_policy``:
no value model); GRPO: 4 samples per prompt, VADER as the reward function, KL to the
reference as a loss term (beta 0.04), one optimizer step per rollout; ours also with
prefix sharing (each group's prompt computed once), and with prefix sharing sampling on
vLLM in this process (``use_vllm``; the CPU build: TRL 1.16's GRPOTrainer cannot use it,
its weight load fails on vLLM's CPU backend, and its ``vllm`` extra stops at vLLM 0.31);
PPO with the value head also on vLLM. With ``--lora R`` every run trains a
LoRA adapter of rank R on the policy, and both trainers use the policy without its adapter
as the reference (TRL's value model stays a full model, as TRL 1.12 has it). TRL 1.12.0
is installed (without dependencies, beside this environment's transformers) into a folder
of its own under the rlhf_ext cache the first time.
Printed: seconds per iteration (median after the first), rollout tokens per second
(response tokens sampled per second of iteration), peak resident memory of the process,
the ratios ours / TRL, and, for ours, where an iteration's time goes: sampling with the
reward functions, the rollout's scoring forwards, the update (the rest), the weight sync.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from isolated import report, run_isolated

TRL_PPO_VERSION = "1.12.0"


def trl_112_dir() -> Path:
    from rlhf_ext.worlds.smollm2 import cache_root

    target = cache_root() / f"trl-{TRL_PPO_VERSION}"
    if not (target / "trl" / "experimental" / "ppo").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(target), f"trl=={TRL_PPO_VERSION}"], check=True)
    return target


def peak_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prompts(n: int) -> list[list[dict]]:
    from rlhf_ext.worlds.smollm2.task import films, review_prompts

    train, _ = films()
    return review_prompts(train)[:n]


class Clock:
    """Time stamps at the start and at each optimizer step (one per iteration here)."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                clock.stamps.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kwargs):
                clock.stamps.append(time.perf_counter())

        self.stamps, self.callback = [], Callback()

    def per_iteration(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def summary(clock: Clock, tokens: list[int], iterations: int) -> dict:
    times = clock.per_iteration()
    assert len(times) == iterations, (len(times), iterations)
    steady = times[1:] or times
    return {"seconds_per_iteration": statistics.median(steady),
            "tokens_per_second": sum(tokens[1:] or tokens) / sum(steady),
            "iteration_seconds": times, "response_tokens": tokens, "peak_mib": peak_mib()}


# -------------------------------------------------------------------------------------
# children: one run each
# -------------------------------------------------------------------------------------

def ours(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import rlhf_ext.ppo.rollout as rollout_module
    from rlhf_ext.heads import RewardModel, ValueModel
    from rlhf_ext.ppo import PPOConfig, PPOTrainer
    from rlhf_ext.worlds.smollm2 import smollm2_path, vader_reward

    torch.manual_seed(0)
    path = str(smollm2_path())
    tokens, parts = [], {"sampling": [], "scoring": []}
    sample, forwards = rollout_module.sample_and_score, rollout_module.scoring_forwards

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            parts[name].append(time.perf_counter() - start)
            if name == "sampling":
                tokens.append(sum(len(ids) for ids in out.ids))
            return out
        return wrapper

    # sampling: the sampler and the reward functions; scoring: the policy's, reference's
    # and value forwards of the rollout
    rollout_module.sample_and_score = timed("sampling", sample)
    rollout_module.scoring_forwards = timed("scoring", forwards)
    grpo = a.mode.startswith("grpo")
    vllm = a.mode.endswith("-vllm")
    args = PPOConfig(
        output_dir=a.out, rollout_batch_size=a.rollout, per_device_train_batch_size=a.minibatch,
        gradient_accumulation_steps=a.rollout // a.minibatch, num_ppo_epochs=1,
        num_train_epochs=a.iterations,
        local_rollout_forward_batch_size=a.rollout if grpo else a.chunk,
        response_length=a.response, temperature=0.7, learning_rate=1e-6,
        gradient_checkpointing=a.checkpointing, report_to="none", save_strategy="no",
        logging_steps=1, num_sample_generations=0, use_cpu=True, disable_tqdm=True,
        **(dict(advantage_estimator="grpo", num_generations=a.group, kl_coef=0.0,
                kl_loss_coef=0.04, loss_aggregation="token_mean",
                prefix_sharing=a.mode.startswith("grpo-ours-shared")) if grpo
           else dict(value_head_on_policy=a.mode.startswith("ppo-ours-head"))),
        use_vllm=vllm)
    policy = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    n = a.rollout // (a.group if grpo else 1) * a.iterations
    data = Dataset.from_dict({"prompt": prompts(n)})
    if grpo:
        trainer = PPOTrainer(policy, args, tok, data, reward=vader_reward,
                             peft_config=lora(a))
    else:
        value = None if args.value_head_on_policy else ValueModel.from_backbone(path)
        trainer = PPOTrainer(policy, args, tok, data, reward=RewardModel.from_backbone(path),
                             value_model=value, peft_config=lora(a))
    clock = Clock()
    trainer.add_callback(clock.callback)
    trainer.train()
    out = summary(clock, tokens, a.iterations)
    syncs = [log["timing/sync"] for log in trainer.state.log_history if "timing/sync" in log]
    steady = slice(1, None) if a.iterations > 1 else slice(None)
    out["parts"] = {name: statistics.median(times[steady]) for name, times in parts.items()}
    out["parts"]["sync"] = statistics.median(syncs) if syncs else 0.0
    out["parts"]["update"] = out["seconds_per_iteration"] - sum(out["parts"].values())
    return out


def lora(a):
    """The policy's LoRA adapter of ``--lora R`` (every linear layer, alpha 2R, no dropout;
    the reference is then the policy with the adapter switched off), or None."""
    if not a.lora:
        return None
    from peft import LoraConfig

    return LoraConfig(r=a.lora, lora_alpha=2 * a.lora, lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")


def trl_ppo(a) -> dict:
    import torch
    import trl
    import trl.experimental.ppo.ppo_trainer as ppo_module
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from rlhf_ext.worlds.smollm2 import smollm2_path

    assert trl.__version__ == TRL_PPO_VERSION, trl.__version__
    torch.manual_seed(0)
    path = str(smollm2_path())
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    tokens = []
    generate = ppo_module.batch_generation

    def counted(model, queries, *args, **kwargs):
        query_responses, logits = generate(model, queries, *args, **kwargs)
        responses = query_responses[:, queries.shape[1]:]
        eos = responses == tok.eos_token_id
        first = torch.where(eos.any(1), eos.int().argmax(1) + 1, responses.shape[1])
        tokens.append(int(first.sum()))
        return query_responses, logits

    ppo_module.batch_generation = counted
    n = a.rollout * a.iterations
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
             for p in prompts(n)]
    data = Dataset.from_dict({"input_ids": [tok(t, add_special_tokens=False)["input_ids"]
                                            for t in texts]})
    args = PPOConfig(
        output_dir=a.out, per_device_train_batch_size=a.minibatch,
        gradient_accumulation_steps=a.rollout // a.minibatch, num_mini_batches=1,
        num_ppo_epochs=1, total_episodes=n, local_rollout_forward_batch_size=a.chunk,
        response_length=a.response, temperature=0.7, learning_rate=1e-6,
        gradient_checkpointing=a.checkpointing, bf16=False, report_to="none",
        save_strategy="no", logging_steps=1, num_sample_generations=0, use_cpu=True,
        disable_tqdm=True, stop_token="eos")
    policy = AutoModelForCausalLM.from_pretrained(path)
    ref = None if a.lora else AutoModelForCausalLM.from_pretrained(path)
    reward = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref,
                         reward_model=reward, value_model=value, train_dataset=data,
                         eval_dataset=data, peft_config=lora(a))
    clock = Clock()
    trainer.add_callback(clock.callback)
    trainer.train()
    return summary(clock, tokens, a.iterations)


def trl_grpo(a) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_ext.worlds.smollm2 import smollm2_path, vader_scores

    torch.manual_seed(0)
    path = str(smollm2_path())
    tok = AutoTokenizer.from_pretrained(path)
    tokens = []

    def reward(prompts, completions, completion_ids, **kwargs):
        tokens.append(sum(len(ids) for ids in completion_ids))
        return vader_scores([c[-1]["content"] if isinstance(c, list) else c
                             for c in completions])

    n = a.rollout // a.group * a.iterations
    args = GRPOConfig(
        output_dir=a.out, per_device_train_batch_size=a.minibatch,
        gradient_accumulation_steps=a.rollout // a.minibatch, num_generations=a.group,
        generation_batch_size=a.rollout, num_iterations=1, max_steps=a.iterations,
        max_completion_length=a.response, temperature=0.7, learning_rate=1e-6, beta=0.04,
        loss_type="dapo", scale_rewards="group", gradient_checkpointing=a.checkpointing,
        bf16=False, report_to="none", save_strategy="no", logging_steps=1, use_cpu=True,
        disable_tqdm=True, log_completions=False)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(path),
                          reward_funcs=reward, args=args, processing_class=tok,
                          train_dataset=Dataset.from_dict({"prompt": prompts(n)}),
                          peft_config=lora(a))
    clock = Clock()
    trainer.add_callback(clock.callback)
    trainer.train()
    out = summary(clock, tokens, a.iterations)
    out["trl"] = trl.__version__
    return out


CHILDREN = {"ppo-trl": trl_ppo, "ppo-ours": ours, "ppo-ours-head": ours,
            "ppo-ours-head-vllm": ours, "grpo-trl": trl_grpo, "grpo-ours": ours,
            "grpo-ours-shared": ours, "grpo-ours-shared-vllm": ours}


# -------------------------------------------------------------------------------------
# parent
# -------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--rollout", type=int, default=16, help="samples per iteration")
    parser.add_argument("--minibatch", type=int, default=4, help="rows per forward/backward")
    parser.add_argument("--chunk", type=int, default=8,
                        help="PPO's local_rollout_forward_batch_size (GRPO: the whole rollout "
                             "at once, as TRL's GRPOTrainer generates it)")
    parser.add_argument("--response", type=int, default=48)
    parser.add_argument("--group", type=int, default=4, help="GRPO samples per prompt")
    parser.add_argument("--checkpointing", action="store_true",
                        help="gradient checkpointing on for every run (TRL's default)")
    parser.add_argument("--lora", type=int, default=0,
                        help="LoRA rank of the policy for every run (0: full fine-tuning); "
                             "the reference is then the policy without its adapter")
    parser.add_argument("--runs", nargs="+", default=list(CHILDREN))
    parser.add_argument("--json")
    parser.add_argument("--child", choices=list(CHILDREN))
    parser.add_argument("--mode")
    parser.add_argument("--out")
    a = parser.parse_args()
    if a.child:
        a.mode = a.child
        report(CHILDREN[a.child](a))
        return
    shared = ["--iterations", str(a.iterations), "--rollout", str(a.rollout),
              "--minibatch", str(a.minibatch), "--chunk", str(a.chunk),
              "--response", str(a.response), "--group", str(a.group), "--lora", str(a.lora)]
    if a.checkpointing:
        shared.append("--checkpointing")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in a.runs:
            env = {"PYTHONPATH": str(trl_112_dir())} if run == "ppo-trl" else None
            results[run] = run_isolated(__file__, [*shared, "--child", run, "--out",
                                                   f"{tmp}/{run}"], run, env)
            r = results[run]
            print(f"{run:10s} {r['seconds_per_iteration']:7.1f} s/iteration "
                  f"{r['tokens_per_second']:7.1f} tokens/s  peak {r['peak_mib']:7.0f} MiB",
                  " ".join(f"{k} {v:.1f} s" for k, v in r.get("parts", {}).items()),
                  flush=True)
    print(f"\nSmolLM2-135M-Instruct, one thread, float32, rollout {a.rollout}, minibatch "
          f"{a.minibatch}, forward chunk {a.chunk}, response {a.response}, gradient "
          f"checkpointing {'on' if a.checkpointing else 'off'}, "
          + (f"LoRA r {a.lora} on the policy" if a.lora else "full fine-tuning"))
    print("| algorithm | trainer | s / iteration | rollout tokens / s | peak MiB | speed vs TRL "
          "| memory vs TRL | sampling + rewards / scoring / update / sync, s |"
          "\n|---|---|---|---|---|---|---|---|")
    for algo in ("ppo", "grpo"):
        trl_r = results.get(f"{algo}-trl")
        for name, r in (("TRL", trl_r), ("rlhf_ext", results.get(f"{algo}-ours")),
                        ("rlhf_ext, value head on the policy", results.get(f"{algo}-ours-head")),
                        ("rlhf_ext, value head, vLLM", results.get(f"{algo}-ours-head-vllm")),
                        ("rlhf_ext, prefix sharing", results.get(f"{algo}-ours-shared")),
                        ("rlhf_ext, prefix sharing, vLLM",
                         results.get(f"{algo}-ours-shared-vllm"))):
            if r is None:
                continue
            speed = memory = ""
            if trl_r:
                speed = f"{trl_r['seconds_per_iteration'] / r['seconds_per_iteration']:.2f}x"
                memory = f"{r['peak_mib'] / trl_r['peak_mib']:.2f}x"
            label = f"TRL {TRL_PPO_VERSION if algo == 'ppo' else r.get('trl', '')}" \
                if name == "TRL" else name
            parts = " / ".join(f"{r['parts'][k]:.1f}" for k in
                               ("sampling", "scoring", "update", "sync")) if "parts" in r else ""
            print(f"| {algo} | {label} | {r['seconds_per_iteration']:.1f} | "
                  f"{r['tokens_per_second']:.1f} | {r['peak_mib']:.0f} | {speed} | {memory} "
                  f"| {parts} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"settings": vars(a), "results": results}, indent=1))


if __name__ == "__main__":
    main()
