"""Datasets: loading, validation with errors that name the column, row and fix,
tokenization of preference data, and the collator."""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_dataset_any(name: str, config: str | None = None) -> Dataset | DatasetDict:
    """Load a dataset from a ``save_to_disk`` folder, a data file, or the Hub by name."""
    path = Path(name)
    if path.is_dir() and ((path / "dataset_info.json").exists()
                          or (path / "dataset_dict.json").exists()):
        return datasets.load_from_disk(str(path))
    if path.is_file() and path.suffix in _FILE_BUILDERS:
        return datasets.load_dataset(_FILE_BUILDERS[path.suffix], data_files=str(path),
                                     split="train")
    if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise FileNotFoundError(
            f"dataset {name!r}: no such file or folder (a Hub dataset id looks like 'org/name')")
    return datasets.load_dataset(name, name=config)


def train_eval_split(data: Dataset | DatasetDict, train_split: str = "train",
                     test_split: str = "test", eval_fraction: float = 0.0, seed: int = 0
                     ) -> tuple[Dataset, Dataset | None]:
    """(train, eval) from a Dataset or DatasetDict; a plain Dataset can lend ``eval_fraction``."""
    if isinstance(data, DatasetDict):
        if train_split not in data:
            raise KeyError(f"split {train_split!r} not found; the dataset has {list(data)}")
        return data[train_split], data.get(test_split)
    if eval_fraction > 0:
        parts = data.train_test_split(test_size=eval_fraction, seed=seed)
        return parts["train"], parts["test"]
    return data, None


# ---------------------------------------------------------------------------------------
# Preference data: validation (before anything else), tokenization, collation
# ---------------------------------------------------------------------------------------

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
                                name: str = "train") -> str:
    """Check every row before training (a stream: its first rows); return the dataset
    kind. Raises ``DataError``."""
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
            _check_text(example[column], column, row, name)
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


def _unpair_ids(batch: dict) -> dict:
    """Tokenized pairs -> tokenized labelled completions (chosen True, rejected False)."""
    n = len(batch["prompt_ids"])
    return {"prompt_ids": batch["prompt_ids"] * 2,
            "completion_ids": batch["chosen_ids"] + batch["rejected_ids"],
            "label": [True] * n + [False] * n}


def _cut_ids(example: dict, max_prompt_length: int | None,
             max_completion_length: int | None) -> dict:
    """max_prompt_length / max_completion_length on token ids (as for text)."""
    out = {}
    for column, ids in example.items():
        if column == "prompt_ids" and max_prompt_length is not None:
            out[column] = ids[len(ids) - min(max_prompt_length, len(ids)):]
        elif column.endswith("_ids") and column != "prompt_ids":
            out[column] = ids[:max_completion_length]
    return out


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


def as_replies(prompts: list, completions: list[str]) -> list:
    """Completions in the prompts' format: an assistant message after a conversation, the
    text itself after a string prompt (how a reward model saw its training pairs)."""
    return [[{"role": "assistant", "content": c}] if isinstance(p, list) else c
            for p, c in zip(prompts, completions)]


def _tokenize(tokenizer, value, generation_prompt: bool = False) -> list[int]:
    if isinstance(value, list):
        return tokenizer.apply_chat_template(value, tokenize=True, return_dict=True,
                                             add_generation_prompt=generation_prompt)["input_ids"]
    return tokenizer(text=value)["input_ids"]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_preference_row(example: dict, tokenizer, completions: tuple[str, ...],
                            max_prompt_length: int | None = None,
                            max_completion_length: int | None = None) -> dict:
    """prompt -> prompt_ids; each completion column c -> c_ids, split where the tokenized
    prompt and prompt + completion diverge (chat templates can render them differently).
    Standard-format completions get the eos token appended when they lack it. Then, as
    TRL's ``max_prompt_length`` / ``max_completion_length``: a prompt keeps its last
    tokens (those next to the completion), a completion its first."""
    prompt = example["prompt"]
    prompt_ids = _tokenize(tokenizer, prompt, generation_prompt=True)
    full = {}
    for c in completions:
        completion = example[c]
        if isinstance(completion, str) and not completion.endswith(tokenizer.eos_token):
            completion = completion + tokenizer.eos_token
        full[c] = _tokenize(tokenizer, prompt + completion)
    cut = min(_common_prefix(prompt_ids, ids) for ids in full.values())
    prompt_ids = prompt_ids[:cut]
    if max_prompt_length is not None:
        prompt_ids = prompt_ids[len(prompt_ids) - min(max_prompt_length, len(prompt_ids)):]
    return {"prompt_ids": prompt_ids,
            **{f"{c}_ids": full[c][cut:][:max_completion_length] for c in completions}}


def prepare_preference_dataset(dataset, tokenizer, *, kind: str, unpair: bool,
                               max_length: int | None, name: str = "train",
                               keep: tuple[str, ...] = (), truncation_mode: str = "keep_start",
                               max_prompt_length: int | None = None,
                               max_completion_length: int | None = None,
                               num_proc: int | None = None):
    """Validated rows -> token ids (paired: prompt/chosen/rejected_ids; unpaired:
    prompt/completion_ids, label and kl_completion_ids: the previous row's completion, the
    mismatched pairs of KTO's reference point). Fails when a prompt leaves no room.
    ``num_proc`` processes tokenize (TRL's ``dataset_num_proc``). Pre-tokenized rows
    (``kind`` tokenized_*) are only cut to the lengths; an IterableDataset is tokenized
    lazily, as the Trainer reads it (paired losses only)."""
    from trl.data_utils import extract_prompt, unpair_preference_dataset

    stream = isinstance(dataset, IterableDataset)
    if stream and (unpair or kind.endswith("unpaired")):
        raise DataError(f"{name} dataset is an IterableDataset, and KTO pairs each completion "
                        "with another row's for its reference point, which a stream cannot "
                        "give: load it into memory (streaming=False)")
    # a stream's map takes neither a progress label nor processes
    mapping = {} if stream else {"num_proc": num_proc}
    label = (lambda text: {}) if stream else (lambda text: {"desc": text})  # noqa: E731
    if kind.startswith("tokenized"):
        wanted = {*(TOKENIZED_PAIRED if kind == "tokenized_paired" else TOKENIZED_UNPAIRED),
                  *keep}
        dataset = dataset.remove_columns([c for c in column_names(dataset) if c not in wanted])
        if kind == "tokenized_paired" and unpair:
            dataset = dataset.map(_unpair_ids, batched=True, remove_columns=list(
                TOKENIZED_PAIRED), **mapping, **label(f"unpairing {name} dataset"))
            kind = "tokenized_unpaired"
        if max_prompt_length is not None or max_completion_length is not None:
            dataset = dataset.map(_cut_ids, **mapping, **label(f"cutting {name} dataset"),
                                  fn_kwargs={"max_prompt_length": max_prompt_length,
                                             "max_completion_length": max_completion_length})
        kind = kind.removeprefix("tokenized_")
    else:
        if kind == "paired" and "prompt" not in column_names(dataset):
            others = [c for c in column_names(dataset) if c not in (*PAIRED_COLUMNS, *keep)]
            dataset = dataset.map(extract_prompt, **mapping,
                                  **label(f"extracting {name} prompts"))
            if others and not stream:
                empty = sum(not len(p) for p in dataset["prompt"])
                if empty:
                    raise DataError(
                        f"{name} dataset: no 'prompt' column, and in {empty} of {len(dataset)} "
                        "rows chosen and rejected share no beginning, so their prompt would be "
                        f"empty while column(s) {others} are dropped. Rename the prompt column "
                        "to 'prompt'.")
        if kind == "paired" and unpair:
            dataset = unpair_preference_dataset(dataset)
            kind = "unpaired"
        completions = PAIRED_COLUMNS if kind == "paired" else ("completion",)
        kept = {*keep, "label"} if kind == "unpaired" else set(keep)
        dataset = dataset.map(tokenize_preference_row, **mapping,
                              **label(f"tokenizing {name} dataset"),
                              fn_kwargs={"tokenizer": tokenizer, "completions": completions,
                                         "max_prompt_length": max_prompt_length,
                                         "max_completion_length": max_completion_length},
                              remove_columns=[c for c in column_names(dataset) if c not in kept])
    if stream:
        return dataset if max_length is None else dataset.map(
            _check_room, with_indices=True, fn_kwargs={"max_length": max_length, "name": name})
    for row, ids in enumerate(dataset["prompt_ids"]):
        _check_room({"prompt_ids": ids}, row, max_length, name)
    warn_degenerate(dataset, max_length, truncation_mode, name)
    if kind == "unpaired":
        ids = list(dataset["completion_ids"])
        dataset = dataset.add_column("kl_completion_ids", ids[-1:] + ids[:-1])
    return dataset


def _check_room(example: dict, row: int, max_length: int | None, name: str) -> dict:
    """A prompt must leave room for the completion within max_length."""
    n = len(example["prompt_ids"])
    if max_length is not None and n >= max_length:
        raise DataError(
            f"{name} dataset, row {row}, column 'prompt': {n} tokens, which leaves no room "
            f"for the completion within max_length={max_length}. Raise max_length, "
            "shorten or drop the prompt.")
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


def _pad(rows: list[list[int]], value: int, multiple: int | None = None) -> torch.Tensor:
    width = max(len(r) for r in rows)
    if multiple:
        width = -(-width // multiple) * multiple
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


@dataclass
class PreferenceCollator:
    """Tokenized rows -> right-padded tensors.

    Paired rows give one batch of 2B sequences, the B chosen first then the B rejected, so
    one forward pass serves both. Unpaired rows give B sequences, plus ``kl_*`` tensors for
    the mismatched (prompt, previous completion) sequences. Precomputed reference log-probs
    (``ref_*`` columns), reward margins (``margin``) and soft labels
    (``chosen_probability``) pass through as tensors. With
    ``padding_free`` every group of sequences is one row without padding; with
    ``prefix_sharing`` each pair is one row [prompt | chosen | rejected] whose prompt is
    computed once (see ``logps.sequence_logps``).
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None
    padding_free: bool = False
    prefix_sharing: bool = False

    def shared_rows(self, prompts, chosen, rejected) -> dict:
        """One row per pair: the prompt once, then both completions, each cut as
        ``sequences`` would cut prompt + completion (keep_start keeps the prompts equal)."""
        limit = self.max_length or 10**9
        ids, segments, positions = [], [], []
        for p, c, r in zip(prompts, chosen, rejected):
            p = p[:limit]
            c, r = c[:limit - len(p)], r[:limit - len(p)]
            ids.append(p + c + r)
            segments.append([0] * len(p) + [1] * len(c) + [2] * len(r))
            positions.append(list(range(len(p) + len(c)))
                             + list(range(len(p), len(p) + len(r))))
        return {"input_ids": _pad(ids, self.pad_token_id, self.pad_to_multiple_of),
                "position_ids": _pad(positions, 0, self.pad_to_multiple_of),
                "segment_ids": _pad(segments, -1, self.pad_to_multiple_of),
                "completion_mask": _pad([[int(x > 0) for x in g] for g in segments], 0,
                                        self.pad_to_multiple_of)}

    def sequences(self, prompts, completions, prefix: str = "") -> dict:
        """Prompt + completion ids -> padded input_ids, attention_mask, completion_mask."""
        ids = [p + c for p, c in zip(prompts, completions)]
        mask = [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)]
        if self.max_length is not None:
            cut = (slice(None, self.max_length) if self.truncation_mode == "keep_start"
                   else slice(-self.max_length, None))
            ids, mask = [r[cut] for r in ids], [m[cut] for m in mask]
        if self.padding_free:  # one row, no padding: positions restart per sequence
            return {f"{prefix}input_ids": torch.tensor([sum(ids, [])]),
                    f"{prefix}position_ids": torch.tensor([[t for r in ids
                                                           for t in range(len(r))]]),
                    f"{prefix}completion_mask": torch.tensor([sum(mask, [])]),
                    f"{prefix}sequence_ids": torch.tensor([[i for i, r in enumerate(ids)
                                                           for _ in r]])}
        return {f"{prefix}input_ids": _pad(ids, self.pad_token_id, self.pad_to_multiple_of),
                f"{prefix}attention_mask": _pad([[1] * len(r) for r in ids], 0,
                                                self.pad_to_multiple_of),
                f"{prefix}completion_mask": _pad(mask, 0, self.pad_to_multiple_of)}

    def __call__(self, examples: list[dict]) -> dict:
        prompts = [e["prompt_ids"] for e in examples]
        if "chosen_ids" in examples[0] and self.prefix_sharing:
            batch = self.shared_rows(prompts, [e["chosen_ids"] for e in examples],
                                     [e["rejected_ids"] for e in examples])
        elif "chosen_ids" in examples[0]:
            batch = self.sequences(prompts + prompts, [e["chosen_ids"] for e in examples]
                                    + [e["rejected_ids"] for e in examples])
        else:
            batch = self.sequences(prompts, [e["completion_ids"] for e in examples])
            batch.update(self.sequences(prompts, [e["kl_completion_ids"] for e in examples],
                                         prefix="kl_"))
            batch["desirable"] = torch.tensor([bool(e["label"]) for e in examples])
        for key in examples[0]:
            if key.startswith("ref_") or key in ("margin", SOFT_LABEL):
                batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
        return batch
