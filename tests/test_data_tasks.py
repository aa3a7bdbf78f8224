"""Task registry: names, aliases, spec invariants."""

import dataclasses

import pytest

from ad2_ds.data.tasks import GLUE_TASKS, OFFLINE_TASKS, TASKS, TaskSpec, TsvLayout, get_task


def test_all_tasks_registered():
    assert GLUE_TASKS == ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
    assert OFFLINE_TASKS == ("movie-polarity", "movie-valence", "trec", "sms-spam", "sentiment3")
    assert set(TASKS) == set(GLUE_TASKS) | set(OFFLINE_TASKS)


@pytest.mark.parametrize(
    "alias, name",
    [
        ("SST-2", "sst2"),
        ("sst2", "sst2"),
        ("STS-B", "stsb"),
        ("sts_b", "stsb"),
        ("MNLI", "mnli"),
        ("CoLA", "cola"),
        ("QQP", "qqp"),
        ("Movie-Polarity", "movie-polarity"),
        ("sms_spam", "sms-spam"),
        (" trec ", "trec"),
    ],
)
def test_aliases(alias, name):
    assert get_task(alias).name == name


def test_unknown_task_message_lists_choices():
    with pytest.raises(ValueError, match=r"unknown task 'squad': choose one of cola, sst2, .*sms-spam"):
        get_task("squad")


def test_spec_facts():
    assert get_task("mnli").dev_splits == ("dev_matched", "dev_mismatched")
    assert get_task("mnli").num_labels == 3 and get_task("mnli").is_pair
    assert get_task("stsb").is_regression and get_task("stsb").num_labels == 1 and get_task("stsb").label_list is None
    assert get_task("movie-valence").is_regression
    assert get_task("cola").tsv == TsvLayout(has_header=False, text_columns=(3,), label_column=1)
    assert get_task("mrpc").tsv.text_columns == ("#1 String", "#2 String")
    assert get_task("trec").num_labels == 6
    assert get_task("sms-spam").main_metric == "f1"
    assert get_task("cola").main_metric == "matthews_correlation"
    assert not get_task("sst2").is_offline and get_task("trec").is_offline
    assert all(get_task(t).test_split == "test" for t in ("movie-polarity", "movie-valence", "trec", "sms-spam"))
    assert get_task("sentiment3").label_list == ("negative", "neutral", "positive")
    assert get_task("sentiment3").test_split == "test" and get_task("sentiment3").is_offline
    assert get_task("sst2").test_split is None
    fields = [f.name for f in dataclasses.fields(TaskSpec)]
    assert fields.index("test_split") == fields.index("hf_name") + 1  # helper 11's identical field sits there too


def test_spec_is_frozen_and_validated():
    spec = get_task("sst2")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "x"
    with pytest.raises(ValueError, match="main_metric"):
        dataclasses.replace(spec, main_metric="f1")
    with pytest.raises(ValueError, match="label_list must be None"):
        dataclasses.replace(spec, is_regression=True)
    with pytest.raises(ValueError, match="header names"):
        TsvLayout(has_header=False, text_columns=("sentence",), label_column=1)
    assert isinstance(spec, TaskSpec)
