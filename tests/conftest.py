"""Tiny random-weight models and a tiny WordPiece vocab, built locally: tests never download anything."""
import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "the a an is was good bad great awful movie film plot acting fun boring not very really what who where when "
    "why how which question answer spam free win call now prize text me you love hate it this that".split()
)
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_bert_config(num_labels=2, hidden=32, layers=2, heads=4, vocab_size=None, **kw):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size or len(SPECIAL) + len(WORDS) + 26,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=64,
        num_labels=num_labels,
        attn_implementation="eager",
        **kw,
    )


def tiny_bert(num_labels=2, seed=0, **kw):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(num_labels=num_labels, **kw)).eval()


@pytest.fixture
def tiny_vocab(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(SPECIAL + WORDS + [chr(ord("a") + i) for i in range(26)]) + "\n")
    return path


@pytest.fixture
def tiny_tokenizer(tiny_vocab):
    from transformers import BertTokenizer

    return BertTokenizer(vocab=str(tiny_vocab))


def random_batch(batch_size=4, seq_len=8, vocab_size=60, num_labels=2, seed=0, pad_last=True):
    """A batch dict as the data pipeline makes it; the later rows are right-padded."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab_size, (batch_size, seq_len), generator=g)
    input_ids[:, 0] = 2  # [CLS]
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    if pad_last:
        for b in range(batch_size):
            n = seq_len - (b % 3) * 2
            input_ids[b, n:] = 0
            attention_mask[b, n:] = 0
    if num_labels == 1:
        labels = torch.randn(batch_size, generator=g)
    else:
        labels = torch.randint(0, num_labels, (batch_size,), generator=g)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros_like(input_ids),
        "labels": labels,
        "idx": torch.arange(batch_size),
    }
