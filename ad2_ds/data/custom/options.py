"""What the user's data options are: ``CustomData(train_file=..., validation_file=...)``, checked when built.

    data = CustomData(train_file="tickets/train.csv", validation_file="tickets/dev.csv", text_columns=("text",))

Also the names every part of :mod:`ad2_ds.data.custom` shares: :class:`DataError`, the readable formats and the column
guesses.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

PathLike = Union[str, os.PathLike]

# file suffix -> (datasets builder, builder options). Only empty fields count as missing: pandas would otherwise read
# texts such as "NA" or "null" as missing values.
FORMATS = {
    ".csv": ("csv", {"keep_default_na": False, "na_values": [""]}),
    ".tsv": ("csv", {"sep": "\t", "keep_default_na": False, "na_values": [""]}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
TEXT_GUESSES: Tuple[Tuple[str, ...], ...] = (
    ("sentence",),
    ("text",),
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question1", "question2"),
    ("question", "sentence"),
)
LABEL_GUESSES = ("label", "labels")
TASK_TYPES = ("classification", "regression")
HUB_SPLITS = {"train": ("train",), "dev": ("validation", "dev", "valid"), "test": ("test",)}


class DataError(ValueError):
    """Bad user data or data options: the message is one line saying what is wrong and what to do."""


@dataclass(frozen=True)
class CustomData:
    """Where a user's data is and how to read it (the ``--train_file`` ... flags of a run).

    train_file / validation_file (both needed) / test_file (optional, labelled): csv, tsv, json, jsonl or parquet;
        or dataset_name (+ dataset_config_name) for a Hugging Face hub dataset with train and validation splits.
    text_columns: one or two column names; () guesses. label_column: None guesses.
    task_type: "classification", "regression", or None (float labels mean regression).
    main_metric: the metric that picks checkpoints; None takes the task type's default.
    name: the task's name in results and paths; None: the training file's folder name, or the dataset name.
    """

    train_file: Optional[str] = None
    validation_file: Optional[str] = None
    test_file: Optional[str] = None
    dataset_name: Optional[str] = None
    dataset_config_name: Optional[str] = None
    text_columns: Tuple[str, ...] = ()
    label_column: Optional[str] = None
    task_type: Optional[str] = None
    main_metric: Optional[str] = None
    name: Optional[str] = None
    check_files: bool = field(default=True, compare=False, repr=False)  # False: the options only, not the files

    def __post_init__(self):
        object.__setattr__(self, "text_columns", tuple(self.text_columns or ()))
        files = {"train_file": self.train_file, "validation_file": self.validation_file, "test_file": self.test_file}
        if self.dataset_name and any(files.values()):
            raise DataError("pass either --dataset_name or --train_file/--validation_file/--test_file, not both")
        if not self.dataset_name:
            if not self.train_file or not self.validation_file:
                raise DataError("your own data needs --train_file and --validation_file (or --dataset_name)")
            for flag, path in files.items():
                if path is None:
                    continue
                suffix = Path(path).suffix.lower()
                if suffix not in FORMATS:
                    raise DataError(f"--{flag} {path}: unknown format {suffix!r}; use one of {', '.join(FORMATS)}")
                if self.check_files and not Path(path).is_file():
                    raise DataError(f"--{flag} {path}: no such file")
        elif self.dataset_config_name is not None and not self.dataset_config_name:
            raise DataError("--dataset_config_name is empty")
        if len(self.text_columns) > 2 or len(set(self.text_columns)) != len(self.text_columns):
            raise DataError(
                f"--text_column takes one column, or two for sentence pairs; got {list(self.text_columns)}"
            )
        if self.task_type not in (None, *TASK_TYPES):
            raise DataError(f"--task_type {self.task_type!r}: choose one of {', '.join(TASK_TYPES)}")

    @property
    def files(self) -> Dict[str, str]:
        """Split name -> file, for the files given (train, dev, test)."""
        out = {"train": self.train_file, "dev": self.validation_file, "test": self.test_file}
        return {k: v for k, v in out.items() if v}

    def fingerprint(self) -> str:
        """A hash of what a model trained on this data depends on: the train and validation files' bytes (or the hub
        dataset's name and configuration) and the column, task-type and metric options. The test file is left out:
        nothing is trained or chosen on it."""
        import hashlib

        h = hashlib.sha256()
        for key in ("dataset_name", "dataset_config_name", "text_columns", "label_column", "task_type", "main_metric"):
            h.update(f"{key}={getattr(self, key)!r};".encode())
        for split in ("train", "dev"):
            path = self.files.get(split)
            if path:
                h.update(f"{split}:".encode())
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
        return h.hexdigest()[:16]

    def task_name(self) -> str:
        if self.name:
            return self.name
        if self.dataset_name:
            return "-".join(p for p in (self.dataset_name.split("/")[-1], self.dataset_config_name) if p)
        return Path(self.train_file).resolve().parent.name or "custom"


def guess(candidates, columns: Sequence[str]) -> Optional[str]:
    return next((c for c in candidates if c in columns), None)
