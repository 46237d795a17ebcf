"""Model cards for what the trainers save or push: a title, how to load and use the
model, how it was trained (with the method's papers), the framework versions and the
citations."""

from __future__ import annotations

import json
import os

from huggingface_hub import ModelCard, ModelCardData

# the papers behind each method name a card can carry: (short title, arXiv id, bibtex key,
# authors, year, full title)
PAPERS = {
    "sigmoid": ("DPO", "2305.18290", "rafailov2023direct", "Rafael Rafailov and Archit Sharma "
                "and Eric Mitchell and Stefano Ermon and Christopher D. Manning and Chelsea "
                "Finn", 2023, "Direct Preference Optimization: Your Language Model is Secretly "
                "a Reward Model"),
    "ipo": ("IPO", "2310.12036", "azar2023general", "Mohammad Gheshlaghi Azar and others",
            2023, "A General Theoretical Paradigm to Understand Learning from Human "
            "Preferences"),
    "kto": ("KTO", "2402.01306", "ethayarajh2024kto", "Kawin Ethayarajh and Winnie Xu and "
            "Niklas Muennighoff and Dan Jurafsky and Douwe Kiela", 2024,
            "KTO: Model Alignment as Prospect Theoretic Optimization"),
    "orpo": ("ORPO", "2403.07691", "hong2024orpo", "Jiwoo Hong and Noah Lee and James Thorne",
             2024, "ORPO: Monolithic Preference Optimization without Reference Model"),
    "simpo": ("SimPO", "2405.14734", "meng2024simpo", "Yu Meng and Mengzhou Xia and Danqi Chen",
              2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"),
    "cpo": ("CPO", "2401.08417", "xu2024contrastive", "Haoran Xu and others", 2024,
            "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance "
            "in Machine Translation"),
    "sft": ("RPO", "2404.19733", "pang2024iterative", "Richard Yuanzhe Pang and others", 2024,
            "Iterative Reasoning Preference Optimization"),
    "f_divergence": ("f-DPO", "2309.16240", "wang2023beyond", "Chaoqi Wang and others", 2023,
                     "Beyond Reverse KL: Generalizing Direct Preference Optimization with "
                     "Diverse Divergence Constraints"),
    "ld_alpha": ("LD-DPO", "2409.06411", "liu2024length", "Wei Liu and others", 2024,
                 "Length Desensitization in Direct Preference Optimization"),
    "use_weighting": ("WPO", "2406.11827", "zhou2024wpo", "Wenxuan Zhou and others", 2024,
                      "WPO: Enhancing RLHF with Weighted Preference Optimization"),
    "sync_ref_model": ("TR-DPO", "2404.09656", "gorbatovski2024learn", "Alexey Gorbatovski "
                       "and others", 2024, "Learn Your Reference Model for Real Good "
                       "Alignment"),
    "reward-model": ("InstructGPT", "2203.02155", "ouyang2022training", "Long Ouyang and "
                     "others", 2022, "Training language models to follow instructions with "
                     "human feedback"),
    "gae": ("PPO", "1707.06347", "schulman2017proximal", "John Schulman and Filip Wolski and "
            "Prafulla Dhariwal and Alec Radford and Oleg Klimov", 2017,
            "Proximal Policy Optimization Algorithms"),
    "grpo": ("GRPO", "2402.03300", "shao2024deepseekmath", "Zhihong Shao and others", 2024,
             "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language "
             "Models"),
    "rloo": ("RLOO", "2402.14740", "ahmadian2024back", "Arash Ahmadian and others", 2024,
             "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from "
             "Human Feedback in LLMs"),
    "reinforce_pp": ("REINFORCE++", "2501.03262", "hu2025reinforce", "Jian Hu", 2025,
                     "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language "
                     "Models"),
}
PAPERS["dpo"] = PAPERS["sigmoid"]
PAPERS["reinforce_pp_baseline"] = PAPERS["reinforce_pp"]

_TEMPLATE = """---
{card_data}
---

# {title}

{summary}

## Use it

```python
{usage}
```

## Training

- method: {method}{papers}
- base model: `{base_model}`
- datasets: {datasets}

### Hyperparameters

```json
{hyperparameters}
```

### Final metrics

```json
{metrics}
```

## Framework versions

{versions}

## Citations

```bibtex
{citations}
```

Trained with rlhf_ext, the RLHF pipeline on the `transformers.Trainer` API.
"""


def usage_snippet(kind: str, repo: str, base_model: str | None) -> str:
    """Python that loads this model and uses it: ``kind`` is causal-lm, adapter,
    reward-model (ours, which needs rlhf_ext), sequence-classifier, classifier-adapter (a
    LoRA adapter of one) or ppo."""
    if kind in ("causal-lm", "ppo"):
        extra = ("\n# the value model is in value_model/ (rlhf_ext.ValueModel)"
                 if kind == "ppo" else "")
        return (f"from transformers import pipeline\n\ngenerate = pipeline(\"text-generation\", "
                f"model={repo!r})\nprint(generate([{{\"role\": \"user\", \"content\": "
                f"\"Hello!\"}}], max_new_tokens=32)[0][\"generated_text\"]){extra}")
    if kind == "adapter":
        return ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, "
                f"AutoTokenizer\n\nbase = AutoModelForCausalLM.from_pretrained({base_model!r})\n"
                f"model = PeftModel.from_pretrained(base, {repo!r})  # a LoRA adapter\n"
                f"tokenizer = AutoTokenizer.from_pretrained({repo!r})\n"
                "inputs = tokenizer.apply_chat_template([{\"role\": \"user\", \"content\": "
                "\"Hello!\"}], add_generation_prompt=True, return_tensors=\"pt\", "
                "return_dict=True)\nprint(tokenizer.decode(model.generate(**inputs, "
                "max_new_tokens=32)[0]))")
    if kind == "classifier-adapter":
        return ("from peft import AutoPeftModelForSequenceClassification\nfrom transformers "
                "import AutoTokenizer\n\n# a LoRA adapter and its reward head, on the base "
                f"model\nmodel = AutoPeftModelForSequenceClassification.from_pretrained({repo!r}, "
                f"num_labels=1)\ntokenizer = AutoTokenizer.from_pretrained({repo!r})\n"
                "batch = tokenizer([\"How was the film? It was great.\"], return_tensors=\"pt\")\n"
                "print(model(**batch).logits[:, 0])  # the reward")
    if kind == "sequence-classifier":
        return ("from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
                f"model = AutoModelForSequenceClassification.from_pretrained({repo!r})\n"
                f"tokenizer = AutoTokenizer.from_pretrained({repo!r})\n"
                "batch = tokenizer([\"How was the film? It was great.\"], return_tensors=\"pt\")\n"
                "print(model(**batch).logits[:, 0])  # the reward")
    return ("# needs rlhf_ext (pip install rlhf_ext): its reward head is not in transformers\n"
            "from transformers import AutoTokenizer\n\nfrom rlhf_ext import load_reward_model, "
            f"score\n\nmodel = load_reward_model({repo!r})  # a model or a LoRA adapter\n"
            f"tokenizer = AutoTokenizer.from_pretrained({repo!r})\n"
            "print(score(model, tokenizer, [\"How was the film?\"], [\" It was great.\"]))")


def framework_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    lines = []
    for package in ("rlhf_ext", "transformers", "torch", "peft", "trl", "accelerate",
                    "datasets"):
        try:
            lines.append(f"- {package}: {version(package)}")
        except PackageNotFoundError:
            continue
    return "\n".join(lines)


def citations(keys: list[str]) -> str:
    entries, seen = [], set()
    for key in keys:
        if key not in PAPERS or PAPERS[key][2] in seen:
            continue
        _, arxiv, bibkey, authors, year, title = PAPERS[key]
        seen.add(bibkey)
        entries.append(f"@article{{{bibkey},\n  title = {{{{{title}}}}},\n  author = "
                       f"{{{authors}}},\n  year = {{{year}}},\n  journal = {{arXiv preprint "
                       f"arXiv:{arxiv}}}\n}}")
    return "\n\n".join(entries) or "% no paper: plain supervised fine-tuning"


def write_model_card(output_dir: str, *, model_name: str, base_model: str | None, method: str,
                     summary: str, hyperparameters: dict, metrics: dict,
                     datasets: list[str] | None = None, tags: list[str] | None = None,
                     is_adapter: bool = False, kind: str = "causal-lm", repo: str | None = None,
                     papers: list[str] | None = None) -> str:
    """Write ``output_dir/README.md``; return its text. Metadata holds base_model, tags
    (always ``rlhf-ext`` and the method), datasets and the library (peft for adapters);
    ``kind`` picks the usage snippet, ``papers`` (keys of ``PAPERS``) the citations."""
    data = ModelCardData(
        base_model=base_model if base_model and not os.path.isdir(base_model) else None,
        library_name="peft" if is_adapter else "transformers",
        tags=sorted({"rlhf-ext", method, *(tags or [])}),
        datasets=[d for d in (datasets or []) if not os.path.exists(d)] or None,
    )
    if is_adapter:
        kind = {"causal-lm": "adapter", "sequence-classifier": "classifier-adapter"}.get(kind, kind)
    papers = [p for p in papers or [] if p in PAPERS]
    links = ", ".join(f"[{PAPERS[p][0]}](https://huggingface.co/papers/{PAPERS[p][1]})"
                      for p in dict.fromkeys(papers))
    text = _TEMPLATE.format(
        card_data=data.to_yaml(), title=model_name, summary=summary, method=method,
        papers=f" ({links})" if links else "",
        usage=usage_snippet(kind, repo or output_dir, base_model),
        base_model=base_model, datasets=", ".join(f"`{d}`" for d in datasets or []) or "-",
        hyperparameters=json.dumps(hyperparameters, indent=2, default=str),
        metrics=json.dumps(metrics, indent=2, default=str),
        versions=framework_versions(), citations=citations(papers))
    ModelCard(text).save(os.path.join(output_dir, "README.md"))
    return text


def trainer_model_card(trainer, *, method: str, summary: str, hyperparameters: dict,
                       model_name: str | None = None, dataset_name=None,
                       tags: list[str] | None = None, model=None, kind: str = "causal-lm",
                       papers: list[str] | None = None) -> None:
    """``write_model_card`` for a trainer's run, on the main process only: titled
    ``model_name``, else the hub repository's name, else the output folder's; usage from
    hub_model_id (else the output folder); the trainer's ``base_model_name``; final metrics
    from its log history; an adapter card when ``model`` (default ``trainer.model``) is a
    PeftModel."""
    if not trainer.is_world_process_zero():
        return
    from .models import is_peft_model

    args = trainer.args
    repo = args.hub_model_id or args.output_dir
    title = model_name or os.path.basename(os.path.normpath(repo))
    write_model_card(
        args.output_dir, model_name=title, base_model=trainer.base_model_name, method=method,
        summary=summary, hyperparameters=hyperparameters,
        metrics=final_metrics(trainer.state.log_history),
        datasets=[dataset_name] if isinstance(dataset_name, str) else dataset_name,
        tags=tags, is_adapter=is_peft_model(trainer.model if model is None else model),
        kind=kind, repo=repo, papers=papers)


def final_metrics(log_history: list[dict]) -> dict:
    """What a model card reports: the training summary (train_loss, runtime, ...) and the
    latest evaluation, merged from a Trainer's log history."""
    out: dict = {}
    for entry in log_history:
        if "train_loss" in entry or any(k.startswith("eval_") for k in entry):
            out.update(entry)
    return out or (log_history[-1] if log_history else {})
