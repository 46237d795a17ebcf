"""Model cards for what the trainers save or push."""

from __future__ import annotations

import json
import os

from huggingface_hub import ModelCard, ModelCardData

_TEMPLATE = """---
{card_data}
---

# {model_name}

{summary}

## Training

- method: {method}
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

Trained with [rlhf_ext](https://pypi.org/project/rlhf-ext/) on the `transformers.Trainer` API.
"""


def write_model_card(output_dir: str, *, model_name: str, base_model: str | None, method: str,
                     summary: str, hyperparameters: dict, metrics: dict,
                     datasets: list[str] | None = None, tags: list[str] | None = None,
                     is_adapter: bool = False) -> str:
    """Write ``output_dir/README.md``; return its text. Metadata holds base_model, tags
    (always ``rlhf-ext`` and the method), datasets and the library (peft for adapters)."""
    data = ModelCardData(
        base_model=base_model if base_model and not os.path.isdir(base_model) else None,
        library_name="peft" if is_adapter else "transformers",
        tags=sorted({"rlhf-ext", method, *(tags or [])}),
        datasets=[d for d in (datasets or []) if not os.path.exists(d)] or None,
    )
    text = _TEMPLATE.format(
        card_data=data.to_yaml(), model_name=model_name, summary=summary, method=method,
        base_model=base_model, datasets=", ".join(f"`{d}`" for d in datasets or []) or "-",
        hyperparameters=json.dumps(hyperparameters, indent=2, default=str),
        metrics=json.dumps(metrics, indent=2, default=str))
    ModelCard(text).save(os.path.join(output_dir, "README.md"))
    return text


def trainer_model_card(trainer, *, method: str, summary: str, hyperparameters: dict,
                       model_name: str | None = None, dataset_name=None,
                       tags: list[str] | None = None, model=None) -> None:
    """``write_model_card`` for a trainer's run, on the main process only: named
    ``model_name``, else hub_model_id, else output_dir; the trainer's ``base_model_name``;
    final metrics from its log history; an adapter card when ``model`` (default
    ``trainer.model``) is a PeftModel."""
    if not trainer.is_world_process_zero():
        return
    from .models import is_peft_model

    args = trainer.args
    write_model_card(
        args.output_dir, model_name=model_name or args.hub_model_id or args.output_dir,
        base_model=trainer.base_model_name, method=method, summary=summary,
        hyperparameters=hyperparameters, metrics=final_metrics(trainer.state.log_history),
        datasets=[dataset_name] if isinstance(dataset_name, str) else dataset_name,
        tags=tags, is_adapter=is_peft_model(trainer.model if model is None else model))


def final_metrics(log_history: list[dict]) -> dict:
    """What a model card reports: the training summary (train_loss, runtime, ...) and the
    latest evaluation, merged from a Trainer's log history."""
    out: dict = {}
    for entry in log_history:
        if "train_loss" in entry or any(k.startswith("eval_") for k in entry):
            out.update(entry)
    return out or (log_history[-1] if log_history else {})
