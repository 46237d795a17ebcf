"""One evaluation of make demo-real, in its own process (demos/demo_real.py runs them as
stages): the reference with best-of-N, or one trained policy, sampled on the held-out prompts.

    python demos/demo_real_eval.py --out OUT --name reference|<stage> --samples 3
                                     [--reference_samples 16] [--best_of 4,16] [--reward_model]
                                     [--use_vllm]

Writes OUT/eval_samples<n>/<name>.json (OUT/eval/ with one sample a prompt) with its seconds;
a policy's win rate reads the reference's samples from that folder's reference.json.
"""

import argparse
import json
import time
from pathlib import Path

MAX_NEW_TOKENS = 32


def eval_folder(out: Path, samples: int) -> Path:
    return out / ("eval" if samples == 1 else f"eval_samples{samples}")


def load_policy(path: Path):
    """A saved policy, a LoRA adapter merged into its base for fast sampling."""
    from transformers import AutoModelForCausalLM

    if (path / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(str(path)).merge_and_unload().eval()
    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


class Judge:
    """Samples policies on the held-out prompts and scores them against the reference.

    The reference is sampled ``reference_samples`` times per prompt: its VADER score and
    length are means over all of them, and a policy's win rate is, per prompt, the chance
    that its sample beats one of the reference's (ties half), averaged over prompts; its
    other statistics, like every policy's, come from ``samples`` samples per prompt."""

    def __init__(self, out: Path, model_path: str, prompts: list, seed: int, samples: int,
                 reference_samples: int, with_reward_model: bool, use_vllm: bool = False):
        from transformers import AutoTokenizer

        from rlhf_ext.models import load_causal_lm
        from rlhf_ext.reward import load_reward_model

        self.out, self.seed, self.prompts, self.samples = out, seed, prompts, samples
        self.reference_samples, self.use_vllm = reference_samples, use_vllm
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.rendered = [self.tokenizer.apply_chat_template(p, tokenize=False,
                                                            add_generation_prompt=True)
                         for p in prompts]
        self.reference = load_causal_lm(model_path).eval()
        self.reward_model = (load_reward_model(str(out / "reward")).eval()
                             if with_reward_model else None)

    def sample(self, model, copies: int, seed_offset: int, return_logps: bool = False):
        """``copies`` samples of every prompt, prompt-major within each copy (on vLLM
        with ``use_vllm``)."""
        from rlhf_ext.vllm_engine import ModelSampler

        sampler = ModelSampler(model, self.tokenizer, self.use_vllm, self.rendered,
                               MAX_NEW_TOKENS, batch_size=176)
        out = sampler(self.rendered * copies, MAX_NEW_TOKENS, 1.0, seed=self.seed + seed_offset,
                      return_logps=return_logps, progress=True)
        sampler.close()
        return out

    def stats(self, texts: list[str], lengths: list[int], kl: float,
              reference: list[list[float]]) -> dict:
        from statistics import mean, stdev

        from rlhf_ext.worlds.smollm2 import vader_scores
        from rlhf_ext.worlds.smollm2.task import distinct_n, repeated_word_rate, win_rate

        scores, k = vader_scores(texts), len(self.prompts)
        wins = mean(win_rate([scores[i]] * len(reference[i % k]), reference[i % k])
                    for i in range(len(scores)))
        return {"vader": mean(scores), "vader_se": stdev(scores) / len(scores) ** 0.5,
                "win_rate_vs_reference": wins, "kl_to_reference": kl,
                "mean_length": mean(lengths), "distinct_2": distinct_n(texts, 2),
                "repeated_word_rate": repeated_word_rate(texts), "scores": scores,
                "completions": texts}

    def reference_and_best_of(self, best_of: list[int]) -> dict:
        """The reference's samples and best-of-n (the reward model's favourite of n) from
        the same pool; the reward model's Spearman with VADER over the pool."""
        from statistics import mean, stdev

        from scipy.stats import spearmanr

        from rlhf_ext.data import as_replies
        from rlhf_ext.worlds.smollm2 import vader_scores
        from rlhf_ext.worlds.smollm2.task import best_of_n_kl

        n, k = max([self.reference_samples, self.samples, *best_of]), len(self.prompts)
        out = self.sample(self.reference, n, seed_offset=1)
        vader = vader_scores(out.texts)
        per_prompt = [vader[i::k] for i in range(k)]
        own = self.samples * k  # the reference's row: like any policy's, plus all-sample means
        results = {"reference": self.stats(out.texts[:own], [len(i) for i in out.ids[:own]],
                                           0.0, per_prompt)}
        results["reference"].update(vader=mean(vader), win_rate_vs_reference=0.5,
                                    vader_se=stdev(vader) / len(vader) ** 0.5,
                                    mean_length=mean(len(i) for i in out.ids))
        facts = {"reference_scores": per_prompt}
        if self.reward_model is not None:
            from rlhf_ext.reward import score

            rewards = score(self.reward_model, self.tokenizer, self.prompts * n,
                            as_replies(self.prompts * n, out.texts))
            for m in best_of:
                picks = [max((j * k + i for j in range(m)), key=lambda x: rewards[x])
                         for i in range(k)]
                results[f"best_of_{m}"] = self.stats(
                    [out.texts[x] for x in picks], [len(out.ids[x]) for x in picks],
                    best_of_n_kl(m), per_prompt)
            facts.update(reward_spearman_vader=float(spearmanr(rewards, vader).statistic),
                         reward_spearman_samples=len(out.texts))
        return {"methods": results, **facts}

    def policy(self, path: Path, reference: list[list[float]]) -> dict:
        from statistics import mean

        from rlhf_ext.evaluation import sequence_kl

        model = load_policy(path)
        out = self.sample(model, self.samples, seed_offset=2, return_logps=True)
        # the KL: the policy's log-probs from its sampling, the reference's from a forward
        # with each prompt's samples side by side and the prompt computed once
        k, n = len(self.prompts), self.samples
        order = [j * k + i for i in range(k) for j in range(n)]
        kl = mean(sequence_kl(model, self.reference, self.tokenizer,
                              [self.rendered[x % k] for x in order],
                              [out.ids[x] for x in order],
                              logps=[out.logps[x] for x in order], group=n))
        return self.stats(out.texts, [len(i) for i in out.ids], kl, reference)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--name", required=True, help="reference, or a stage's folder in OUT")
    parser.add_argument("--samples", type=int, required=True)
    parser.add_argument("--reference_samples", type=int, required=True)
    parser.add_argument("--best_of", default="", help="comma-separated N, e.g. 4,16")
    parser.add_argument("--reward_model", action="store_true",
                        help="OUT/reward exists: best-of-N and its Spearman with VADER")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--use_vllm", action="store_true", help="sample on vLLM")
    args = parser.parse_args(argv)
    out = Path(args.out)
    from rlhf_ext.worlds.smollm2 import smollm2_path

    prompts = json.loads((out / "data" / "data.json").read_text())["held_out_prompts"]
    judge = Judge(out, str(smollm2_path()), prompts, args.seed, args.samples,
                  args.reference_samples, args.reward_model, args.use_vllm)
    folder = eval_folder(out, args.samples)
    start = time.time()
    if args.name == "reference":
        result = judge.reference_and_best_of([int(n) for n in args.best_of.split(",") if n])
    else:
        base = json.loads((folder / "reference.json").read_text())
        result = judge.policy(out / args.name, base["reference_scores"])
    result["seconds"] = time.time() - start
    folder.mkdir(exist_ok=True)
    path = folder / f"{args.name}.json"
    partial = path.with_suffix(".json.partial")  # the finished file appears whole or not at all
    partial.write_text(json.dumps(result, indent=2))
    partial.replace(path)


if __name__ == "__main__":
    main()
