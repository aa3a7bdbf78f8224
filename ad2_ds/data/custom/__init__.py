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
(the message lists the file's columns), an empty split, a row without a label, an empty text, labels in
validation/test that the training data never shows, mixed label types in one column, a file that is not valid UTF-8,
a csv row with the wrong number of fields or a JSON line that does not parse (the message names its line), a hub that
cannot be reached, a metric module that cannot be loaded. Texts longer than a model takes are not an error:
:func:`~ad2_ds.data.glue.tokenize_dataset` truncates and counts them.
"""

from .files import check_utf8, peek_columns, read_file, read_hub
from .labels import align_teacher_labels, classifier_head, label_names, match_teacher_labels, set_label_names
from .options import FORMATS, HUB_SPLITS, LABEL_GUESSES, TASK_TYPES, TEXT_GUESSES, CustomData, DataError
from .task import build_task, check_custom_files, load_custom_task, make_spec, metrics_for, resolve_columns

__all__ = [
    "FORMATS", "HUB_SPLITS", "LABEL_GUESSES", "TASK_TYPES", "TEXT_GUESSES", "CustomData", "DataError",
    "align_teacher_labels", "build_task", "check_custom_files", "check_utf8", "classifier_head", "label_names",
    "load_custom_task", "make_spec", "match_teacher_labels", "metrics_for", "peek_columns", "read_file", "read_hub",
    "resolve_columns", "set_label_names",
]  # fmt: skip
