"""GLUE-format loading on small files written here, in each task's real column layout; bad files → one clear error."""

import datasets
import pytest

from ad2_ds.data import glue
from ad2_ds.data.glue import load_task, read_tsv_split
from ad2_ds.data.tasks import GLUE_TASKS, get_task

MNLI_TRAIN_HEADER = (
    "index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse "
    "sentence2_parse sentence1 sentence2 label1 gold_label"
).split()
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]

# per task: (header or None, row maker (i, text_a, text_b, raw label) -> fields, raw labels of 3 rows)
LAYOUTS = {
    "cola": (None, lambda i, a, b, y: ["gj04", y, "*" if y == "0" else "", a], ["1", "0", "1"]),
    "sst2": (["sentence", "label"], lambda i, a, b, y: [a, y], ["0", "1", "1"]),
    "mrpc": (
        ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
        lambda i, a, b, y: [y, str(100 + i), str(200 + i), a, b],
        ["1", "0", "1"],
    ),
    "stsb": (
        "index genre filename year old_index source1 source2 sentence1 sentence2 score".split(),
        lambda i, a, b, y: [str(i), "main-captions", "MSRvid", "2012test", str(i), "none", "none", a, b, y],
        ["5.000", "0.500", "3.2"],
    ),
    "qqp": (
        ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
        lambda i, a, b, y: [str(i), str(2 * i), str(2 * i + 1), a, b, y],
        ["0", "1", "0"],
    ),
    "mnli": (
        MNLI_TRAIN_HEADER,
        lambda i, a, b, y: [str(i), "1", f"{i}e", "fiction", "( a )", "( b )", "(ROOT a)", "(ROOT b)", a, b, y, y],
        ["neutral", "contradiction", "entailment"],
    ),
    "qnli": (
        ["index", "question", "sentence", "label"],
        lambda i, a, b, y: [str(i), a, b, y],
        ["entailment", "not_entailment", "entailment"],
    ),
    "rte": (
        ["index", "sentence1", "sentence2", "label"],
        lambda i, a, b, y: [str(i), a, b, y],
        ["not_entailment", "entailment", "entailment"],
    ),
    "wnli": (["index", "sentence1", "sentence2", "label"], lambda i, a, b, y: [str(i), a, b, y], ["1", "0", "0"]),
}
# quotes at a field's start would open a quoted field (swallowing tabs and lines) if quoting were on
TEXTS_A = ['the movie was "good', '"what" is it ?', "a 'plot' that is boring"]
TEXTS_B = ["it was fun", '" who won the prize', "this is not fun"]


def write_split(path, task, split, labels=None, rows=None):
    header, make_row, default_labels = LAYOUTS[task]
    if task == "mnli" and split != "train":
        header = MNLI_DEV_HEADER
        train_row = LAYOUTS["mnli"][1]

        def make_row(i, a, b, y):  # dev files carry five annotator labels before gold_label
            return train_row(i, a, b, y)[:-1] + [y, y, y, y, y]

    labels = labels or default_labels
    lines = [] if header is None else ["\t".join(header)]
    rows = rows if rows is not None else [make_row(i, TEXTS_A[i], TEXTS_B[i], y) for i, y in enumerate(labels)]
    lines += ["\t".join(r) for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_task(root, task):
    spec = get_task(task)
    for split in spec.splits:
        write_split(root / spec.dir_name / f"{split}.tsv", task, split)
    return root


@pytest.mark.parametrize("task", GLUE_TASKS)
def test_load_every_glue_task(tmp_path, task):
    spec = get_task(task)
    dsdict = load_task(task, write_task(tmp_path, task))
    assert list(dsdict) == list(spec.splits)
    raw_labels = LAYOUTS[task][2]
    for ds in dsdict.values():
        expected_cols = ["text_a", "text_b", "label", "idx"] if spec.is_pair else ["text_a", "label", "idx"]
        assert ds.column_names == expected_cols
        assert ds["idx"] == [0, 1, 2]
        assert ds["text_a"] == TEXTS_A  # bare quotes survive: quoting is off
        if spec.is_pair:
            assert ds["text_b"] == TEXTS_B
        if spec.is_regression:
            assert ds["label"] == pytest.approx([float(y) for y in raw_labels])
        else:
            assert ds["label"] == [spec.tsv_label_values.index(y) for y in raw_labels]
            assert ds.features["label"].names == list(spec.label_list)


def test_mnli_label_names_and_dev_splits(tmp_path):
    dsdict = load_task("MNLI", write_task(tmp_path, "mnli"))
    assert set(dsdict) == {"train", "dev_matched", "dev_mismatched"}
    names = dsdict["dev_mismatched"].features["label"].names
    assert [names[y] for y in dsdict["dev_mismatched"]["label"]] == ["neutral", "contradiction", "entailment"]


def test_data_dir_may_be_the_task_folder_and_splits_selectable(tmp_path):
    write_task(tmp_path, "rte")
    dsdict = load_task("rte", tmp_path / "RTE", splits=["dev"])
    assert list(dsdict) == ["dev"] and len(dsdict["dev"]) == 3
    with pytest.raises(ValueError, match=r"rte has no split\(s\) \['test'\]"):
        load_task("rte", tmp_path, splits=["test"])


def test_header_only_file(tmp_path):
    write_task(tmp_path, "sst2")
    write_split(tmp_path / "SST-2" / "dev.tsv", "sst2", "dev", rows=[])
    with pytest.raises(ValueError, match=r"dev.tsv has no examples \(empty or header only\)"):
        load_task("sst2", tmp_path)


def test_row_with_missing_field(tmp_path):
    rows = [["gj04", "1", "", "fine sentence"], ["gj04", "0", "*"]]  # second data row lost its sentence
    write_split(tmp_path / "CoLA" / "train.tsv", "cola", "train", rows=rows)
    with pytest.raises(ValueError, match=r"train.tsv line 2: 3 tab-separated fields, cola needs at least 4"):
        read_tsv_split(get_task("cola"), tmp_path / "CoLA" / "train.tsv")


def test_missing_header_column(tmp_path):
    path = tmp_path / "QNLI" / "train.tsv"
    path.parent.mkdir()
    path.write_text("index\tquestion\tsentence\tgold\n0\twhat ?\tit\tentailment\n")
    with pytest.raises(ValueError, match=r"column 'label' is not in the header \['index', 'question', 'sentence'"):
        read_tsv_split(get_task("qnli"), path)


def test_bad_label_names_row_and_value(tmp_path):
    write_split(tmp_path / "SST-2" / "train.tsv", "sst2", "train", labels=["0", "1", "2"])
    with pytest.raises(ValueError, match=r"train.tsv line 4: label '2' is not one of \['0', '1'\] for task sst2"):
        read_tsv_split(get_task("sst2"), tmp_path / "SST-2" / "train.tsv")
    write_split(tmp_path / "STS-B" / "train.tsv", "stsb", "train", labels=["1.0", "n/a", "2"])
    with pytest.raises(ValueError, match=r"line 3: label 'n/a' is not a number"):
        read_tsv_split(get_task("stsb"), tmp_path / "STS-B" / "train.tsv")


def test_missing_dir_and_split_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_task("sst2", tmp_path / "nope")
    with pytest.raises(ValueError, match=r"no SST-2 folder in .*SST-2/train.tsv"):
        load_task("sst2", tmp_path)
    write_split(tmp_path / "MNLI" / "train.tsv", "mnli", "train")
    with pytest.raises(ValueError, match=r"missing split file .*dev_matched.tsv for task mnli"):
        load_task("mnli", tmp_path)


def test_save_to_disk_copy_with_hub_columns(tmp_path):
    # the hub's column names and split names, as load_from_disk returns them
    hub = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {"premise": ["p1", "p2"], "hypothesis": ["h1", "h2"], "label": [2, 0], "idx": [7, 8]}
            )
            for split in ("train", "validation_matched", "validation_mismatched")
        }
    )
    hub.save_to_disk(str(tmp_path / "MNLI"))
    dsdict = load_task("mnli", tmp_path)
    assert list(dsdict) == ["train", "dev_matched", "dev_mismatched"]
    assert dsdict["dev_matched"].column_names == ["text_a", "text_b", "label", "idx"]
    assert dsdict["dev_matched"]["text_b"] == ["h1", "h2"] and dsdict["train"]["idx"] == [7, 8]
    assert dsdict["train"]["label"] == [2, 0]


def test_hub_failure_gives_one_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub")

    monkeypatch.setattr(glue.datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"could not load qqp from the Hugging Face hub .*pass data_dir"):
        load_task("qqp")


def test_qqp_skips_short_rows_other_tasks_do_not(tmp_path, caplog):
    make_row = LAYOUTS["qqp"][1]
    short = ["1", "2", "3", "a question with no pair"]
    rows = [make_row(0, "what ?", "who ?", "1"), short, make_row(2, "a", "b", "0")]
    write_split(tmp_path / "QQP" / "train.tsv", "qqp", "train", rows=rows)
    ds = read_tsv_split(get_task("qqp"), tmp_path / "QQP" / "train.tsv")
    assert ds["text_a"] == ["what ?", "a"] and ds["label"] == [1, 0] and ds["idx"] == [0, 1]
    assert "skipped 1 rows" in caplog.text
    write_split(tmp_path / "RTE" / "train.tsv", "rte", "train", rows=[["0", "a premise", "entailment"]])
    with pytest.raises(ValueError, match="line 2: 3 tab-separated fields, rte needs at least 4"):
        read_tsv_split(get_task("rte"), tmp_path / "RTE" / "train.tsv")


def test_batch_key_names_match_the_teacher_interface():
    from ad2_ds.teachers import base

    assert glue.MODEL_INPUT_KEYS == base.MODEL_INPUT_KEYS and glue.TEACHER_PREFIX == base.TEACHER_PREFIX


def test_carve_test_split_is_a_fixed_hash_of_the_text():
    from ad2_ds.data.glue import carve_test_split

    texts = [f"sentence {i}" for i in range(400)] + ["sentence 3"]  # a duplicate of example 3
    train = datasets.Dataset.from_dict(
        {"text_a": texts, "text_b": ["b"] * len(texts), "label": [i % 2 for i in range(len(texts))],
         "idx": list(range(len(texts)))}
    )  # fmt: skip
    dev = train.select(range(5))
    out = carve_test_split(datasets.DatasetDict(train=train, dev=dev), 0.2)
    again = carve_test_split(datasets.DatasetDict(train=train.shuffle(seed=1), dev=dev), 0.2)
    assert sorted(out["test"]["idx"]) == sorted(again["test"]["idx"])  # independent of row order
    assert len(out["train"]) + len(out["test"]) == len(train) and 40 < len(out["test"]) < 120
    assert not set(out["train"]["idx"]) & set(out["test"]["idx"])
    assert (3 in out["test"]["idx"]) == (400 in out["test"]["idx"])  # one text, one split
    assert out["dev"]["idx"] == dev["idx"]
    with pytest.raises(ValueError, match="fraction"):
        carve_test_split(datasets.DatasetDict(train=train), 1.0)
