"""Checks of preference and prompt data before any model work: errors (``DataError``)
that name the split, row, column and fix; warnings for rows a loss learns nothing from;
token ids and lengths against the model."""

from __future__ import annotations

import itertools
import warnings

from datasets import DatasetDict, IterableDataset, IterableDatasetDict

PAIRED_COLUMNS = ("chosen", "rejected")
UNPAIRED_COLUMNS = ("prompt", "completion", "label")
TOKENIZED_PAIRED = ("prompt_ids", "chosen_ids", "rejected_ids")  # pre-tokenized, as TRL's
TOKENIZED_UNPAIRED = ("prompt_ids", "completion_ids", "label")
STREAM_ROWS_CHECKED = 1000  # an IterableDataset is validated on its first rows, up front


class DataError(ValueError):
    """A dataset that cannot be trained on; the message names the column, row and fix."""


ROLES = ("system", "developer", "user", "assistant", "tool")


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def _check_text(value, column: str, row: int, name: str, allow_empty: bool = False) -> None:
    """A string, or a conversation whose every message has a known role and text content."""
    where = f"{name} dataset, row {row}, column {column!r}"
    if isinstance(value, str):
        if not allow_empty and not value.strip():
            raise DataError(f"{where}: empty text. Drop the row or fill in the completion.")
        return
    if not _is_messages(value):
        raise DataError(f"{where}: expected a string or a list of {{'role', 'content'}} "
                        f"messages, got {type(value).__name__} ({value!r:.60}). Convert the "
                        "column to text.")
    for i, message in enumerate(value):
        if "role" not in message or "content" not in message:
            raise DataError(f"{where}, message {i}: keys {sorted(message)}; a message needs "
                            "'role' and 'content'. Rename its keys.")
        if message["role"] not in ROLES:
            raise DataError(f"{where}, message {i}: unknown role {message['role']!r}; use one "
                            f"of {', '.join(ROLES)} (map e.g. 'bot' to 'assistant').")
        if not isinstance(message["content"], str):
            raise DataError(f"{where}, message {i} ({message['role']}): content is "
                            f"{message['content']!r:.40}, not text. Fill it in or drop the "
                            "message.")
    if not allow_empty and not any(m["content"].strip() for m in value):
        raise DataError(f"{where}: the messages are empty. Drop the row or fill in the "
                        "completion.")


def _check_completion_turns(example: dict, column: str, has_prompt: bool, row: int,
                            name: str) -> None:
    """A conversational completion is the model's turn, in the prompt's format."""
    where = f"{name} dataset, row {row}, column {column!r}"
    value = example[column]
    if has_prompt and isinstance(example["prompt"], list) != isinstance(value, list):
        kinds = {True: "a conversation", False: "a string"}
        raise DataError(f"{where} is {kinds[isinstance(value, list)]} but the prompt is "
                        f"{kinds[isinstance(example['prompt'], list)]}. Give both as messages "
                        "(the completion as [{'role': 'assistant', 'content': ...}]) or both "
                        "as text.")
    if isinstance(value, list) and value[-1]["role"] != "assistant":
        raise DataError(f"{where}: the completion ends with a {value[-1]['role']!r} turn; it "
                        "must end with the model's answer, a message with role 'assistant'.")


def column_names(dataset) -> list[str]:
    """A dataset's columns; a stream whose features are unknown shows its first row's."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    return list(next(iter(dataset)).keys())


def check_one_split(dataset, name: str) -> None:
    """A trainer takes one split; a DatasetDict (all splits) gets a message that says so."""
    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        splits = list(dataset)
        raise DataError(f"{name} dataset is a DatasetDict with splits {splits}; pass one split, "
                        f"e.g. dataset[{splits[0]!r}] (several eval sets: a dict of them as "
                        "eval_dataset)")


def rows_to_check(dataset):
    """(row number, example) pairs to validate: all of a Dataset, the first
    STREAM_ROWS_CHECKED of an IterableDataset (which may not end)."""
    if isinstance(dataset, IterableDataset):
        return enumerate(itertools.islice(dataset, STREAM_ROWS_CHECKED))
    return enumerate(dataset)


def dataset_kind(dataset, name: str = "train") -> str:
    """'paired' (chosen/rejected, prompt optional) or 'unpaired' (prompt/completion/label);
    'tokenized_paired' / 'tokenized_unpaired' for the same as token ids (``*_ids``)."""
    cols = set(column_names(dataset))
    if set(TOKENIZED_PAIRED) <= cols:
        return "tokenized_paired"
    if set(TOKENIZED_UNPAIRED) <= cols:
        return "tokenized_unpaired"
    if set(PAIRED_COLUMNS) <= cols:
        return "paired"
    if set(UNPAIRED_COLUMNS) <= cols:
        return "unpaired"
    raise DataError(
        f"{name} dataset: columns {sorted(cols)} fit no preference format. Give "
        "prompt/chosen/rejected (paired; prompt optional when chosen and rejected share it), "
        "or prompt/completion/label (unpaired, for kto). Rename the columns to these names.")


def validate_preference_dataset(dataset, paired_loss: bool, loss_names: list[str],
                                name: str = "train", empty_completions: bool = False) -> str:
    """Check every row before training (a stream: its first rows); return the dataset
    kind. Raises ``DataError``. ``empty_completions``: allow them (a policy's own samples,
    where an empty one is the policy stopping at once)."""
    check_one_split(dataset, name)
    kind = dataset_kind(dataset, name)
    if paired_loss and kind.endswith("unpaired"):
        raise DataError(
            f"{name} dataset is unpaired (prompt/completion/label) but loss {loss_names} needs "
            "pairs: give prompt/chosen/rejected columns, or use loss_type kto.")
    if kind.startswith("tokenized"):
        _check_token_ids(dataset, kind, name)
        return kind
    columns = PAIRED_COLUMNS if kind == "paired" else ("completion",)
    has_prompt = "prompt" in column_names(dataset)
    for row, example in rows_to_check(dataset):
        if has_prompt:
            _check_text(example["prompt"], "prompt", row, name, allow_empty=kind == "paired")
        for column in columns:
            _check_text(example[column], column, row, name, allow_empty=empty_completions)
            _check_completion_turns(example, column, has_prompt, row, name)
        if kind == "unpaired" and not isinstance(example["label"], bool):
            raise DataError(
                f"{name} dataset, row {row}, column 'label': expected True (desirable) or False "
                f"(undesirable), got {example['label']!r}. Map the labels to booleans.")
    return kind


SOFT_LABEL = "chosen_probability"  # P(chosen preferred): an AI judge's soft label (RLAIF)


def check_soft_labels(dataset, name: str = "train") -> bool:
    """Whether the dataset has soft labels (the ``chosen_probability`` column); each one
    must be a number in [0, 1]. Raises ``DataError`` naming the row."""
    if SOFT_LABEL not in column_names(dataset):
        return False
    for row, example in rows_to_check(dataset):
        p = example[SOFT_LABEL]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise DataError(f"{name} dataset, row {row}, column {SOFT_LABEL!r}: {p!r} is not a "
                            "probability in [0, 1] (P(chosen preferred), e.g. from "
                            "rlhf_ext.judges.label_samples). Fix or drop the row.")
    return True


def _check_token_ids(dataset, kind: str, name: str) -> None:
    """Pre-tokenized rows: each ``*_ids`` column a list of non-negative ints (a completion
    not empty), labels booleans."""
    columns = TOKENIZED_PAIRED if kind == "tokenized_paired" else TOKENIZED_UNPAIRED[:2]
    for row, example in rows_to_check(dataset):
        for column in columns:
            ids = example[column]
            if not isinstance(ids, list) or not all(isinstance(t, int) and t >= 0 for t in ids):
                raise DataError(f"{name} dataset, row {row}, column {column!r}: expected a list "
                                f"of token ids (non-negative ints), got {ids!r:.60}. Tokenize "
                                "the column, or give text columns instead.")
            if column != "prompt_ids" and not ids:
                raise DataError(f"{name} dataset, row {row}, column {column!r}: no tokens. Drop "
                                "the row.")
        if kind == "tokenized_unpaired" and not isinstance(example["label"], bool):
            raise DataError(f"{name} dataset, row {row}, column 'label': expected True or "
                            f"False, got {example['label']!r}. Map the labels to booleans.")


def validate_prompt_dataset(dataset, name: str = "train") -> None:
    """PPO's data: a 'prompt' column of strings or conversations (TRL's prompt-only
    formats). Raises ``DataError`` naming the row before any model work."""
    if "prompt" not in dataset.column_names:
        raise DataError(f"{name} dataset: PPO needs a 'prompt' column (prompt-only data, a "
                        f"string or a list of messages per row), found {dataset.column_names}; "
                        "rename the prompt column")
    for row, prompt in enumerate(dataset["prompt"]):
        _check_text(prompt, "prompt", row, name)
        if isinstance(prompt, list) and prompt and prompt[-1]["role"] == "assistant":
            raise DataError(f"{name} dataset, row {row}, column 'prompt': the conversation ends "
                            "with an assistant turn; a PPO prompt ends where the policy "
                            "answers. Drop that last message.")


def _check_room(example: dict, row: int, max_length: int | None, name: str,
                truncation_mode: str = "keep_start") -> dict:
    """Under keep_start a prompt must leave room for the completion within max_length;
    keep_end keeps the sequence's last max_length tokens, the completion's end always, so
    a long prompt only loses its beginning (TRL keeps these rows too)."""
    n = len(example["prompt_ids"])
    if max_length is not None and n >= max_length and truncation_mode == "keep_start":
        raise DataError(
            f"{name} dataset, row {row}, column 'prompt': {n} tokens, which leaves no room "
            f"for the completion within max_length={max_length}. Raise max_length, "
            "shorten or drop the prompt, or set truncation_mode='keep_end' to keep the "
            "sequence's end.")
    return {}


def _cut(prompt: list[int], completion: list[int], max_length: int | None,
         truncation_mode: str) -> list[int]:
    """prompt + completion as the collator truncates it."""
    ids = prompt + completion
    if max_length is None:
        return ids
    return ids[:max_length] if truncation_mode == "keep_start" else ids[-max_length:]


def warn_degenerate(dataset, max_length: int | None, truncation_mode: str = "keep_start",
                    name: str = "train") -> None:
    """Count rows a loss learns nothing from, and warn with the counts: pairs whose chosen
    and rejected are the same tokens, pairs that truncation makes the same, and unpaired
    data with one label only (tokenized rows)."""
    if "chosen_ids" in dataset.column_names:
        same = cut_same = 0
        for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]):
            if c == r:
                same += 1
            elif _cut(p, c, max_length, truncation_mode) == _cut(p, r, max_length,
                                                                 truncation_mode):
                cut_same += 1
        if same:
            warnings.warn(f"{name} dataset: {same} of {len(dataset)} pairs have identical chosen "
                          "and rejected completions; they carry no preference. Drop them.",
                          stacklevel=2)
        if cut_same:
            warnings.warn(f"{name} dataset: {cut_same} of {len(dataset)} pairs become identical "
                          f"once cut to max_length={max_length} ({truncation_mode}); raise "
                          "max_length or shorten the prompts.", stacklevel=2)
    elif "label" in dataset.column_names:
        desirable = sum(dataset["label"])
        if desirable in (0, len(dataset)):
            warnings.warn(f"{name} dataset: {desirable} desirable and "
                          f"{len(dataset) - desirable} undesirable rows; KTO needs both kinds "
                          "(its reference point and weights assume a mix).", stacklevel=2)


def model_limits(model) -> tuple[int | None, int | None]:
    """(vocabulary size, positions) of a model, None where it does not say."""
    vocab = getattr(model.get_input_embeddings(), "num_embeddings", None)
    config = getattr(model.config, "backbone_config", model.config)
    positions = getattr(config, "max_position_embeddings", None) or \
        getattr(config, "n_positions", None)
    return vocab, positions


def check_in_vocabulary(ids: list[int], vocab: int | None, where: str) -> None:
    """Token ids a model of ``vocab`` embeddings can look up; ``where`` names the row."""
    if vocab is not None and ids and max(ids) >= vocab:
        raise DataError(f"{where}: token id {max(ids)} is outside the model's vocabulary of "
                        f"{vocab}. The tokenizer is not the model's: load the model's own, or "
                        "resize the embeddings (model.resize_token_embeddings(len(tokenizer))).")


def check_fits_model(dataset, model, max_length: int | None, name: str = "train") -> None:
    """Token ids inside the model's vocabulary and sequences within its positions, checked
    on the tokenized rows before training (else step 1 fails with an index error); a
    stream's rows are tokenized as they are read, so they are not checked here."""
    if isinstance(dataset, IterableDataset):
        return
    vocab, positions = model_limits(model)
    columns = [c for c in ("prompt_ids", "chosen_ids", "rejected_ids", "completion_ids",
                           "kl_completion_ids") if c in dataset.column_names]
    prompts = list(dataset["prompt_ids"])
    longest, longest_row = 0, 0
    for column in columns:
        for row, ids in enumerate(dataset[column]):
            check_in_vocabulary(ids, vocab, f"{name} dataset, row {row}, column {column!r}")
            n = len(ids) + (0 if column == "prompt_ids" else len(prompts[row]))
            if n > longest:
                longest, longest_row = n, row
    if max_length is not None:
        longest = min(longest, max_length)
    if positions is not None and longest > positions:
        raise DataError(
            f"{name} dataset, row {longest_row}: {longest} tokens, more than the model's "
            f"{positions} positions. Set max_length={positions} or lower.")
