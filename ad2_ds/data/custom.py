"""A user's own labelled data as a task: files (csv, tsv, json, jsonl, parquet) or a hub dataset.

    data = CustomData(train_file="tickets/train.csv", validation_file="tickets/dev.csv", test_file="tickets/test.csv")
    spec, raw = load_custom_task(data)      # TaskSpec, DatasetDict: train, dev[, test]
    enc, truncated = tokenize_dataset(raw, tokenizer, max_length=128)          # as for a GLUE task
    teacher = align_teacher_labels(teacher, spec)    # teacher's head reordered to the data's labels (or one error)
    set_label_names(student.config, spec)            # id2label / label2id in the student's config.json

``raw`` has exactly the form :func:`ad2_ds.data.glue.load_task` gives: columns ``text_a``, ``text_b`` (two text
columns only), ``label`` (``ClassLabel`` over ``spec.label_list``, or float32 for regression) and ``idx`` (the
example's 0-based position in its file); splits ``train``, ``dev`` and, when a test file is given, ``test``
(``spec.test_split``). Everything else (tokenization, collation, metrics, teachers) works on it unchanged.

Columns: ``text_columns`` (one, or two for sentence pairs) and ``label_column`` are guessed when not given
(``sentence`` / ``text``, pairs ``sentence1``+``sentence2`` and the like; ``label`` / ``labels``). The label set is
read from the training data: string or integer labels, sorted (numerically for integers) so the order is stable
across runs and files; a float label column means regression (override with ``task_type``). Metrics: accuracy and
macro-F1 for three or more classes, F1 (of the second class) and accuracy for two, Pearson and Spearman for
regression; ``main_metric`` picks the one that selects checkpoints (default accuracy, Spearman for regression).

Every bad input raises :class:`DataError` (a ``ValueError``, which the recipes turn into one line and exit code 2)
before any model is loaded, and nothing is written: a missing file, an unknown format, a missing or misspelt column
(the message lists the file's columns), an empty split, a row without a label, labels in validation/test that the
training data never shows, mixed label types in one column, a file that is not valid UTF-8, a hub that cannot be
reached. Texts longer than a model takes are not an error: :func:`~ad2_ds.data.glue.tokenize_dataset` truncates and
counts them.
"""

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from ad2_ds.data.tasks import TaskSpec

logger = logging.getLogger(__name__)

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


def load_custom_task(data: CustomData) -> Tuple[TaskSpec, "datasets.DatasetDict"]:  # noqa: F821
    """The task's spec and its labelled splits (``train``, ``dev``[, ``test``]) in :func:`load_task`'s form."""
    if not data.check_files:
        data = dataclasses.replace(data, check_files=True)
    splits = _read_hub(data) if data.dataset_name else {s: (p, _read_file(p, s)) for s, p in data.files.items()}
    return build_task(data, splits)


def check_custom_files(data: CustomData) -> None:
    """The cheap checks, before anything is loaded: each file exists, is UTF-8 and has the text and label columns
    (read from its header: a csv/tsv's first line, a jsonl's first record, a parquet schema; a .json file is only
    checked when it is read). A hub dataset is checked when it is read. Raises :class:`DataError`."""
    if data.dataset_name:
        return
    data = dataclasses.replace(data, check_files=True)  # missing files and unknown formats
    text_cols = label_col = None
    for split, path in data.files.items():
        if Path(path).stat().st_size == 0:
            raise DataError(f"{path} has no examples: the {split} split is empty")
        if FORMATS[Path(path).suffix.lower()][0] != "parquet":
            check_utf8(path)
        columns = peek_columns(path)
        if columns is None:
            continue
        if text_cols is None and split == "train":
            text_cols, label_col = resolve_columns(data, path, columns)
        if text_cols is not None:
            missing = [c for c in (*text_cols, label_col) if c not in columns]
            if missing:
                raise DataError(f"{path}: no column {missing[0]!r}; its columns are {list(columns)}")


def peek_columns(path: PathLike) -> Optional[List[str]]:
    """A file's column names from its first line or schema; None where that takes reading the file (.json)."""
    import csv
    import json

    suffix = Path(path).suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f, delimiter="\t" if suffix == ".tsv" else ","), None)
        return header or None
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            line = next((ln for ln in f if ln.strip()), None)
        try:
            record = json.loads(line) if line else None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: its first record is not JSON: {_one_line(e)}") from None
        return list(record) if isinstance(record, dict) else None
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise DataError(f"{path}: could not read it as parquet: {_one_line(e)}") from e
    return None


def _read_file(path: PathLike, split: str) -> "datasets.Dataset":  # noqa: F821
    import datasets

    path = Path(path)
    if path.stat().st_size == 0:
        raise DataError(f"{path} has no examples: the {split} split is empty")
    builder, options = FORMATS[path.suffix.lower()]
    if builder != "parquet":
        check_utf8(path)
    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a user's file is read in a blink: no bars around a bad-data error line
    try:
        return datasets.load_dataset(builder, data_files={"train": str(path)}, split="train", **options)
    except Exception as e:  # pandas/pyarrow parse errors come in many types: one line naming the file for all
        if "corresponds to no data" in str(e):  # a header and no rows
            raise DataError(f"{path} has no examples: the {split} split is empty") from None
        raise DataError(f"{path}: could not read it as {path.suffix[1:]}: {_one_line(e)}") from e
    finally:
        if not quiet:
            datasets.enable_progress_bars()


def check_utf8(path: PathLike) -> None:
    """Raise :class:`DataError` naming the first line that is not valid UTF-8."""
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path} line {line} is not valid UTF-8 (byte {data[e.start : e.start + 1]!r}): re-save the file as UTF-8"
        ) from None


def _read_hub(data: CustomData) -> Dict[str, Tuple[str, "datasets.Dataset"]]:  # noqa: F821
    import datasets

    where = data.dataset_name + (f" ({data.dataset_config_name})" if data.dataset_config_name else "")
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # no line per retry of an unreachable hub: the one error below says it
    try:
        raw = datasets.load_dataset(data.dataset_name, data.dataset_config_name)
    except Exception as e:  # offline machines fail in many ways (DNS, HF_HUB_OFFLINE, proxy): one message for all
        raise DataError(
            f"could not load {where} from the Hugging Face hub: {_one_line(e)}; without hub access pass "
            "--train_file and --validation_file"
        ) from e
    finally:
        hub_logger.setLevel(level)
    out = {}
    for split, names in HUB_SPLITS.items():
        name = next((n for n in names if n in raw), None)
        if name is None and split != "test":
            raise DataError(f"{where} has no {split} split (it has {list(raw)}): pass files instead")
        if name is None:
            continue
        ds = raw[name]
        label = data.label_column or _guess(LABEL_GUESSES, ds.column_names)
        if split == "test" and label in ds.column_names and _unlabelled(ds, label):
            logger.info("%s: the test split has no labels (all -1 or empty): not scored", where)
            continue
        out[split] = (f"{where} {name}", ds)
    return out


def _unlabelled(ds, label: str) -> bool:
    values = ds[label]
    return all(v is None or v == -1 for v in values)


def _guess(candidates, columns: Sequence[str]) -> Optional[str]:
    return next((c for c in candidates if c in columns), None)


def build_task(data: CustomData, splits: Dict[str, Tuple[str, "datasets.Dataset"]]):  # noqa: F821
    """Spec and normalized DatasetDict from raw splits ``{"train": (where, Dataset), "dev": ..., "test": ...}``."""
    import datasets

    from ad2_ds.data.glue import task_features

    train_where, train = splits["train"]
    text_cols, label_col = resolve_columns(data, train_where, train.column_names)
    for split, (where, ds) in splits.items():
        missing = [c for c in (*text_cols, label_col) if c not in ds.column_names]
        if missing:
            raise DataError(f"{where}: no column {missing[0]!r}; its columns are {ds.column_names}")
        if len(ds) == 0:
            raise DataError(f"{where} has no examples: the {split} split is empty")

    feature = train.features[label_col]
    class_names = tuple(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    is_regression = data.task_type == "regression" or (
        data.task_type is None and class_names is None and _is_float_column(feature)
    )
    labels = {split: _labels(where, ds[label_col], label_col) for split, (where, ds) in splits.items()}
    if is_regression:
        targets = {split: _floats(splits[split][0], values) for split, values in labels.items()}
        label_list = None
    else:
        if class_names is None:
            keys = {split: _class_keys(splits[split][0], values) for split, values in labels.items()}
            label_list = _sorted_labels(keys["train"])
        else:
            label_list = class_names
            keys = {split: [class_names[v] if isinstance(v, int) else str(v) for v in values]
                    for split, values in labels.items()}  # fmt: skip
        if len(label_list) < 2:
            raise DataError(
                f"{train_where}: only one label ({label_list[0]!r}) in the training data; need two or more"
            )
        index = {name: i for i, name in enumerate(label_list)}
        for split, values in keys.items():
            unseen = sorted(set(values) - set(index))
            if unseen:
                raise DataError(
                    f"{splits[split][0]}: labels {unseen[:5]} never appear in the training data {train_where}, "
                    f"whose labels are {list(label_list)[:20]}: drop those rows or add training examples"
                )
        targets = {split: [index[v] for v in values] for split, values in keys.items()}

    spec = make_spec(data, text_cols, label_col, label_list, test="test" in splits)
    features = task_features(spec)
    out = {}
    for split, (where, ds) in splits.items():
        cols = {name: _texts(where, ds[c], c) for name, c in zip(("text_a", "text_b"), text_cols)}
        cols["label"] = targets[split]
        cols["idx"] = list(range(len(ds)))
        out[split] = datasets.Dataset.from_dict(cols, features=features)
    logger.info(
        "%s: %s, %s; %s",
        spec.name,
        "regression" if is_regression else f"{len(label_list)} classes {list(label_list)[:10]}",
        f"text {list(text_cols)}, label {label_col!r}",
        ", ".join(f"{s} {len(d)}" for s, d in out.items()),
    )
    return spec, datasets.DatasetDict(out)


def resolve_columns(data: CustomData, where: str, columns: Sequence[str]) -> Tuple[Tuple[str, ...], str]:
    """The text column(s) and the label column: the given ones (checked), else the first guess present."""
    label = data.label_column or _guess(LABEL_GUESSES, columns)
    if label is None:
        raise DataError(f"{where}: no label column found (tried {list(LABEL_GUESSES)}); pass --label_column, one of "
                        f"{list(columns)}")  # fmt: skip
    if label not in columns:
        raise DataError(f"{where}: no column {label!r} (--label_column); its columns are {list(columns)}")
    texts = data.text_columns or next((g for g in TEXT_GUESSES if all(c in columns for c in g)), None)
    if texts is None:
        raise DataError(
            f"{where}: no text column found (tried {[g[0] if len(g) == 1 else '+'.join(g) for g in TEXT_GUESSES]}); "
            f"pass --text_column (two for pairs), from {list(columns)}"
        )
    for c in texts:
        if c not in columns:
            raise DataError(f"{where}: no column {c!r} (--text_column); its columns are {list(columns)}")
    if label in texts:
        raise DataError(f"column {label!r} is both a text column and the label column")
    return tuple(texts), label


def metrics_for(is_regression: bool, num_labels: int) -> Tuple[Tuple[str, ...], str]:
    """Metric names and the default main metric for a task type."""
    if is_regression:
        return ("pearson", "spearmanr"), "spearmanr"
    if num_labels == 2:
        return ("accuracy", "f1"), "accuracy"
    return ("accuracy", "macro_f1"), "accuracy"


def make_spec(data: CustomData, text_cols, label_col, label_list, test: bool) -> TaskSpec:
    is_regression = label_list is None
    names, default = metrics_for(is_regression, 1 if is_regression else len(label_list))
    main = data.main_metric or default
    if main not in names:
        raise DataError(f"--main_metric {main!r} is not computed for this task: choose one of {list(names)}")
    return TaskSpec(
        name=data.task_name(),
        text_columns=tuple(text_cols),
        label_column=label_col,
        label_list=None if is_regression else tuple(label_list),
        tsv_label_values=None if is_regression else tuple(label_list),
        is_regression=is_regression,
        metric_names=names,
        main_metric=main,
        dev_splits=("dev",),
        test_split="test" if test else None,
    )


def _is_float_column(feature) -> bool:
    return getattr(feature, "dtype", "").startswith("float")


def _labels(where: str, values: list, column: str) -> list:
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            raise DataError(f"{where}: example {i + 1} has no {column!r} value: fill or drop that row")
    return values


def _floats(where: str, values: list) -> List[float]:
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        bad = next(v for v in values if not _is_number(v))
        raise DataError(f"{where}: label {bad!r} is not a number, but the task is a regression") from None


def _is_number(v) -> bool:
    if isinstance(v, bool):
        return False
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def _class_keys(where: str, values: list) -> List[str]:
    """Class labels as strings: integers (or integral floats) as their decimal form, strings as they are."""
    kinds = {"number" if _is_number(v) else "string" for v in values}
    if len(kinds) > 1:
        num = next(v for v in values if _is_number(v))
        text = next(v for v in values if not _is_number(v))
        raise DataError(f"{where}: mixed label types in one column ({num!r} and {text!r}): use one kind of label")
    if kinds == {"number"}:
        floats = [float(v) for v in values]
        bad = next((v for v, f in zip(values, floats) if not f.is_integer()), None)
        if bad is not None:
            raise DataError(
                f"{where}: label {bad!r} is not a whole number: pass --task_type regression for float targets"
            )
        return [str(int(f)) for f in floats]
    return [str(v) for v in values]


def _sorted_labels(keys: Sequence[str]) -> Tuple[str, ...]:
    names = set(keys)
    if all(_is_number(k) for k in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


def _texts(where: str, values: list, column: str) -> List[str]:
    empty = sum(v is None for v in values)
    if empty:
        logger.warning("%s: %d examples have an empty %r; read as empty texts", where, empty, column)
    return ["" if v is None else str(v) for v in values]


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def label_names(config) -> Optional[List[str]]:
    """A HF config's class names in id order, or None when they are the default ``LABEL_0``, ``LABEL_1``, ..."""
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(config.num_labels)]
    if all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return names


def match_teacher_labels(teacher_config, spec: TaskSpec) -> Optional[Tuple[int, ...]]:
    """Which teacher output serves each of the data's labels: None when they already agree, else ``order`` with
    ``logits_t[:, order]`` in the data's label order.

    Same names in another order: remapped (logged). Unnamed teacher labels (``LABEL_k``) of the right count: by
    position, with a warning. Anything else: :class:`DataError`.
    """
    n_t = teacher_config.num_labels
    if spec.is_regression:
        if n_t != 1:
            raise DataError(f"{spec.name} is a regression but the teacher predicts {n_t} labels; it needs 1")
        return None
    data_names = list(spec.label_list)
    names = label_names(teacher_config)
    if names is None:
        if n_t != len(data_names):
            raise DataError(
                f"the teacher predicts {n_t} unnamed labels but {spec.name} has {len(data_names)}: {data_names}"
            )
        logger.warning(
            "the teacher's labels are unnamed (LABEL_0..LABEL_%d): mapped by position to %s", n_t - 1, data_names
        )
        return None
    if sorted(names) != sorted(data_names):
        raise DataError(
            f"the teacher's labels {names} are not the data's labels {data_names}: use a teacher trained on this "
            "label set, or drop --teacher to fine-tune one"
        )
    if names == data_names:
        return None
    order = tuple(names.index(n) for n in data_names)
    logger.info("the teacher's labels %s are the data's in another order: remapped to %s", names, data_names)
    return order


def align_teacher_labels(model, spec: TaskSpec):
    """Check a teacher model's labels against the data's (:func:`match_teacher_labels`); when only the order
    differs, reorder its classification head's output rows in place so that it predicts in the data's order.
    Returns the model, whose config then names the data's labels."""
    order = match_teacher_labels(model.config, spec)
    if order is not None:
        head = classifier_head(model)
        with _no_grad():
            head.weight.copy_(head.weight[list(order)].clone())
            if head.bias is not None:
                head.bias.copy_(head.bias[list(order)].clone())
    if not spec.is_regression:
        set_label_names(model.config, spec)
    return model


def classifier_head(model):
    """The last ``nn.Linear`` whose outputs are the class logits (``classifier``, ``classifier.out_proj``, ...)."""
    from torch import nn

    n = model.config.num_labels
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == n]
    if not heads:
        raise DataError(f"no linear layer with {n} outputs in {type(model).__name__}: cannot reorder its labels")
    return heads[-1]


def _no_grad():
    import torch

    return torch.no_grad()


def set_label_names(config, spec: TaskSpec) -> None:
    """Write the task's labels into a model config (``id2label`` / ``label2id``, saved in config.json)."""
    if spec.is_regression:
        config.num_labels = 1
        config.problem_type = "regression"
        return
    config.id2label = {i: name for i, name in enumerate(spec.label_list)}
    config.label2id = {name: i for i, name in enumerate(spec.label_list)}
