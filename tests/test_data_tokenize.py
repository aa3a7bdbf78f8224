"""Tokenization for student and teacher, dynamic-padding collation, length-grouped sampling."""

import datasets
import pytest
import torch
from torch.utils.data import DataLoader

from ad2_ds.data.glue import (
    DataCollator,
    LengthGroupedSampler,
    example_lengths,
    length_grouped_indices,
    task_features,
    tokenize_dataset,
)
from ad2_ds.data.tasks import get_task

from conftest import SPECIAL, WORDS

LETTERS = [chr(ord("a") + i) for i in range(26)]
PAIRS = [
    ("the movie was good", "it was fun"),
    ("what is the plot", "the plot is boring and the acting is awful"),
    ("a film", "not a film"),
    ("who is it", "you"),
    ("the acting was really very bad", "the plot was really very boring"),
    ("spam", "free prize call now"),
    ("i love this movie", "i hate this movie"),
]


@pytest.fixture
def teacher_tokenizer(tmp_path):
    """Another vocabulary: different ids and pad id, and "movie"/"plot"/"film" split into letter pieces."""
    from transformers import BertTokenizer

    words = [w for w in reversed(WORDS) if w not in ("movie", "plot", "film")]
    vocab = ["[UNK]", "[PAD]", "[MASK]", "[SEP]", "[CLS]"] + LETTERS + ["##" + c for c in LETTERS] + words
    path = tmp_path / "vocab_t.txt"
    path.write_text("\n".join(vocab) + "\n")
    return BertTokenizer(vocab=str(path))


def pair_dataset(labels=None):
    spec = get_task("rte") if labels is None else get_task("stsb")
    labels = labels or [i % 2 for i in range(len(PAIRS))]
    cols = {
        "text_a": [a for a, _ in PAIRS],
        "text_b": [b for _, b in PAIRS],
        "label": labels,
        "idx": [100 + i for i in range(len(PAIRS))],
    }
    return datasets.DatasetDict({"train": datasets.Dataset.from_dict(cols, features=task_features(spec))})


def test_truncation_counted_and_equal_to_direct_truncation(tiny_tokenizer):
    max_length = 9
    enc, truncated = tokenize_dataset(pair_dataset(), tiny_tokenizer, max_length)
    direct = tiny_tokenizer([a for a, _ in PAIRS], [b for _, b in PAIRS], truncation=True, max_length=max_length)
    full = tiny_tokenizer([a for a, _ in PAIRS], [b for _, b in PAIRS])
    n_long = sum(len(ids) > max_length for ids in full["input_ids"])
    assert 0 < n_long < len(PAIRS) and truncated == {"train": {"s": n_long}}
    assert enc["train"]["input_ids"] == direct["input_ids"]
    assert enc["train"]["token_type_ids"] == direct["token_type_ids"]
    assert enc["train"].column_names == ["label", "idx", "input_ids", "attention_mask", "token_type_ids"]
    assert max(map(len, enc["train"]["input_ids"])) == max_length
    # no padding at map time: lengths differ
    assert len(set(map(len, enc["train"]["input_ids"]))) > 1


def test_same_tokenizer_gives_no_teacher_columns(tiny_tokenizer):
    enc, truncated = tokenize_dataset(pair_dataset(), tiny_tokenizer, 32, teacher_tokenizer=tiny_tokenizer)
    assert not any(c.startswith("teacher_") for c in enc["train"].column_names)
    assert truncated == {"train": {"s": 0}}


def test_cross_tokenizer_batches_line_up(tiny_tokenizer, teacher_tokenizer):
    tok_s, tok_t = tiny_tokenizer, teacher_tokenizer
    assert tok_s.pad_token_id == 0 and tok_t.pad_token_id == 1
    enc, truncated = tokenize_dataset(pair_dataset(), tok_s, 32, teacher_tokenizer=tok_t, teacher_max_length=12)
    ds = enc["train"]
    assert {"teacher_input_ids", "teacher_attention_mask", "teacher_token_type_ids"} <= set(ds.column_names)
    assert truncated["train"]["s"] == 0 and truncated["train"]["t"] > 0
    text_of = {100 + i: pair for i, pair in enumerate(PAIRS)}

    sampler = LengthGroupedSampler(example_lengths(ds), batch_size=3, seed=1, mega_batch_mult=2)
    collate = DataCollator(tok_s.pad_token_id, tok_t.pad_token_id)
    loader = DataLoader(ds, batch_size=3, sampler=sampler, collate_fn=collate)
    seen = []
    for batch in loader:
        B = batch["idx"].shape[0]
        assert batch["input_ids"].shape[0] == batch["teacher_input_ids"].shape[0] == batch["labels"].shape[0] == B
        for row, idx in enumerate(batch["idx"].tolist()):
            a, b = text_of[idx]
            n_s = int(batch["attention_mask"][row].sum())
            n_t = int(batch["teacher_attention_mask"][row].sum())
            ids_s, ids_t = batch["input_ids"][row], batch["teacher_input_ids"][row]
            # each side holds this very example, in its own vocabulary
            assert ids_s[:n_s].tolist() == tok_s(a, b)["input_ids"]
            assert ids_t[:n_t].tolist() == tok_t(a, b, truncation=True, max_length=12)["input_ids"]
            assert (ids_s[n_s:] == tok_s.pad_token_id).all() and (ids_t[n_t:] == tok_t.pad_token_id).all()
            assert batch["labels"][row].item() == (idx - 100) % 2
        seen += batch["idx"].tolist()
    assert sorted(seen) == sorted(text_of)
    # the vocabularies really differ: the same example gets other ids and another length on the teacher side
    first = ds[0]
    assert first["input_ids"] != first["teacher_input_ids"]


def test_collator_dynamic_padding_and_dtypes(tiny_tokenizer):
    enc, _ = tokenize_dataset(pair_dataset(labels=[0.5 * i for i in range(len(PAIRS))]), tiny_tokenizer, 32)
    examples = [enc["train"][i] for i in (2, 3)]  # two short pairs
    batch = DataCollator(tiny_tokenizer.pad_token_id)(examples)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "idx"}
    longest = max(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape == (2, longest)  # padded to the batch, not to max_length
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [1.0, 1.5]
    assert batch["idx"].dtype == torch.long and batch["idx"].tolist() == [102, 103]
    assert batch["attention_mask"].sum(1).tolist() == [len(e["input_ids"]) for e in examples]
    padded = DataCollator(tiny_tokenizer.pad_token_id, pad_to_multiple_of=8)(examples)
    assert padded["input_ids"].shape[1] == 8 * -(-longest // 8)

    cls_enc, _ = tokenize_dataset(pair_dataset(), tiny_tokenizer, 32)
    assert DataCollator(0)([cls_enc["train"][0]])["labels"].dtype == torch.long


def test_collator_needs_teacher_pad_id(tiny_tokenizer, teacher_tokenizer):
    enc, _ = tokenize_dataset(pair_dataset(), tiny_tokenizer, 32, teacher_tokenizer=teacher_tokenizer)
    with pytest.raises(ValueError, match="teacher_pad_token_id"):
        DataCollator(tiny_tokenizer.pad_token_id)([enc["train"][0]])


def test_collator_accepts_torch_format(tiny_tokenizer):
    enc, _ = tokenize_dataset(pair_dataset(), tiny_tokenizer, 32)
    ds = enc["train"].with_format("torch")
    batch = DataCollator(0)([ds[0], ds[1]])
    assert batch["labels"].dtype == torch.long and batch["input_ids"].shape[0] == 2


def test_length_grouped_indices():
    lengths = [(i * 7) % 23 for i in range(100)]
    order = length_grouped_indices(lengths, batch_size=4, seed=3, mega_batch_mult=5)
    assert sorted(order) == list(range(100))
    assert order == length_grouped_indices(lengths, batch_size=4, seed=3, mega_batch_mult=5)
    assert order != length_grouped_indices(lengths, batch_size=4, seed=4, mega_batch_mult=5)
    for start in range(0, 100, 20):  # each mega-batch of 4 * 5 is sorted longest first
        chunk = [lengths[i] for i in order[start : start + 20]]
        assert chunk == sorted(chunk, reverse=True)
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=3, mega_batch_mult=5)
    assert list(sampler) == order and len(sampler) == 100
    sampler.set_epoch(1)
    assert list(sampler) == length_grouped_indices(lengths, 4, seed=4, mega_batch_mult=5)


def test_vocab_fixture_sanity(tiny_tokenizer):
    # the tiny vocab really tokenizes words (transformers 5 trap: vocab_file= silently gives [UNK] everywhere)
    assert tiny_tokenizer("the movie")["input_ids"] == [
        2,
        len(SPECIAL) + WORDS.index("the"),
        len(SPECIAL) + WORDS.index("movie"),
        3,
    ]
