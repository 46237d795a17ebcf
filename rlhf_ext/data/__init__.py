"""Datasets: loading any local or Hub dataset, validation with errors that name the column,
row and fix (``validation``), tokenization of preference data and the collator
(``preparation``)."""

from __future__ import annotations

from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict

from .preparation import (
    PreferenceCollator,
    _pad,
    as_replies,
    prepare_preference_dataset,
    tokenize_preference_row,
)
from .validation import (
    SOFT_LABEL,
    DataError,
    check_fits_model,
    check_in_vocabulary,
    check_one_split,
    check_soft_labels,
    column_names,
    dataset_kind,
    model_limits,
    rows_to_check,
    validate_preference_dataset,
    validate_prompt_dataset,
    warn_degenerate,
)

__all__ = [
    "DataError",
    "PreferenceCollator",
    "SOFT_LABEL",
    "_pad",
    "as_replies",
    "check_fits_model",
    "check_in_vocabulary",
    "check_one_split",
    "check_soft_labels",
    "column_names",
    "dataset_kind",
    "model_limits",
    "prepare_preference_dataset",
    "rows_to_check",
    "tokenize_preference_row",
    "validate_preference_dataset",
    "validate_prompt_dataset",
    "warn_degenerate",
    "load_dataset_any",
    "train_eval_split",
]

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
