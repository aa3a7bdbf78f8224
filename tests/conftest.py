"""Tiny random-weight models and a tiny WordPiece vocab, built locally: tests never download anything."""

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# No tqdm monitor thread: a second Python thread makes ad2_ds.testing.launch start ranks by forkserver (slower) instead
# of fork, because forking while another thread holds a lock leaves that lock held forever in the child.
import tqdm  # noqa: E402

tqdm.tqdm.monitor_interval = 0

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


@pytest.fixture
def no_dist_left():
    """For tests that initialise torch.distributed in the pytest process: tear it down afterwards, since later
    tests fork 2-rank jobs, which a live process group in the parent forbids."""
    yield
    import torch.distributed as dist

    from ad2_ds.testing import reset_deepspeed_state

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    reset_deepspeed_state()


def write_glue_fixture(root, n_train=40, n_dev=12, seed=0):
    """A tiny SST-2 folder in the GLUE TSV layout (header ``sentence\\tlabel``) from the tiny vocab's words."""
    import random

    rng = random.Random(seed)
    pos, neg = ["good", "great", "fun", "love"], ["bad", "awful", "boring", "hate"]
    task = root / "SST-2"
    task.mkdir(parents=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            label = i % 2
            words = [rng.choice(pos if label else neg)] + rng.sample(
                ["the", "movie", "film", "plot", "was", "very"], 3
            )
            rng.shuffle(words)
            rows.append(" ".join(words[: 2 + i % 3]) + f"\t{label}")
        (task / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root


def save_tiny_teacher(path, vocab_path, num_labels=2, layers=2):
    from transformers import BertTokenizer

    model = tiny_bert(num_labels=num_labels, seed=1, layers=layers)
    model.save_pretrained(path)
    BertTokenizer(vocab=str(vocab_path)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_rank():
    """DeepSpeed on one gloo rank inside the pytest process (no shm op compile), torn down afterwards."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import deepspeed

    from ad2_ds.dist import init_distributed
    from ad2_ds.testing import reset_deepspeed_state

    init_distributed()
    yield deepspeed
    # Leave no process group behind: later tests fork 2-rank jobs, which a live group in this process forbids.
    torch.distributed.destroy_process_group()
    reset_deepspeed_state()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def write_tiny_wordnet(root, synsets=None, exceptions=None):
    """A WordNet 3.0 database folder in the real file format (wndb(5WN)): ``synsets`` maps a part of speech to
    lists of lemmas, one list per synset; ``exceptions`` maps a part of speech to {inflected: base}. Offsets are the
    byte offsets of each synset's line, as in WordNet, behind a licence header of lines starting with spaces."""
    synsets = synsets or {
        "noun": [["movie", "film"], ["plot", "secret_plan"], ["goose"]],
        "adj": [["good(a)", "great"], ["bad", "awful"]],
        "verb": [["love", "enjoy"]],
    }
    exceptions = exceptions or {"noun": {"geese": "goose"}}
    root.mkdir(parents=True, exist_ok=True)
    header = "  1 This is a test database, not WordNet.  \n  2   \n"
    for pos in ("noun", "verb", "adj", "adv"):
        data, index = header.encode(), {}
        for words in synsets.get(pos, []):
            offset = len(data)
            fields = [f"{offset:08d}", "00", pos[0], f"{len(words):02x}"]
            for w in words:
                fields += [w, "0"]
                index.setdefault(w.split("(")[0].lower(), []).append(offset)
            data += (" ".join(fields + ["000", "|", "a gloss"]) + "  \n").encode()
        (root / f"data.{pos}").write_bytes(data)
        lines = [f"{lemma} {pos[0]} {len(offs)} 0 {len(offs)} 0 " + " ".join(f"{o:08d}" for o in offs) + "  "
                 for lemma, offs in sorted(index.items())]  # fmt: skip
        (root / f"index.{pos}").write_text(header + "".join(line + "\n" for line in lines))
        exc = exceptions.get(pos, {})
        (root / f"{pos}.exc").write_text("".join(f"{k} {v}\n" for k, v in exc.items()))
    return root


DECODER_SIZES = dict(
    vocab_size=80,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention: 2 query heads per key/value head
    intermediate_size=64,
    max_position_embeddings=64,
    num_labels=3,
)


def tiny_decoder(arch, seed=0, pad_token_id=1, **kw):
    import transformers

    config = getattr(transformers, f"{arch}Config")(**{**DECODER_SIZES, **kw}, pad_token_id=pad_token_id)
    torch.manual_seed(seed)
    return getattr(transformers, f"{arch}ForSequenceClassification")(config).eval()


def decoder_tokenizer(padding_side="right"):
    """A Llama-like word-level tokenizer: no pad token, an eos appended to every text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "<s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>", bos_token="<s>",
                                   padding_side=padding_side)  # fmt: skip


def recipe_rank_loads(rank, world_size, argv):
    """One rank of ``recipes/distill_glue.py`` (for ``ad2_ds.testing.launch``): its exit code and every path a whole
    classifier was loaded from on this rank (``AutoModelForSequenceClassification.from_pretrained``)."""
    from transformers import AutoModelForSequenceClassification

    from recipes import distill_glue

    loaded, whole = [], AutoModelForSequenceClassification.from_pretrained.__func__

    def record(cls, path, *args, **kwargs):
        loaded.append(str(path))
        return whole(cls, path, *args, **kwargs)

    AutoModelForSequenceClassification.from_pretrained = classmethod(record)
    return distill_glue.main(argv), loaded


def write_ds_config(path, **overrides):
    """ds_configs/zero2.json with ``overrides`` (e.g. train_micro_batch_size_per_gpu=4), written to ``path``."""
    cfg = json.loads((Path(__file__).resolve().parents[1] / "ds_configs" / "zero2.json").read_text())
    cfg.update(overrides)
    Path(path).write_text(json.dumps(cfg))
    return Path(path)


@pytest.fixture
def world(tmp_path, tiny_vocab):
    """(tmp_path, a GLUE-format sst2 fixture, a tiny saved teacher, a DeepSpeed JSON at micro-batch 4)."""
    data = write_glue_fixture(tmp_path / "glue")
    teacher = save_tiny_teacher(tmp_path / "teacher", tiny_vocab)
    return tmp_path, data, teacher, write_ds_config(tmp_path / "ds.json", train_micro_batch_size_per_gpu=4)
