"""Peak memory of PPO: single-base mode against four separate models, same settings.

    python benchmarks/ppo_memory.py [--hidden 512 --layers 8 --iterations 2]

Both modes train LoRA adapters on the policy and the value model and run the same PPO
iterations; each mode runs in its own process and reports its peak RSS:

- separate: policy (base + LoRA), an explicit reference copy, a value model with its own
  backbone (+ LoRA, head trained), a reward model with its own backbone;
- single-base: one base; policy, value and reward are LoRA adapters on it, the reference
  is the base with adapters off (``rlhf_ext.ppo.single_base``).
"""

import argparse
import resource
import tempfile
from pathlib import Path

from isolated import report, run_isolated

LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(root: Path, hidden: int, layers: int) -> None:
    """A base model of the requested size, and a LoRA reward model on it (one step)."""
    import torch
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_ext.reward import RewardConfig, RewardTrainer
    from rlhf_ext.worlds.tiny import build_tokenizer, preference_pairs

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=8, intermediate_size=3 * hidden,
        max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None))
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    trainer = RewardTrainer(str(root / "base"), processing_class=tok,
                            train_dataset=preference_pairs(16, seed=0),
                            peft_config=LoraConfig(**LORA),
                            args=RewardConfig(output_dir=str(root / "rm"), max_steps=1,
                                              per_device_train_batch_size=4, report_to="none",
                                              use_cpu=True, save_strategy="no",
                                              disable_tqdm=True))
    trainer.train()
    trainer.save_model()


def run_mode(mode: str, root: Path, iterations: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_ext.heads import RewardModel, ValueModel
    from rlhf_ext.ppo import PPOConfig, PPOTrainer
    from rlhf_ext.ppo.single_base import build_single_base
    from rlhf_ext.worlds.tiny import prompt_dataset

    torch.set_num_threads(1)
    start = rss_mb()
    tok = AutoTokenizer.from_pretrained(root / "base")
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    if mode == "single":
        policy, value, reward = build_single_base(base, LoraConfig(**LORA), str(root / "rm"))
        ref = None
    else:
        policy = base
        ref = AutoModelForCausalLM.from_pretrained(root / "base")
        value = get_peft_model(ValueModel.from_backbone(str(root / "base")),
                               LoraConfig(**LORA, modules_to_save=["score"]))
        reward = RewardModel.from_backbone(str(root / "base"))
    models_mb = rss_mb()
    args = PPOConfig(output_dir=str(root / f"ppo_{mode}"), rollout_batch_size=16,
                     num_ppo_epochs=1, per_device_train_batch_size=8,
                     num_train_epochs=iterations, response_length=16, temperature=1.0,
                     report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                     num_sample_generations=0, logging_steps=1000)
    trainer = PPOTrainer(policy, args, tok, prompt_dataset(64, seed=0), reward=reward,
                         value_model=value, ref_model=ref,
                         peft_config=LoraConfig(**LORA) if mode == "separate" else None)
    trainer.train()
    params = {id(p): p.numel() for m in (trainer.model, ref, reward) if m is not None
              for p in m.parameters()}
    return {"mode": mode, "start_mb": start, "after_models_mb": models_mb,
            "peak_mb": rss_mb(), "distinct_params": sum(params.values())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--_mode", help=argparse.SUPPRESS)
    parser.add_argument("--_root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._mode:
        report(run_mode(args._mode, Path(args._root), args.iterations))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root, args.hidden, args.layers)
        rows = [run_isolated(__file__, ["--_mode", mode, "--_root", tmp,
                                        "--iterations", str(args.iterations)], mode)
                for mode in ("separate", "single")]
    print(f"\nPPO peak memory, Llama hidden {args.hidden} x {args.layers} layers, "
          f"{args.iterations} iterations, LoRA r=8 (one process per mode)\n")
    print("| mode | distinct parameters | RSS after models (MB) | peak RSS (MB) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['distinct_params'] / 1e6:.1f} M | {r['after_models_mb']:.0f} "
              f"| {r['peak_mb']:.0f} |")
    sep, single = rows
    print(f"\nsingle-base / separate: distinct parameters "
          f"{single['distinct_params'] / sep['distinct_params']:.2f}x, "
          f"peak RSS {single['peak_mb'] / sep['peak_mb']:.2f}x")

if __name__ == "__main__":
    main()
