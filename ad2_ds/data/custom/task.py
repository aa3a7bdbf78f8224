"""The user's data as a task: ``spec, raw = load_custom_task(data)``, a TaskSpec and splits train, dev[, test].

    spec, raw = load_custom_task(CustomData(train_file="tickets/train.csv", validation_file="tickets/dev.csv"))
    check_custom_files(data)       # the cheap checks (files, UTF-8, columns), before anything is loaded

Columns are resolved (given or guessed), labels read and checked (class names sorted, or float targets), the metrics
picked, and every split normalized to :func:`ad2_ds.data.glue.load_task`'s form.
"""

import dataclasses
import logging
import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from ad2_ds.data.tasks import TaskSpec

from .files import check_utf8, peek_columns, read_file, read_hub
from .options import FORMATS, LABEL_GUESSES, TEXT_GUESSES, CustomData, DataError, guess

logger = logging.getLogger(__name__)


def load_custom_task(data: CustomData) -> Tuple[TaskSpec, "datasets.DatasetDict"]:  # noqa: F821
    """The task's spec and its labelled splits (``train``, ``dev``[, ``test``]) in :func:`load_task`'s form."""
    if not data.check_files:
        data = dataclasses.replace(data, check_files=True)
    splits = read_hub(data) if data.dataset_name else {s: (p, read_file(p, s)) for s, p in data.files.items()}
    return build_task(data, splits)


def check_custom_files(data: CustomData) -> None:
    """The cheap checks, before anything is loaded: each file exists, is UTF-8 and has the text and label columns
    (read from its header: a csv/tsv's first line, a jsonl's first record, a parquet schema; a .json file is only
    checked when it is read). A hub dataset is checked when it is read. Raises :class:`DataError`."""
    if data.main_metric and data.main_metric not in BUILTIN_METRICS:  # a metric module: loads, or one line now
        from ad2_ds.metric_modules import load_metric_module

        load_metric_module(data.main_metric)
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

    spec = make_spec(data, text_cols, label_col, label_list, test="test" in splits, references=targets["dev"])
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
    label = data.label_column or guess(LABEL_GUESSES, columns)
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


BUILTIN_METRICS = ("accuracy", "f1", "macro_f1", "matthews_correlation", "pearson", "spearmanr")


def metrics_for(is_regression: bool, num_labels: int) -> Tuple[Tuple[str, ...], str]:
    """Metric names and the default main metric for a task type."""
    if is_regression:
        return ("pearson", "spearmanr"), "spearmanr"
    if num_labels == 2:
        return ("accuracy", "f1"), "accuracy"
    return ("accuracy", "macro_f1"), "accuracy"


def make_spec(data: CustomData, text_cols, label_col, label_list, test: bool, references=None) -> TaskSpec:
    """The task's spec. ``data.main_metric`` is a built-in metric, or an ``evaluate`` module
    (:mod:`ad2_ds.metric_modules`), tried once on ``references`` (the dev labels) to find the key of its score."""
    is_regression = label_list is None
    names, default = metrics_for(is_regression, 1 if is_regression else len(label_list))
    main, modules = data.main_metric or default, ()
    if main not in names and main not in BUILTIN_METRICS and references is not None:
        from ad2_ds.metric_modules import metric_key

        spec, main = main, metric_key(main, references, is_regression)
        if main in names:
            raise DataError(f"--metric {spec}: its score {main!r} is a built-in metric's name: pass --metric {main}")
        names, modules = (*names, main), ((main, spec),)
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
        metric_modules=modules,
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
    """The column as strings; an empty text (missing, "" or only spaces) is refused: the model would see only its
    special tokens and learn the label from nothing (in dev/test: score a guess), and it is most often a slip of the
    export (a shifted column, the wrong --text_column) that a warning lets pass unseen."""
    texts = ["" if v is None else str(v) for v in values]
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise DataError(
            f"{where}: example {empty[0] + 1}{more} has an empty {column!r}: drop or fill those rows, or pass the "
            "right --text_column"
        )
    return texts
