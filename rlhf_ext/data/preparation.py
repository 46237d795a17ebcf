"""Preference data made into model input: tokenization (chat templates, the
prompt/completion boundary, truncation), unpairing for unpaired losses, and the collator
(padded rows, padding-free or prefix-shared layouts)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from datasets import IterableDataset

from .validation import (
    PAIRED_COLUMNS,
    SOFT_LABEL,
    TOKENIZED_PAIRED,
    TOKENIZED_UNPAIRED,
    DataError,
    _check_room,
    column_names,
    warn_degenerate,
)


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
            _check_room, with_indices=True, fn_kwargs={"max_length": max_length, "name": name,
                                                      "truncation_mode": truncation_mode})
    for row, ids in enumerate(dataset["prompt_ids"]):
        _check_room({"prompt_ids": ids}, row, max_length, name, truncation_mode)
    warn_degenerate(dataset, max_length, truncation_mode, name)
    if kind == "unpaired":
        ids = list(dataset["completion_ids"])
        dataset = dataset.add_column("kl_completion_ids", ids[-1:] + ids[:-1])
    return dataset


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
    computed once, and with both, all the pairs are one such row after another (see
    ``logps.sequence_logps``).
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
        if self.padding_free:  # one row; sequence_ids: each token's pair
            return {"input_ids": torch.tensor([sum(ids, [])]),
                    "position_ids": torch.tensor([sum(positions, [])]),
                    "segment_ids": torch.tensor([sum(segments, [])]),
                    "completion_mask": torch.tensor([[int(x > 0) for g in segments
                                                      for x in g]]),
                    "sequence_ids": torch.tensor([[i for i, g in enumerate(segments)
                                                   for _ in g]])}
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
