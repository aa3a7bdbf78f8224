"""Reading the user's files (and hub datasets) with ``datasets``; a bad file is one :class:`DataError` line.

ds = read_file("tickets/train.csv", "train")     # a datasets.Dataset with the file's columns
columns = peek_columns("tickets/train.csv")      # the header only: ["text", "label"]
check_utf8("tickets/train.csv")                  # names the first line that is not UTF-8
"""

import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .options import FORMATS, HUB_SPLITS, LABEL_GUESSES, CustomData, DataError, PathLike, guess

logger = logging.getLogger(__name__)


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
            raise DataError(f"{path}: its first record is not JSON: {one_line(e)}") from None
        return list(record) if isinstance(record, dict) else None
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise DataError(f"{path}: could not read it as parquet: {one_line(e)}") from e
    return None


def read_file(path: PathLike, split: str) -> "datasets.Dataset":  # noqa: F821
    import datasets

    path = Path(path)
    if path.stat().st_size == 0:
        raise DataError(f"{path} has no examples: the {split} split is empty")
    builder, options = FORMATS[path.suffix.lower()]
    if builder != "parquet":
        check_utf8(path)
    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a user's file is read in a blink: no bars around a bad-data error line
    ds_logger = logging.getLogger("datasets")
    level = ds_logger.level
    ds_logger.setLevel(logging.CRITICAL)  # its "Failed to read file ..." line: the one error below says it
    try:
        return datasets.load_dataset(builder, data_files={"train": str(path)}, split="train", **options)
    except Exception as e:  # pandas/pyarrow parse errors come in many types: one line naming the file for all
        if "corresponds to no data" in str(e):  # a header and no rows
            raise DataError(f"{path} has no examples: the {split} split is empty") from None
        bad = first_bad_line(path)
        if bad:
            raise DataError(f"{path} {bad}") from None
        raise DataError(f"{path}: could not read it as {path.suffix[1:]}: {one_line(e)}") from e
    finally:
        ds_logger.setLevel(level)
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


def read_hub(data: CustomData) -> Dict[str, Tuple[str, "datasets.Dataset"]]:  # noqa: F821
    import datasets

    where = data.dataset_name + (f" ({data.dataset_config_name})" if data.dataset_config_name else "")
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # no line per retry of an unreachable hub: the one error below says it
    try:
        raw = datasets.load_dataset(data.dataset_name, data.dataset_config_name)
    except Exception as e:  # offline machines fail in many ways (DNS, HF_HUB_OFFLINE, proxy): one message for all
        raise DataError(
            f"could not load {where} from the Hugging Face hub: {one_line(e)}; without hub access pass "
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
        label = data.label_column or guess(LABEL_GUESSES, ds.column_names)
        if split == "test" and label in ds.column_names and _unlabelled(ds, label):
            logger.info("%s: the test split has no labels (all -1 or empty): not scored", where)
            continue
        out[split] = (f"{where} {name}", ds)
    return out


def _unlabelled(ds, label: str) -> bool:
    values = ds[label]
    return all(v is None or v == -1 for v in values)


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def first_bad_line(path: PathLike) -> Optional[str]:
    """Where a file that ``datasets`` could not read goes wrong, found with the csv / json modules: ``"line 7 has 3
    fields, the header has 2: ..."``, or None when they find nothing wrong. Only called after a failed read."""
    suffix = Path(path).suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _bad_csv_line(path, "\t" if suffix == ".tsv" else ",")
    if suffix in (".json", ".jsonl"):
        return _bad_json_line(path)
    return None


def _bad_csv_line(path: PathLike, delimiter: str) -> Optional[str]:
    import csv

    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if not header:
            return None
        start = reader.line_num + 1
        for row in reader:
            if row and len(row) != len(header):  # blank lines are skipped, as pandas does
                span = f" (to line {reader.line_num}: a quote that never closes?)" if reader.line_num > start else ""
                sep = "a tab" if delimiter == "\t" else "a comma"
                return (
                    f"line {start} has {len(row)} fields, the header has {len(header)}{span}: quote a text that holds "
                    f"{sep}, or fix that row"
                )
            start = reader.line_num + 1
    return None


def _bad_json_line(path: PathLike) -> Optional[str]:
    import json

    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):  # one JSON document: its error knows the line
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return f"line {e.lineno} is not valid JSON ({e.msg}, column {e.colno}): fix that line"
        return None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {number} is not valid JSON ({e.msg}, column {e.colno}): one JSON object per line; fix it"
        if not isinstance(record, dict):
            return f"line {number} is a JSON {type(record).__name__}, not an object: one {{column: value}} per line"
    return None
