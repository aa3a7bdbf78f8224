"""A distillation run is a function of its config: ``run_distillation(RunConfig(...)) -> results``.

    from ad2_ds import RunConfig, run_distillation
    from ad2_ds.run import DataConfig
    from ad2_ds.config import AD2Config

    config = RunConfig(deepspeed="ds_configs/zero2.json", data=DataConfig(task="movie-polarity"),
                       objective=AD2Config(method="ad2"), output_dir="runs/distill")
    results = run_distillation(config)       # what results.json holds (None on ranks that do not write it)

``RunConfig`` is frozen and checks its values when built; :func:`check_run` checks it against the world (files, the
DeepSpeed JSON, the output folder, the ranks) once, before any model or data is loaded. ``run_distillation`` then does
data -> models -> teacher -> engine -> train -> save. The recipes only turn flags into a ``RunConfig``
(:mod:`ad2_ds.flags`); every field's help text and flag live in its metadata.
"""

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

from .config import AD2Config, ConfigError
from .flags import as_flat_dict, setting, walk

logger = logging.getLogger(__name__)
RUN_FILES = ("results.json", "checkpoints", "best")


def _ranks(spec) -> Tuple[int, ...]:
    from .dist import parse_ranks

    return parse_ranks(spec)


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
        None, "your own data: the metric that picks the best student; default: accuracy (spearmanr: regression)"
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
    teacher: Optional[str] = setting(
        None, "fine-tuned teacher (path or hub name); default: all-MiniLM-L6-v2 fine-tuned here"
    )
    student: Optional[str] = setting(None, "student checkpoint (path or hub name); or use --student_layers")
    student_layers: str = setting("bottom:3", "student made from the teacher: skip|top|bottom:N")
    objective: AD2Config = dataclasses.field(default_factory=AD2Config)
    num_train_epochs: int = setting(3, teacher_outputs=False)
    eval_steps: int = setting(0, "optimizer steps between evaluations; 0: each epoch", teacher_outputs=False)
    seed: int = setting(42, teacher_outputs=False)
    output_dir: str = setting("runs/distill", teacher_outputs=False)
    overwrite_output_dir: bool = setting(False, teacher_outputs=False)
    resume: bool = setting(False, "continue the run in --output_dir from its last checkpoint", teacher_outputs=False)
    teacher_tp_size: int = setting(1)
    teacher_ranks: Tuple[int, ...] = setting(
        (),
        "hosted layout: the teacher runs on these ranks (tensor-parallel over them when several) and serves the "
        "student, which trains on the other ranks; default: co-located (every rank holds both)",
        parse=_ranks,
        metavar="R,R",
    )
    teacher_dtype: str = setting("fp32", choices=("fp32", "bf16", "fp16"))
    teacher_cache: Optional[str] = setting(None, "precompute teacher outputs once into DIR and read them")
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
    teacher_seed: int = setting(
        42, "seed when fine-tuning the default teacher (fixed, so a sweep over --seed shares one teacher)"
    )
    trust_remote_code: bool = setting(False)
    progress: bool = setting(True, negate=True, teacher_outputs=False)

    def __post_init__(self):
        if isinstance(self.teacher_ranks, (list, str)):
            object.__setattr__(self, "teacher_ranks", _ranks(self.teacher_ranks))
        cfg, ranks = self.objective, self.teacher_ranks
        self.train_config()  # checks the epochs and the evaluation interval
        if self.teacher_tp_size < 1:
            raise ConfigError("teacher_tp_size", f"must be >= 1, got {self.teacher_tp_size}")
        if self.teacher_dtype not in ("fp32", "bf16", "fp16"):
            raise ConfigError("teacher_dtype", f"{self.teacher_dtype!r}: use fp32, bf16 or fp16")
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
        )

    def to_dict(self) -> dict:
        """The config as plain JSON data (nested like the dataclasses); :meth:`from_dict` reads it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        d = dict(d)
        d["data"] = DataConfig(**d.get("data", {}))
        d["objective"] = AD2Config(**d.get("objective", {}))
        d["teacher_ranks"] = tuple(d.get("teacher_ranks", ()))
        return cls(**d)

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


def check_run(config: RunConfig, world_size: int) -> dict:
    """Check the config against the world before any expensive work; returns the loaded DeepSpeed JSON.
    world_size: every rank of the job (the hosted layout's teacher ranks included)."""
    import torch

    from .data.tasks import get_task
    from .dsconfig import check_ds_config, load_ds_config

    data = config.data
    if data.is_custom:
        from .data.custom import check_custom_files

        check_custom_files(data.custom())  # files, formats, UTF-8, columns: labels are checked when read
    else:
        get_task(data.task)
    ranks = config.teacher_ranks
    student_world = world_size
    if ranks:
        from .dist import assign_teacher_ranks, check_teacher_ranks

        check_teacher_ranks(ranks, world_size)
        assign_teacher_ranks(ranks, [r for r in range(world_size) if r not in ranks])
        student_world -= len(ranks)
    elif world_size % config.teacher_tp_size:
        raise ConfigError("teacher_tp_size", f"{config.teacher_tp_size} does not divide the world size {world_size}")
    if isinstance(config.deepspeed, dict):
        ds_config = config.deepspeed
        check_ds_config(ds_config, "the DeepSpeed config", student_world, torch.cuda.is_available())
    else:
        ds_config = load_ds_config(config.deepspeed, student_world)
    if (config.teacher_tp_size > 1 or len(ranks) > 1) and config.teacher and os.path.isdir(config.teacher):
        from .teachers.sharded import checkpoint_files

        try:  # a tensor-parallel teacher loads shard by shard from safetensors (reads the file headers only)
            checkpoint_files(config.teacher)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError("teacher", f"{config.teacher}: {e}") from None
    if config.teacher_dtype == "fp16" and not torch.cuda.is_available():
        raise ConfigError("teacher_dtype", "fp16 needs a GPU; on CPU use bf16")
    if data.data_dir and not os.path.isdir(data.data_dir):
        raise ConfigError("data_dir", f"{data.data_dir} is not a directory: point it at the GLUE data folder")
    if data.augment_copies:
        from .data.augment import default_wordnet_dir, missing_wordnet_files

        wordnet_dir = data.wordnet_dir or default_wordnet_dir()
        missing = missing_wordnet_files(wordnet_dir)
        if missing:
            raise ConfigError(
                "augment_copies",
                f"needs WordNet 3.0's database files, and wordnet_dir {wordnet_dir} lacks {', '.join(missing)}: "
                "apt install wordnet-base, or point wordnet_dir at a WordNet dict folder",
            )
    out = config.output_dir
    has_run = os.path.isdir(out) and any(os.path.exists(os.path.join(out, f)) for f in RUN_FILES)
    if has_run and not (config.resume or config.overwrite_output_dir):
        raise ConfigError(
            "output_dir",
            f"{out} already holds a run: set resume to continue it, overwrite_output_dir to replace it, "
            "or choose another output_dir",
        )
    if config.resume:
        from .checkpoint import check_resumable
        from .trainer import CKPT_DIR

        check_resumable(os.path.join(out, CKPT_DIR))
    return ds_config


def load_data(data: DataConfig, rank_zero_first: bool = True):
    """``(task, splits)``: the task's spec and its raw-text splits: train (the fixed low-resource subset, plus its
    augmented copies), every dev split, and the test split when the task has one. Rank 0 reads and augments first and
    fills the datasets cache, the others then read it. The user's own data (``data.is_custom``) is read by
    :func:`ad2_ds.data.custom.load_custom_task` into a TaskSpec of its own (splits train, dev[, test]); bad data
    raises :class:`~ad2_ds.data.custom.DataError` here, before any model is loaded."""
    import torch.distributed as dist

    from .data.glue import load_task
    from .data.tasks import get_task
    from .dist import get_rank

    first = rank_zero_first and dist.is_initialized()
    if first and get_rank() != 0:
        dist.barrier()
    if data.is_custom:
        from .data.custom import load_custom_task

        task, raw = load_custom_task(data.custom(check_files=True))
    else:
        task = get_task(data.task)
        raw = load_task(task, data.data_dir)
        if data.test_from_train:  # before the training subset: test never holds an example train could draw
            from .data.glue import carve_test_split

            raw = carve_test_split(raw, data.test_from_train)
            task = dataclasses.replace(task, test_split="test")
    train_raw = raw["train"]
    if data.max_train_samples and data.max_train_samples < len(train_raw):
        # A fixed subset (seed 0), the same for every method and seed: low-resource comparisons stay paired.
        train_raw = train_raw.shuffle(seed=0).select(range(data.max_train_samples))
    if data.augment_copies:
        from .data.augment import WordNet, augment_dataset, default_wordnet_dir

        wordnet = WordNet(data.wordnet_dir or default_wordnet_dir())
        train_raw = augment_dataset(train_raw, wordnet, data.augment_copies, data.augment_alpha, data.augment_seed)
        wordnet.close()
    if first and get_rank() == 0:
        dist.barrier()
    splits = {"train": train_raw}
    for split in task.dev_splits:
        ds = raw[split]
        if data.max_eval_samples and data.max_eval_samples < len(ds):
            ds = ds.shuffle(seed=0).select(range(data.max_eval_samples))  # dev files may be ordered by label
        splits[split] = ds
    if task.test_split and task.test_split in raw:
        splits[task.test_split] = raw[task.test_split]
    return task, splits


def classifier_config(path, num_labels, trust_remote_code, role, task=None):
    """The checkpoint's config, checked for the task (see :func:`load_classifier`); reads no weights. A teacher for
    the user's own data is checked by label name by the caller, which also needs the label order
    (:func:`ad2_ds.data.custom.match_teacher_labels`)."""
    from transformers import AutoConfig

    custom = task is not None and task.is_custom
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    has_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    by_name = custom and role == "teacher"
    if has_head and not by_name and config.num_labels != num_labels:
        raise ValueError(f"{role} {path} predicts {config.num_labels} labels but the task has {num_labels}")
    if role == "teacher" and not has_head:
        raise ValueError(
            f"teacher {path} has no fine-tuned classification head: fine-tune it first "
            "(recipes/finetune_teacher.py --model ...) and pass its best/ folder"
        )
    return config


def load_classifier(path, num_labels, eager, trust_remote_code, role, task=None):
    """A sequence classifier for the task. A teacher must already have a trained head of the task's size; a student
    may start from a base checkpoint (a new head is made).

    For the user's own data (``task.is_custom``) a teacher's labels are checked by name instead
    (:func:`ad2_ds.data.custom.match_teacher_labels`: the same names in another order are remapped, unnamed
    ``LABEL_k`` map by position with a warning, another label set is an error) and its head is put in the data's
    order; a student gets the data's ``id2label`` / ``label2id``, so its saved config.json names the labels."""
    from transformers import AutoModelForSequenceClassification

    custom = task is not None and task.is_custom
    classifier_config(path, num_labels, trust_remote_code, role, task)
    kwargs = {"attn_implementation": "eager"} if eager else {}
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, trust_remote_code=trust_remote_code, **kwargs
    )
    if custom:
        from .data.custom import align_teacher_labels, set_label_names

        align_teacher_labels(model, task) if role == "teacher" else set_label_names(model.config, task)
    return model


def check_teacher_labels(config: RunConfig, task) -> None:
    """A given teacher's labels against the user's data (its config.json only), right after the data is read: a
    teacher for another label set stops the run before anything is loaded or trained."""
    if not (config.teacher and task.is_custom):
        return
    from transformers import AutoConfig

    from .data.assets import resolve_model
    from .data.custom import match_teacher_labels

    path = resolve_model(config.teacher)
    teacher_config = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    if any(a.endswith("ForSequenceClassification") for a in (teacher_config.architectures or [])):
        match_teacher_labels(teacher_config, task)


def run_distillation(config: RunConfig, callbacks: Sequence = ()) -> Optional[dict]:
    """Run (or resume) one distillation and return its results (what ``output_dir/results.json`` holds) on the rank
    that writes them, None on the others. callbacks: :class:`ad2_ds.trainer.Callback` objects called around each
    step. Raises ValueError (ConfigError for a bad setting) before expensive work."""
    from .dist import init_distributed, setup_single_process_env

    setup_single_process_env()
    ds_config = check_run(config, int(os.environ.get("WORLD_SIZE", "1")))
    init_distributed()
    clock = time.perf_counter()
    task, splits = load_data(config.data)  # bad data fails here, before any model is fetched or trained
    check_teacher_labels(config, task)
    from .ascent import check_ascent  # ascent free: one rank, and its δ store fits in memory

    check_ascent(config, splits, int(os.environ.get("WORLD_SIZE", "1")) - len(config.teacher_ranks))
    setup_seconds = {"load_and_augment_data": time.perf_counter() - clock}
    teacher_path = config.teacher
    if teacher_path is None and (config.objective.needs_teacher or not config.student):
        from .default_teacher import ensure_default_teacher

        teacher_path = ensure_default_teacher(config, task, ds_config)
    return _distill(config, task, ds_config, teacher_path, splits, setup_seconds, callbacks)


@dataclass
class _Models:
    """The run's models and tokenizers (the teacher's are None for a method without one). A tensor-parallel or hosted
    teacher is never built whole here: ``teacher`` is then None, ``teacher_config`` its config and ``source`` where
    it is loaded from (:func:`ad2_ds.teachers.factory.live_teacher` loads its shards from there)."""

    teacher: object
    tok_t: object
    student: object
    tok_s: object
    teacher_config: object = None
    source: object = None

    @property
    def two_tokenizers(self) -> bool:
        return self.tok_t is not None and self.tok_t.get_vocab() != self.tok_s.get_vocab()


def _distill(config, task, ds_config, teacher_path, splits, setup_seconds, callbacks):
    import torch.distributed as dist
    from transformers import set_seed

    from .ascent import attach_delta_store
    from .engine import build_engine
    from .objective import AD2Objective
    from .teachers.factory import TeacherNeeds, TeacherPlacement, build_teacher, live_teacher, serve_hosted_teacher
    from .trainer import train

    cfg = config.objective
    layout = group = None  # hosted layout: the student trains on `group`, the teacher ranks only serve
    if config.teacher_ranks:
        from .dist import split_ranks

        layout = split_ranks(config.teacher_ranks)
        group = layout.student_group
    placement = TeacherPlacement(config.teacher_tp_size, config.teacher_dtype, config.teacher_cache, layout)
    set_seed(config.seed)
    if layout is not None and layout.role == "teacher":
        teacher_model, _, _, source = _load_teacher(config, task, teacher_path, len(config.teacher_ranks) > 1)
        needs = TeacherNeeds(() if cfg.needs_hidden_states else None, cfg.needs_attentions)
        stats = serve_hosted_teacher(teacher_model, needs, placement, source)
        secs = stats["teacher_seconds"]
        logger.info("teacher rank %d served %s requests in %.1f s", dist.get_rank(), stats["requests"], secs)
        return None
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    models = _load_models(config, task, teacher_path)
    config = _fit_positions(config, models)
    tokenized, truncated = _tokenize(config, splits, models, group)
    collator = _collator(models)
    train_ds, dev_sets = tokenized["train"], {split: tokenized[split] for split in task.dev_splits}

    clock = time.perf_counter()
    test_set = {task.test_split: tokenized[task.test_split]} if _has_labelled_test(task, tokenized) else {}
    report = _measure(models, dev_sets, collator, task, group, test_set)  # before DeepSpeed shards anything
    setup_seconds["evaluate_teacher_and_latency"], clock = time.perf_counter() - clock, time.perf_counter()
    teacher_config = models.teacher_config if cfg.needs_teacher else None
    objective = AD2Objective(models.student, cfg, teacher_config=teacher_config)
    store_report = attach_delta_store(objective, train_ds)  # ascent free's δ per example: {} for the others
    engine, ds_config = build_engine(
        objective, ds_config, len(train_ds), config.num_train_epochs, layout, config.keep_zero_stage
    )
    setup_seconds["objective_and_engine"], clock = time.perf_counter() - clock, time.perf_counter()
    teacher = live = None
    if cfg.needs_teacher:
        needs = objective.teacher_needs()
        if models.source is not None and layout is None:  # tensor-parallel, loaded shard by shard
            live = live_teacher(None, needs, placement.dtype, placement.tp_size, source=models.source)
            setup_seconds["teacher_load"], clock = time.perf_counter() - clock, time.perf_counter()
        cache_data = _cache_data(config, models, train_ds, collator, teacher_path)
        teacher = build_teacher(models.teacher, needs, placement, task.num_labels, cache_data, live=live)
        if models.source is not None:  # never built here: scored through the live or the hosted teacher
            built, clock = time.perf_counter() - clock, time.perf_counter()
            through = live if layout is None else teacher
            report.update(_measure_sharded_teacher(models, through, dev_sets, collator, task, group, test_set))
            setup_seconds["evaluate_teacher_and_latency"] += time.perf_counter() - clock
            clock = time.perf_counter() - built  # the teacher's setup below counts its build too
    setup_seconds["teacher"] = time.perf_counter() - clock  # includes building the teacher cache when there is one

    out = _prepare_output_dir(config, rank, group)
    try:
        state = train(
            engine,
            teacher,
            train_ds,
            dev_sets,
            collator,
            task,
            config.train_config(),
            on_best=lambda record: _save_best(objective, models.tok_s, out, record, group),
            resume=config.resume,
            group=group,
            callbacks=callbacks,
            run_config=config.to_dict(),
        )
    finally:
        if layout is not None:
            teacher.close()  # the teacher ranks return once every student rank closed

    results = {
        "task": task.name,
        "main_metric": task.main_metric,
        "labels": list(task.label_list) if task.label_list else None,  # the student's id2label for own data
        "method": cfg.method,
        "config": cfg.to_dict(),
        "run_config": config.to_dict(),
        "args": as_flat_dict(config),
        "ds_config": ds_config,
        "world_size": world_size,
        "teacher_ranks": list(config.teacher_ranks),
        "teacher": teacher_path,
        "teacher_load": _teacher_load(live, models, layout),
        "student_init": config.student or config.student_layers,
        "train_examples": len(train_ds),  # with augment_copies N: (N + 1) x the originals
        **_state_results(state),
        "setup_seconds": setup_seconds,
        "overflow_skipped_steps": engine.skipped_steps,
        "truncated": truncated,
        "engine": _engine_facts(engine),
        **store_report,
        **report,
    }
    test = score_test_split(task, tokenized, collator, out, config, engine, group)
    if test is not None:
        results["test"] = test
    if rank != 0:
        return None
    from .utils import write_json_atomic

    write_json_atomic(os.path.join(out, "results.json"), results)
    return results


def _load_teacher(config, task, teacher_path, sharded: bool = False):
    """(teacher model in eval mode, its tokenizer, its config, its TeacherSource), all None without a teacher path.
    sharded: a tensor-parallel teacher that loads its own shards later (:func:`ad2_ds.teachers.factory.live_teacher`),
    so only its config and tokenizer are read here: the model is None and the TeacherSource says where it loads from.
    A decoder classifier's tokenizer is set to pad on the right with a pad id its config knows
    (:func:`ad2_ds.teachers.decoder.prepare_decoder_teacher`)."""
    if teacher_path is None:
        return None, None, None, None
    from transformers import AutoTokenizer

    from .data.assets import resolve_model
    from .teachers.decoder import pools_last_token, prepare_decoder_teacher
    from .teachers.factory import TeacherSource

    path, eager, trust = resolve_model(teacher_path), config.objective.needs_attentions, config.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    if sharded:
        model, t_config = None, classifier_config(path, task.num_labels, trust, "teacher", task)
    else:
        model = load_classifier(path, task.num_labels, eager, trust, "teacher", task).eval()
        t_config = model.config
    if pools_last_token(t_config):  # right padding and a pad id the model pools by
        prepare_decoder_teacher(tokenizer, t_config)
    source = None
    if sharded:
        order = None
        if task.is_custom:  # the sharded head is not reordered: its logits are, as they come out
            from .data.custom import match_teacher_labels, set_label_names

            order = match_teacher_labels(t_config, task)
            set_label_names(t_config, task)
        source = TeacherSource(
            path, task.num_labels, "eager" if eager else None, trust, tokenizer.pad_token_id, order and tuple(order)
        )
    return model, tokenizer, t_config, source


def _load_models(config, task, teacher_path) -> _Models:
    """The teacher (when there is one) and the student: a given checkpoint, or layers taken from the teacher. A
    co-located tensor-parallel teacher (teacher_tp_size > 1) is not built here: each rank loads its own shards when the
    teacher is built; nor is the hosted layout's teacher on the student ranks (it lives on the teacher ranks; only a
    teacher without safetensors is loaded whole there, with a warning). A student made from the layers of a teacher
    not built here reads only the tensors it keeps (:func:`ad2_ds.teachers.sharded.student_from_checkpoint`)."""
    from transformers import AutoTokenizer

    from .data.assets import resolve_model
    from .modeling import student_from_teacher

    cfg, trust = config.objective, config.trust_remote_code
    sharded = config.teacher_tp_size > 1 and not config.teacher_ranks and cfg.needs_teacher
    if config.teacher_ranks:  # the hosted layout's student ranks: the teacher lives on the teacher ranks
        sharded = bool(config.student) or _has_safetensors(teacher_path)
        if not sharded:
            logger.warning(
                "hosted layout: %s has no safetensors, so each student rank loads the teacher whole to cut the "
                "student from it and score it; re-save it with save_pretrained to read only the student's tensors",
                teacher_path,
            )
    teacher, tok_t, t_config, source = _load_teacher(config, task, teacher_path, sharded)
    if config.student:
        path = resolve_model(config.student)
        student = load_classifier(path, task.num_labels, cfg.needs_attentions, trust, "student", task)
        tok_s = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    else:
        strategy, _, n = config.student_layers.partition(":")
        if teacher is None:  # a sharded teacher: read only the tensors the student keeps
            from .teachers.sharded import student_from_checkpoint

            kwargs = {"attn_implementation": "eager"} if cfg.needs_attentions else {}
            student = student_from_checkpoint(source.path, int(n), strategy, task.num_labels, trust, **kwargs)
            if task.is_custom:
                from .data.custom import align_teacher_labels

                align_teacher_labels(student, task)  # the head the student inherits, in the data's label order
        else:
            student = student_from_teacher(teacher, int(n), strategy)
        tok_s = tok_t
        if task.is_custom:
            from .data.custom import set_label_names

            set_label_names(student.config, task)  # the data's id2label / label2id in the saved config.json
    student.train()
    models = _Models(teacher, tok_t, student, tok_s, t_config, source)
    if models.two_tokenizers and cfg.deep_kd:
        raise ValueError(
            f"method {cfg.method} compares hidden states token by token, but the teacher and student tokenizers "
            "differ: use method kd or ad2-dkd (logits only), pkd (pooled states through a learned projection), or a "
            "student built from the teacher (student_layers)"
        )
    return models


def _has_safetensors(path) -> bool:
    """Whether a teacher folder can be read tensor by tensor (safetensors: one file or a sharded index)."""
    from .data.assets import resolve_model
    from .teachers.sharded import checkpoint_files

    try:
        checkpoint_files(resolve_model(path))
    except (ValueError, OSError):  # .bin only, no weights, or not a local folder
        return False
    return True


def _fit_positions(config, models: _Models):
    """The config with max_seq_length cut to the models' position embeddings (with a warning) when longer."""
    max_positions = min(
        getattr(c, "max_position_embeddings", 10**9)
        for c in (models.teacher_config, models.student.config)
        if c is not None
    )
    length = config.data.max_seq_length
    if length <= max_positions:
        return config
    logger.warning(
        "--max_seq_length %d exceeds the models' %d positions: using %d", length, max_positions, max_positions
    )
    return dataclasses.replace(config, data=dataclasses.replace(config.data, max_seq_length=max_positions))


def _tokenize(config, splits, models: _Models, group):
    """Every split tokenized by the student's tokenizer (and the teacher's own, when they differ). Rank 0 tokenizes
    first and fills the datasets cache; the others then read it."""
    import datasets
    import torch.distributed as dist

    from .data.glue import tokenize_dataset

    rank = dist.get_rank(group)
    if rank != 0:
        dist.barrier(group)
    tok_t = models.tok_t if models.two_tokenizers else None
    out = tokenize_dataset(
        datasets.DatasetDict(splits), models.tok_s, config.data.max_seq_length, teacher_tokenizer=tok_t
    )
    if rank == 0:
        dist.barrier(group)
    return out


def _collator(models: _Models):
    from .data.glue import DataCollator

    return DataCollator(models.tok_s.pad_token_id, models.tok_t.pad_token_id if models.two_tokenizers else None)


def _measure(models: _Models, dev_sets, collator, task, group, test_set=None) -> dict:
    """Parameters and latency of both models, and the teacher's dev scores (and test scores, given ``test_set``)."""
    from .modeling import count_parameters, measure_latency

    report = {
        "student_params": count_parameters(models.student),
        "student_latency_ms": measure_latency(models.student, dev_sets, collator),
    }
    if models.teacher is not None:
        report.update(_teacher_report(models.teacher, models, dev_sets, task, group, test_set))
        report["teacher_params"] = count_parameters(models.teacher)
    return report


def _measure_sharded_teacher(models: _Models, live, dev_sets, collator, task, group, test_set=None) -> dict:
    """The tensor-parallel teacher's dev scores (and test scores, given ``test_set``), parameters (counted on its empty
    skeleton) and latency, through the live teacher (every rank runs the same forwards; the TP group gathers its
    rows)."""
    from .modeling import count_parameters
    from .teachers.factory import TeacherModel
    from .teachers.sharded import empty_classifier

    report = _teacher_report(TeacherModel(live, models.teacher_config), models, dev_sets, task, group, test_set)
    src = models.source
    report["teacher_params"] = count_parameters(empty_classifier(src.path, src.num_labels, src.trust_remote_code))
    return report


def _teacher_report(model, models: _Models, dev_sets, task, group, test_set=None) -> dict:
    """A teacher's dev scores and latency (and test scores, given ``test_set``), on its own tokens when the two
    tokenizers differ."""
    from .data.glue import DataCollator
    from .modeling import measure_latency
    from .trainer import evaluate

    def view(sets):
        return sets if not models.two_tokenizers else {k: _teacher_view(v) for k, v in sets.items()}

    t_collator = DataCollator(models.tok_t.pad_token_id)
    report = {
        "teacher_scores": evaluate(model, view(dev_sets), t_collator, task, 32, group=group),
        "teacher_latency_ms": measure_latency(model, view(dev_sets), t_collator),
    }
    if test_set:
        report["teacher_test"] = evaluate(model, view(test_set), t_collator, task, 32, group=group)
    return report


def _teacher_load(live, models: _Models, layout) -> Optional[str]:
    """How the run's teacher was loaded: "shards" (each rank read only its own from the checkpoint), "whole", "hosted"
    (on the teacher ranks: shard by shard when several), None without a teacher."""
    if layout is not None:
        return "hosted"
    if live is not None:
        return live.loaded
    return "whole" if models.teacher is not None else None


def _cache_data(config, models: _Models, train_ds, collator, teacher_path):
    """What a teacher cache is built from and keyed by (None without --teacher_cache)."""
    if not config.teacher_cache:
        return None
    from .teachers.cache import fingerprint, state_dict_hash
    from .teachers.factory import CacheData

    parts = {
        "teacher": state_dict_hash(models.teacher) if config.teacher_tp_size == 1 else teacher_path,
        "tokenizer": fingerprint(sorted(models.tok_t.get_vocab().items())),
        "task": config.data.task,
        "data": getattr(train_ds, "_fingerprint", None) or fingerprint(train_ds["idx"]),
        "max_length": config.data.max_seq_length,
        "settings": config.teacher_settings(),
    }
    return CacheData(train_ds, collator, parts)


def _prepare_output_dir(config, rank, group) -> str:
    import torch.distributed as dist

    out = config.output_dir
    if rank == 0:
        if config.overwrite_output_dir and not config.resume:
            _clear_run(out)
        os.makedirs(out, exist_ok=True)
    dist.barrier(group)
    return out


def _save_best(objective, tokenizer, out, record, group) -> None:
    from .modeling import save_pretrained_atomic

    extra = {"ad2_best.json": record}
    save_pretrained_atomic(objective.student, tokenizer, os.path.join(out, "best"), extra=extra, group=group)


def _state_results(state) -> dict:
    return {
        "history": state.history,
        "best": {"step": state.best_step, **state.best_scores},
        "train_seconds": state.train_seconds,
        "samples_per_second": state.samples / max(state.train_seconds, 1e-9),
        "teacher_wait_seconds": state.teacher_wait_seconds,
        "nonfinite_skipped": state.nonfinite_skipped,
    }


def _engine_facts(engine) -> dict:
    return {
        "micro_batch": engine.train_micro_batch_size_per_gpu(),
        "grad_accum": engine.gradient_accumulation_steps(),
        "bf16": engine.bfloat16_enabled(),
        "fp16": engine.fp16_enabled(),
        "zero_stage": engine.zero_optimization_stage(),
    }


def score_test_split(task, tokenized, collator, out, config, engine, group) -> Optional[dict]:
    """The best student (chosen on the dev split, saved in ``out/best``) scored once on the task's labelled test
    split; None when the task has none, or it is unlabelled."""
    if not _has_labelled_test(task, tokenized):
        return None
    split = task.test_split
    from .trainer import evaluate

    best = load_classifier(
        os.path.join(out, "best"), task.num_labels, False, config.trust_remote_code, "student", task
    )
    device = next(engine.module.student.parameters()).device
    return evaluate(best.to(device), {split: tokenized[split]}, collator, task, 32, device, group)


def _has_labelled_test(task, tokenized) -> bool:
    split = task.test_split
    return bool(split) and split in tokenized and _labelled(tokenized[split], task.is_regression)


def _labelled(ds, regression: bool = False) -> bool:
    """Every example has a label. -1 marks a missing class label; a regression target may be -1.0 (movie-valence's
    test holds 4), so a regression split is unlabelled only when every target is -1 (GLUE's hidden STS-B test)."""
    labels = ds["label"] if "label" in ds.column_names else None
    if not labels or any(x is None for x in labels):
        return False
    if regression:
        return not all(x == -1 for x in labels)
    return all(x != -1 for x in labels)


def _teacher_view(ds):
    """The dev set as the teacher reads it: its own tokenization under the plain column names."""
    from .teachers.base import TEACHER_PREFIX

    own = [c for c in ds.column_names if c.startswith(TEACHER_PREFIX)]
    student_cols = [c.removeprefix(TEACHER_PREFIX) for c in own]
    return ds.remove_columns([c for c in student_cols if c in ds.column_names]).rename_columns(
        {c: c.removeprefix(TEACHER_PREFIX) for c in own}
    )


def _clear_run(out):
    import shutil

    for name in RUN_FILES:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def summary_table(task, results) -> str:
    """Teacher vs student: the main metric on dev (and test when scored), parameters, latency; where the student is.
    task: the run's TaskSpec, or None to read its name and main metric from ``results``."""
    metric = task.main_metric if task is not None else results["main_metric"]
    name = task.name if task is not None else results["task"]
    rows = [("", "teacher", "student")]
    t_score = results.get("teacher_scores", {}).get(metric)
    rows.append((f"dev {metric}", _fmt(t_score), _fmt(results["best"].get(metric))))
    if "test" in results:
        t_test = results.get("teacher_test", {}).get(metric)
        rows.append((f"test {metric}", _fmt(t_test), _fmt(results["test"].get(metric))))
    rows.append(("parameters", _millions(results.get("teacher_params")), _millions(results["student_params"])))
    rows.append(
        ("latency ms/batch of 32", _fmt(results.get("teacher_latency_ms"), 1), _fmt(results["student_latency_ms"], 1))
    )
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{r[0]:<{width}}{r[1]:>12}{r[2]:>12}" for r in rows]
    out = results["run_config"]["output_dir"]
    lines.append(f"{name}, method {results['method']}: best student saved to {os.path.join(out, 'best')}")
    lines.append(
        f"train {results['train_seconds']:.0f} s, {results['samples_per_second']:.1f} samples/s, "
        f"waited {results['teacher_wait_seconds']:.1f} s on the teacher"
    )
    return "\n".join(lines)


def _fmt(x, digits=4):
    return "-" if x is None else f"{x:.{digits}f}"


def _millions(n):
    return "-" if n is None else f"{n / 1e6:.1f}M"
