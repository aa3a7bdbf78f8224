"""What a run is: ``RunConfig`` (data, models, objective, teacher placement, training, paths) and ``DataConfig``.

    from ad2_ds.run_config import DataConfig, RunConfig
    from ad2_ds.config import AD2Config

    config = RunConfig(deepspeed="ds_configs/zero2.json", data=DataConfig(task="movie-polarity"),
                       objective=AD2Config(method="ad2"), output_dir="runs/distill")

Both are frozen and check their own values when built (a bad value raises :class:`ad2_ds.config.ConfigError`);
checks against the world (files, the DeepSpeed JSON, the output folder, the ranks) are :mod:`ad2_ds.run_checks`.
Every field's help text and flag live in its metadata (:mod:`ad2_ds.flags`), so the recipes only turn flags into a
``RunConfig``.
"""

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple, Union

from .config import AD2Config, ConfigError
from .flags import setting, walk

RUN_FILES = ("results.json", "checkpoints", "best")


def _ranks(spec):
    """``"0,1"`` -> ``(0, 1)``; several teachers, one rank group each: ``"0/1"`` -> ``((0,), (1,))``, ``"0,1/"`` ->
    ``((0, 1), ())`` (an empty group: that member runs co-located). Lists (from JSON) as tuples."""
    from .dist import parse_ranks

    if isinstance(spec, str) and "/" in spec:
        return tuple(parse_ranks(g) for g in spec.split("/"))
    if isinstance(spec, (list, tuple)):
        if any(isinstance(g, (list, tuple)) for g in spec):
            return tuple(tuple(int(r) for r in g) for g in spec)
        return tuple(int(r) for r in spec)
    return parse_ranks(spec)


def _per_member(kind):
    """``"2"`` -> 2 (one value for every teacher); ``"1,2"`` -> (1, 2) (one per teacher, in --teacher order)."""

    def parse(spec):
        values = tuple(kind(v.strip()) for v in str(spec).split(","))
        return values[0] if len(values) == 1 else values

    parse.__name__ = kind.__name__  # argparse names the type in its error line
    return parse


def _floats(spec) -> Tuple[float, ...]:
    if isinstance(spec, str):
        spec = spec.split(",")
    return tuple(float(v) for v in spec)


def _columns(spec) -> Tuple[str, ...]:
    """``"q,doc"`` (or a list) -> ``("q", "doc")``: one text column, or two for sentence pairs."""
    if isinstance(spec, str):
        spec = spec.split(",")
    return tuple(c.strip() for c in spec if c.strip())


@dataclass(frozen=True)
class DataConfig:
    """Which data a run trains and evaluates on: a registered task (GLUE or offline), or the user's own labelled
    data (``train_file`` + ``validation_file`` [+ ``test_file``], or ``dataset_name``; read by
    :mod:`ad2_ds.data.custom`, which then replaces ``task``)."""

    task: str = setting("movie-polarity", "a GLUE task (sst2, mnli, ...) or an offline task")
    train_file: Optional[str] = setting(
        None, "your own data: training file (csv, tsv, json, jsonl, parquet); replaces --task"
    )
    validation_file: Optional[str] = setting(None, "your own data: labelled file that picks the best student")
    test_file: Optional[str] = setting(
        None, "your own data: labelled file the best student is scored on once", teacher_outputs=False
    )
    dataset_name: Optional[str] = setting(None, "your own data: a Hugging Face hub dataset instead of files")
    dataset_config_name: Optional[str] = setting(None, "the hub dataset's configuration")
    text_column: Tuple[str, ...] = setting(
        (), "your own data: the text column, or two (A,B) for pairs; default: a guess", parse=_columns,
        metavar="COL[,COL]",
    )  # fmt: skip
    label_column: Optional[str] = setting(None, "your own data: the label column; default: label or labels")
    task_type: Optional[str] = setting(
        None, "your own data: default: float labels are a regression", choices=("classification", "regression")
    )
    metric: Optional[str] = setting(
        None,
        "your own data: the metric that picks the best student, built-in or an evaluate module (a local "
        "folder or .py, or a hub name); default: accuracy (spearmanr: regression)",
    )
    data_dir: Optional[str] = setting(
        None, "GLUE-format data dir; default: HF datasets for GLUE, the packaged suite offline"
    )
    max_seq_length: int = setting(64)
    max_train_samples: int = setting(2000, "0: the whole train split")
    max_eval_samples: int = setting(0, "0: the whole dev split", teacher_outputs=False)
    test_from_train: float = setting(
        0.0, "a GLUE task: move a fixed hash-chosen fraction of train into a labelled test split, scored once with "
        "the student chosen on dev (GLUE's own test labels are hidden); 0: none", teacher_outputs="unless default",
    )  # fmt: skip
    augment_copies: int = setting(
        0, "text-editing baseline: add N WordNet synonym-replaced copies of every training example (TinyBERT's xN)"
    )
    augment_alpha: float = setting(0.1, "EDA's alpha: each copy replaces max(1, alpha x words) words")
    augment_seed: int = setting(0, "seed of the copies (fixed: all methods see the same)")
    wordnet_dir: Optional[str] = setting(
        None, "WordNet 3.0 database folder; default: $WORDNET_DIR or /usr/share/wordnet (wordnet-base)"
    )

    def __post_init__(self):
        object.__setattr__(self, "text_column", _columns(self.text_column or ()))
        if self.is_custom:
            self.custom()  # the data options checked together (files are looked at by check_run)
            if self.data_dir:
                raise ConfigError("data_dir", "is for GLUE-format tasks: with train_file / dataset_name drop it")
        elif any((self.validation_file, self.test_file, self.text_column, self.label_column, self.task_type,
                  self.metric, self.dataset_config_name)):  # fmt: skip
            raise ConfigError("train_file", "(or dataset_name) is needed for the other options of your own data")
        if self.max_seq_length < 8:
            raise ConfigError("max_seq_length", f"must be >= 8, got {self.max_seq_length}")
        if self.max_train_samples < 0 or self.max_eval_samples < 0:
            raise ConfigError("max_train_samples", "and max_eval_samples must be >= 0 (0: the whole split)")
        if self.augment_copies < 0:
            raise ConfigError("augment_copies", f"must be >= 0, got {self.augment_copies}")
        if self.test_from_train:
            self._check_test_from_train()
        if not 0.0 < self.augment_alpha <= 1.0:
            raise ConfigError("augment_alpha", f"must be in (0, 1], got {self.augment_alpha}")

    def _check_test_from_train(self) -> None:
        from .data.tasks import get_task

        if not 0.0 < self.test_from_train < 1.0:
            raise ConfigError("test_from_train", f"must be in (0, 1), got {self.test_from_train}")
        if self.is_custom:
            raise ConfigError("test_from_train", "is for GLUE tasks: your own data's test split is --test_file")
        try:
            task = get_task(self.task)
        except ValueError:
            return  # the task check says what is wrong
        if task.test_split:
            raise ConfigError("test_from_train", f"{task.name} already has a labelled test split: drop the flag")

    @property
    def is_custom(self) -> bool:
        """True for the user's own data (files or a hub dataset) rather than a registered task."""
        return bool(self.train_file or self.dataset_name)

    def custom(self, check_files: bool = False):
        """The user's data options as :class:`ad2_ds.data.custom.CustomData` (check_files: also that the files
        exist and are readable); raises :class:`~ad2_ds.data.custom.DataError`."""
        from .data.custom import CustomData

        return CustomData(
            train_file=self.train_file,
            validation_file=self.validation_file,
            test_file=self.test_file,
            dataset_name=self.dataset_name,
            dataset_config_name=self.dataset_config_name,
            text_columns=self.text_column,
            label_column=self.label_column,
            task_type=self.task_type,
            main_metric=self.metric,
            check_files=check_files,
        )


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs: data, models, the objective, teacher placement and precision, training and paths."""

    deepspeed: Union[str, dict, None] = setting(
        None, "DeepSpeed JSON (the transformers convention); in Python also the JSON as a dict", teacher_outputs=False
    )
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    teacher: Union[str, Tuple[str, ...], None] = setting(
        None, "fine-tuned teacher (path or hub name), or all-mpnet-base-v2 to fine-tune that here; repeat the flag "
        "for an ensemble (--teacher A --teacher B); default: all-MiniLM-L6-v2 fine-tuned here", repeat=True,
        metavar="PATH",
    )  # fmt: skip
    teacher_weights: Tuple[float, ...] = setting(
        (), "several teachers: their weights in the target, in --teacher order (W,W); default: equal",
        parse=_floats, metavar="W,W", teacher_outputs=False,
    )  # fmt: skip
    teacher_rule: str = setting(
        "mean", "several teachers: mean (weighted mean of the probabilities at the temperature) or confidence "
        "(ours: per example, weights x each member's max probability)", choices=("mean", "confidence"),
        teacher_outputs=False,
    )  # fmt: skip
    hidden_source_teacher: Optional[str] = setting(
        None, "several teachers with deep KD: the member (its --teacher value, or its 0-based index) whose hidden "
        "states the student matches", teacher_outputs=False,
    )  # fmt: skip
    student: Optional[str] = setting(None, "student checkpoint (path or hub name); or use --student_layers")
    student_layers: str = setting("bottom:3", "student made from the teacher: skip|top|bottom:N")
    objective: AD2Config = dataclasses.field(default_factory=AD2Config)
    num_train_epochs: int = setting(3, teacher_outputs=False)
    eval_steps: int = setting(0, "optimizer steps between evaluations; 0: each epoch", teacher_outputs=False)
    seed: int = setting(42, teacher_outputs=False)
    output_dir: str = setting("runs/distill", teacher_outputs=False)
    overwrite_output_dir: bool = setting(False, teacher_outputs=False)
    resume: bool = setting(False, "continue the run in --output_dir from its last checkpoint", teacher_outputs=False)
    teacher_tp_size: Union[int, Tuple[int, ...]] = setting(
        1, "tensor-parallel degree; several teachers: one for all or one per teacher (1,2)", parse=_per_member(int)
    )
    teacher_ranks: Union[Tuple[int, ...], Tuple[Tuple[int, ...], ...]] = setting(
        (),
        "hosted layout: the teacher runs on these ranks (tensor-parallel over them when several) and serves the "
        "student, which trains on the other ranks; default: co-located (every rank holds both). Several teachers: "
        "one rank group per teacher, separated by / (0/1: the first on rank 0, the second on rank 1; 0,1/: the "
        "first over ranks 0 and 1, the second co-located)",
        parse=_ranks,
        metavar="R,R[/R,R]",
    )
    teacher_dtype: Union[str, Tuple[str, ...]] = setting(
        "fp32", "fp32, bf16 or fp16; several teachers: one for all or one per teacher (fp32,bf16)",
        parse=_per_member(str), metavar="DTYPE",
    )  # fmt: skip
    teacher_cache: Union[str, Tuple[str, ...], None] = setting(
        None, "precompute teacher outputs once into DIR and read them; several teachers: one DIR per teacher "
        "(DIR,DIR; each member's cache is its own)", parse=_per_member(str),
    )  # fmt: skip
    rebuild_teacher_cache: bool = setting(
        False, "build --teacher_cache anew even when one is there (stale or damaged)", teacher_outputs=False
    )
    stream_teacher: bool = setting(
        True, "run the teacher inline instead of one batch ahead", negate=True, teacher_outputs=False
    )
    group_by_length: bool = setting(True, negate=True, teacher_outputs=False)
    keep_zero_stage: bool = setting(
        False,
        "on one data-parallel rank, keep the config's ZeRO stage 1/2 (default: run stage 0, which partitions the "
        "same nothing without copying gradients and weights each step)",
        teacher_outputs=False,
    )
    teacher_epochs: int = setting(3, "epochs when fine-tuning the default teacher")
    teacher_seed: Union[int, Tuple[int, ...]] = setting(
        42, "seed when fine-tuning the default teacher (fixed, so a sweep over --seed shares one teacher); several "
        "teachers: one for all or one per teacher (42,43: two default teachers of different seeds)",
        parse=_per_member(int),
    )  # fmt: skip
    trust_remote_code: bool = setting(False)
    progress: bool = setting(True, negate=True, teacher_outputs=False)
    progress_label: str = setting("", "the progress bar's label; '': distill (fine-tune for method finetune)",
                                  cli=False, teacher_outputs=False)  # fmt: skip

    def __post_init__(self):
        object.__setattr__(self, "teacher_ranks", _ranks(self.teacher_ranks))
        cfg = self.objective
        self.train_config()  # checks the epochs and the evaluation interval
        from .members import check_members

        check_members(self)  # several teachers (and the per-member flags' counts); one: normalized as before
        ranks = self.teacher_ranks if len(self.teachers) <= 1 else ()  # several: checked per member there
        for tp in self.teacher_tp_size if isinstance(self.teacher_tp_size, tuple) else (self.teacher_tp_size,):
            if tp < 1:
                raise ConfigError("teacher_tp_size", f"must be >= 1, got {tp}")
        for dtype in self.teacher_dtype if isinstance(self.teacher_dtype, tuple) else (self.teacher_dtype,):
            if dtype not in ("fp32", "bf16", "fp16"):
                raise ConfigError("teacher_dtype", f"{dtype!r}: use fp32, bf16 or fp16")
        if not self.student:
            strategy, _, n = self.student_layers.partition(":")
            if strategy not in ("skip", "top", "bottom") or not n.isdigit() or int(n) < 1:
                raise ConfigError("student_layers", f"{self.student_layers!r}: use skip|top|bottom:N, e.g. bottom:3")
        if ranks:
            from .dist import check_teacher_ranks

            check_teacher_ranks(ranks)
            if self.teacher_tp_size not in (1, len(ranks)):
                raise ConfigError(
                    "teacher_tp_size", "with teacher_ranks the teacher is tensor-parallel over those ranks"
                )
            if self.teacher_cache:
                raise ConfigError("teacher_cache", "and teacher_ranks exclude each other: pick one")
            if not cfg.needs_teacher:
                raise ConfigError("teacher_ranks", f"method {cfg.method} uses no teacher; drop teacher_ranks")
        if cfg.mixup:
            from .mixup import check_mixup_teacher

            check_mixup_teacher(self)  # a cache, hosted or tensor-parallel teacher cannot label new mixed points
        if self.rebuild_teacher_cache and not self.teacher_cache:
            raise ConfigError("rebuild_teacher_cache", "rebuilds the cache in --teacher_cache DIR: pass that too")
        if self.teacher_cache and cfg.needs_attentions:
            raise ConfigError(
                "teacher_cache", "stores logits and hidden states, not attention maps: drop it or set w_attention to 0"
            )

    def train_config(self):
        """The loop's settings (:class:`ad2_ds.trainer.TrainConfig`), which check themselves."""
        from .trainer import TrainConfig

        return TrainConfig(
            output_dir=self.output_dir,
            num_train_epochs=self.num_train_epochs,
            eval_steps=self.eval_steps,
            seed=self.seed,
            group_by_length=self.group_by_length,
            stream_teacher=self.stream_teacher,
            progress=self.progress,
            label=self.progress_label or ("fine-tune" if self.objective.method == "finetune" else "distill"),
        )

    def to_dict(self) -> dict:
        """The config as plain JSON data (nested like the dataclasses); :meth:`from_dict` reads it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        d = dict(d)
        d["data"] = DataConfig(**d.get("data", {}))
        d["objective"] = AD2Config(**d.get("objective", {}))
        d["teacher_ranks"] = _ranks(d.get("teacher_ranks", ()))
        from .members import PER_MEMBER

        for name in ("teacher", "teacher_weights", *PER_MEMBER):
            if isinstance(d.get(name), list):  # JSON has no tuples
                d[name] = tuple(d[name])
        return cls(**d)

    @property
    def teachers(self) -> Tuple[str, ...]:
        """The given teachers in --teacher order (empty: the default teacher, or none)."""
        return self.teacher if isinstance(self.teacher, tuple) else (self.teacher,) if self.teacher else ()

    def member_configs(self) -> Tuple["RunConfig", ...]:
        """Several teachers: one single-teacher RunConfig per member (its own path, tp size, dtype, cache), so a
        member's cache is keyed exactly as a run with that teacher alone keys it. One teacher: ``(self,)``."""
        from .members import member_configs

        return member_configs(self)

    def teacher_settings(self) -> dict:
        """The settings that can change the teacher's outputs (field metadata ``teacher_outputs``), except the
        objective's: a cache holds the layers it was built with and says so when a run needs more. A field marked
        ``"unless default"`` is left out at its default (the caches built before it existed stay valid)."""
        out = {}
        for path, f, _ in walk(RunConfig):
            marked = f.metadata.get("teacher_outputs", True)
            if not marked or path[0] == "objective" or path[-1] == "teacher_cache":
                continue
            value = getattr(self.data if path[0] == "data" else self, path[-1])
            if marked == "unless default" and value == f.default:
                continue
            out[path[-1]] = value
        return out
