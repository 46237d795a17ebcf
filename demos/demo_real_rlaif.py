"""RLAIF rows of demos/demo_real.py: SmolLM2-135M-Instruct judges its own review pairs.

The training pairs of the demo (the reference's own reviews, labelled for DPO by a
Bradley-Terry model on VADER) are judged again by the same small model asked "which review
is more positive?" (``rlhf_ext.judges.LMJudge``), each pair in both orders, the shown order
of the first reading drawn at random. Measured against VADER's order of each pair: the
judge's accuracy from one reading (one order) and from both orders averaged, as hard
labels (the likelier winner) and as soft ones (the mean probability it gives VADER's
winner); its position bias. The judged pairs are saved twice, with the soft label column
(``dpo_rlaif``) and without (``dpo_rlaif_hard``), for DPO at the same settings as the demo's
``dpo`` (the paper's RLAIF against RLHF comparison, VADER standing in for the humans).
"""

import json
import random
import time
from pathlib import Path

# the question of the experiment, put plainly; one principle, no chat wrapper (measured on
# 64 clear-cut hand-written pairs: averaged accuracy 0.66 without the chat template, 0.59
# with it; both at one reading 0.39, i.e. position bias dominates a single reading)
TEMPLATE = ("{principle}\n\nRequest: {prompt}\n\nReview A: {response_a}\n\n"
            "Review B: {response_b}\n\nWhich review is more positive? Answer A or B.")
PRINCIPLE = "You compare two film reviews."
ANSWER_PREFIX = "The more positive review is Review"


def judge_pairs(out: Path, model_path: str, seed: int) -> dict:
    """Judge the training pairs (cached: OUT/data/rlaif.json and the two datasets)."""
    done = out / "data" / "rlaif.json"
    if done.exists():
        return json.loads(done.read_text())
    import torch
    from datasets import DatasetDict, load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_ext.judges import LMJudge, label_samples, position_bias

    start = time.time()
    pairs = load_from_disk(str(out / "data" / "pairs"))
    train = pairs["train"]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    judge = LMJudge(model, tokenizer, template=TEMPLATE, principles=[PRINCIPLE],
                    answer_prefix=ANSWER_PREFIX, options=(" A", " B"), use_chat_template=False,
                    batch_size=16, seed=seed, progress=True)
    rng = random.Random(seed)
    shown, vader_first = [], []  # each pair in a random order; is VADER's winner shown first?
    for row in train:
        better, worse = ((row["chosen"], row["rejected"]) if row["chosen_vader"] >
                         row["rejected_vader"] else (row["rejected"], row["chosen"]))
        first = rng.random() < 0.5
        shown.append([better, worse] if first else [worse, better])
        vader_first.append(first)
    labels = label_samples(judge, list(train["prompt"]), shown, pairing="disjoint",
                           batch_size=64, path=out / "data" / "rlaif_labels.jsonl")
    texts = lambda m: m[0]["content"]  # noqa: E731
    right = [texts(r["chosen"]) == texts(s[0] if f else s[1])
             for r, s, f in zip(labels, shown, vader_first)]  # averaged verdict = VADER's
    p_vader = [p if ok else 1 - p for p, ok in zip(labels["chosen_probability"], right)]
    # one reading: the order as shown first; P(first shown wins) per pair, then VADER's view
    first_reading = [(r["chosen_probability_shown_first"] if r["chosen"] == s[0]
                      else 1 - r["chosen_probability_shown_second"])
                     for r, s in zip(labels, shown)]  # P(shown[0] wins | shown[0] first)
    one_right = [(p > 0.5) == f for p, f in zip(first_reading, vader_first)]
    second_reading = [(r["chosen_probability_shown_first"] if r["chosen"] == s[1]
                       else 1 - r["chosen_probability_shown_second"])
                      for r, s in zip(labels, shown)]  # P(shown[1] wins | shown[1] first)
    bias = position_bias(torch.tensor(first_reading), torch.tensor(second_reading))
    n = len(labels)
    facts = {
        "pairs": n, "template": TEMPLATE, "principle": PRINCIPLE, "answer_prefix": ANSWER_PREFIX,
        "accuracy_one_order": sum(one_right) / n,
        "accuracy_both_orders": sum(right) / n,
        "soft_accuracy_both_orders": sum(p_vader) / n,
        "bradley_terry_label_accuracy": sum(c > r for c, r in zip(train["chosen_vader"],
                                                                  train["rejected_vader"])) / n,
        "mean_chosen_probability": sum(labels["chosen_probability"]) / n,
        **bias, "seconds": time.time() - start,
    }
    soft = labels.select_columns(["prompt", "chosen", "rejected", "chosen_probability"])
    DatasetDict({"train": soft, "test": pairs["test"]}).save_to_disk(
        str(out / "data" / "pairs_rlaif"))
    DatasetDict({"train": soft.remove_columns("chosen_probability"), "test": pairs["test"]}
                ).save_to_disk(str(out / "data" / "pairs_rlaif_hard"))
    done.write_text(json.dumps(facts, indent=2))
    return facts


def markdown(facts: dict) -> list[str]:
    """The RLAIF section of report.md."""
    return [
        "## RLAIF: the model as its own judge", "",
        f"SmolLM2-135M-Instruct judged the {facts['pairs']} training pairs (\"which review is "
        f"more positive?\", P from the logits of ' A' and ' B' after \"{facts['answer_prefix']}\"; "
        f"{facts['seconds']:.0f} s). Against VADER's order of each pair:", "",
        "| labels | accuracy |", "|---|---|",
        f"| judge, one reading (random order) | {facts['accuracy_one_order']:.3f} |",
        f"| judge, both orders averaged (hard) | {facts['accuracy_both_orders']:.3f} |",
        f"| judge, both orders averaged (soft: mean P of VADER's winner) | "
        f"{facts['soft_accuracy_both_orders']:.3f} |",
        f"| Bradley-Terry on VADER (the dpo row's labels) | "
        f"{facts['bradley_terry_label_accuracy']:.3f} |", "",
        f"Position bias: the two orders agree on {facts['order_agreement']:.0%} of pairs; the "
        f"response shown first wins {facts['first_position_rate']:.0%} of readings (mean P "
        f"{facts['mean_first_probability']:.2f}). Mean soft label of the chosen response "
        f"{facts['mean_chosen_probability']:.3f}. dpo_rlaif trains on the soft labels, "
        f"dpo_rlaif_hard on the same pairs without them, dpo on the VADER labels.", ""]
