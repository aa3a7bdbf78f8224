"""The text-editing baseline: WordNet synonyms from the database format, synonym replacement, ×N copies."""

import datasets
import numpy as np
import pytest

from ad2_ds.data.augment import WordNet, augment_dataset, missing_wordnet_files, replace_synonyms

from conftest import write_tiny_wordnet


@pytest.fixture
def wordnet(tmp_path):
    wn = WordNet(str(write_tiny_wordnet(tmp_path / "wn")))
    yield wn
    wn.close()


def test_synonyms_come_from_every_synset_of_every_base_form(wordnet):
    assert wordnet.synonyms("movie") == ("film",)
    assert wordnet.synonyms("movies") == ("film",)  # morphy: -s detached
    assert wordnet.synonyms("Film") == ("movie",)  # looked up lower-case
    assert wordnet.synonyms("plot") == ("secret plan",)  # multi-word lemmas read with spaces
    assert wordnet.synonyms("good") == ("great",) and wordnet.synonyms("great") == ("good",)  # "good(a)" marker
    assert wordnet.synonyms("geese") == ()  # goose's synset has no other word, and geese -> goose is an exception
    assert wordnet.base_forms("geese", "noun") == ["goose"]
    assert wordnet.synonyms("loved") == ("enjoy",)  # verb: -ed detached
    assert wordnet.synonyms("the") == () and wordnet.synonyms("zzz") == ()


def test_a_folder_without_the_database_is_named_with_what_to_do(tmp_path):
    assert missing_wordnet_files(str(tmp_path)) == [f"{k}.{p}" for p in ("noun", "verb", "adj", "adv")
                                                    for k in ("index", "data")]  # fmt: skip
    with pytest.raises(FileNotFoundError, match="apt install wordnet-base"):
        WordNet(str(tmp_path))


def test_replacement_keeps_spacing_punctuation_case_and_stop_words(wordnet):
    rng = np.random.default_rng(0)
    text = "The Movie was  GOOD , the plot's movie-like ; 21st film"
    out = replace_synonyms(text, wordnet.synonyms, 1.0, rng, stop_words=frozenset({"the", "was"}))
    # alpha 1: every word with a synonym is replaced; "plot's" and "movie-like" are not whole words
    assert out == "The Film was  GREAT , the plot's movie-like ; 21st movie"
    assert replace_synonyms(text, wordnet.synonyms, 0.0, rng) == text


def test_eda_count_rule_max_1_alpha_times_words(wordnet):
    rng = np.random.default_rng(1)
    text = " ".join(["movie"] * 2000)
    assert replace_synonyms(text, wordnet.synonyms, 0.1, rng).split().count("film") == 200  # alpha x words
    for seed in range(5):  # at least one word, whichever one it is, in a short sentence
        out = replace_synonyms("the plot of the movie", wordnet.synonyms, 0.1, np.random.default_rng(seed))
        assert out in ("the secret plan of the movie", "the plot of the film")
    assert replace_synonyms("the zzz", wordnet.synonyms, 0.1, rng) == "the zzz"  # nothing to replace


def _pairs(n=6):
    return datasets.Dataset.from_dict({
        "text_a": [f"good movie number {i}" for i in range(n)],
        "text_b": ["a bad plot"] * n,
        "label": [i % 2 for i in range(n)],
        "idx": [3 * i for i in range(n)],  # sparse ids, as after selecting a subset
    })  # fmt: skip


def test_copies_follow_the_originals_with_unique_ids_and_the_same_labels(wordnet):
    ds = _pairs()
    out = augment_dataset(ds, wordnet, copies=2, alpha=1.0, seed=0, stop_words=frozenset())
    assert len(out) == 3 * len(ds)
    assert out.select(range(len(ds)))[:] == ds[:]  # originals first, untouched
    stride = max(ds["idx"]) + 1
    ids = list(ds["idx"])
    assert list(out["idx"]) == ids + [i + stride for i in ids] + [i + 2 * stride for i in ids]
    assert list(out["label"]) == list(ds["label"]) * 3
    assert out[len(ds)]["text_a"] == "great film number 0" and out[len(ds)]["text_b"] == "a awful secret plan"
    assert augment_dataset(ds, wordnet, copies=0, alpha=0.5) is ds


def test_copies_are_a_pure_function_of_seed_id_and_copy(wordnet):
    ds = datasets.Dataset.from_dict({"text_a": ["good movie good film bad plot"] * 40, "label": [0] * 40,
                                     "idx": list(range(40))})  # fmt: skip
    a = augment_dataset(ds, wordnet, copies=2, alpha=0.5, seed=0)
    b = augment_dataset(ds, wordnet, copies=2, alpha=0.5, seed=0)
    c = augment_dataset(ds, wordnet, copies=2, alpha=0.5, seed=1)
    assert a[:] == b[:] and a[:]["text_a"] != c[:]["text_a"]
    copies = a[:]["text_a"][40:]
    assert len(set(copies)) > 5  # same sentence, different ids: different edits
    # the edits of one example do not depend on which other examples are in the dataset
    alone = augment_dataset(ds.select([7]), wordnet, copies=1, alpha=0.5, seed=0)
    assert alone[1]["text_a"] == a[40 + 7]["text_a"]


def test_bad_arguments_are_refused(wordnet):
    with pytest.raises(ValueError, match="copies must be >= 0"):
        augment_dataset(_pairs(), wordnet, copies=-1, alpha=0.5)
    with pytest.raises(ValueError, match="alpha in"):
        augment_dataset(_pairs(), wordnet, copies=1, alpha=0.0)
