"""A run's data: the raw-text splits of its task, tokenized by the student's (and the teacher's own) tokenizer.

    task, splits = load_data(config.data)   # train subset (+ edited copies), dev, test
    tokenized, truncated = tokenize_splits(config, splits, models, group)
    collator = make_collator(models)

Rank 0 reads, augments and tokenizes first and fills the datasets cache; the other ranks then read it.
"""

import dataclasses

from .run_config import DataConfig
from .run_models import Models


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


def tokenize_splits(config, splits, models: Models, group):
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


def make_collator(models: Models):
    from .data.glue import DataCollator

    return DataCollator(models.tok_s.pad_token_id, models.tok_t.pad_token_id if models.two_tokenizers else None)


def has_labelled_test(task, tokenized) -> bool:
    split = task.test_split
    return bool(split) and split in tokenized and labelled(tokenized[split], task.is_regression)


def labelled(ds, regression: bool = False) -> bool:
    """Every example has a label. -1 marks a missing class label; a regression target may be -1.0 (movie-valence's
    test holds 4), so a regression split is unlabelled only when every target is -1 (GLUE's hidden STS-B test)."""
    labels = ds["label"] if "label" in ds.column_names else None
    if not labels or any(x is None for x in labels):
        return False
    if regression:
        return not all(x == -1 for x in labels)
    return all(x != -1 for x in labels)


def teacher_view(ds):
    """The dev set as the teacher reads it: its own tokenization under the plain column names."""
    from .teachers.base import TEACHER_PREFIX

    own = [c for c in ds.column_names if c.startswith(TEACHER_PREFIX)]
    student_cols = [c.removeprefix(TEACHER_PREFIX) for c in own]
    return ds.remove_columns([c for c in student_cols if c in ds.column_names]).rename_columns(
        {c: c.removeprefix(TEACHER_PREFIX) for c in own}
    )
