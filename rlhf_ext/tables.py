"""Tables of completions (prompt, completion, score...) for people to read: appended to a
markdown file in output_dir and logged to the trackers the run reports to (TensorBoard as
markdown text, Weights & Biases as a table), at the trainer's current step."""

from __future__ import annotations

import os


def cell(value) -> str:
    """One markdown table cell: a conversation shows its last turn; newlines and pipes,
    which would break the row, become spaces and escaped pipes."""
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        value = value[-1].get("content", "")
    if isinstance(value, float):
        value = f"{value:.3f}"
    return str(value).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def markdown_table(rows: list[dict]) -> str:
    """rows (dicts with the same keys) -> a markdown table, one row per line."""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def log_table(trainer, name: str, rows: list[dict]) -> None:
    """Append ``rows`` under a step heading to ``output_dir/<name>.md`` and log them to
    the run's trackers as ``<name>`` (main process only)."""
    if not rows or not trainer.is_world_process_zero():
        return
    step = trainer.state.global_step
    text = markdown_table(rows)
    os.makedirs(trainer.args.output_dir, exist_ok=True)
    with open(os.path.join(trainer.args.output_dir, f"{name}.md"), "a") as f:
        f.write(f"\n### step {step}\n\n{text}")
    for callback in trainer.callback_handler.callbacks:
        writer = getattr(callback, "tb_writer", None)  # TensorBoardCallback, once set up
        if writer is not None:
            writer.add_text(name, text, step)
            writer.flush()
        wandb = getattr(callback, "_wandb", None)  # WandbCallback
        if wandb is not None and getattr(wandb, "run", None) is not None:
            columns = list(rows[0])
            wandb.log({name: wandb.Table(columns=columns,
                                         data=[[cell(r[c]) for c in columns] for r in rows])})
