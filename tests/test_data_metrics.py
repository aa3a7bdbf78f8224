"""GLUE metrics against values computed by hand."""

import math

import numpy as np
import pytest
import torch

from ad2_ds.data.tasks import get_task
from ad2_ds.metrics import compute_metrics, main_metric_value, predictions_from_logits

# confusion matrix by hand: TP=3, FN=1, FP=1, TN=3
LABELS = [1, 1, 1, 1, 0, 0, 0, 0]
PREDS = [1, 1, 1, 0, 1, 0, 0, 0]


def logits_for(preds, num_labels=2):
    out = np.zeros((len(preds), num_labels), dtype=np.float32)
    out[np.arange(len(preds)), preds] = 2.0
    return out - 1.0


def test_matthews_correlation_by_hand():
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (9 - 1) / sqrt(4*4*4*4) = 0.5
    scores = compute_metrics(get_task("cola"), logits_for(PREDS), LABELS)
    assert scores == {"matthews_correlation": pytest.approx(0.5)}


@pytest.mark.parametrize("task", ["mrpc", "qqp", "sms-spam"])
def test_f1_and_accuracy_by_hand(task):
    # precision = 3/4, recall = 3/4 -> F1 = 0.75; accuracy = 6/8
    scores = compute_metrics(get_task(task), torch.tensor(logits_for(PREDS)), torch.tensor(LABELS))
    assert scores == {"f1": pytest.approx(0.75), "accuracy": pytest.approx(0.75)}


def test_f1_is_of_class_one():
    # all predicted 0: accuracy 0.5 but no positive found -> F1 0
    scores = compute_metrics(get_task("mrpc"), logits_for([0] * 8), LABELS)
    assert scores["f1"] == 0.0 and scores["accuracy"] == pytest.approx(0.5)


def test_accuracy_three_classes():
    preds = [0, 1, 2, 2, 1]
    labels = [0, 1, 2, 0, 0]
    assert compute_metrics(get_task("mnli"), logits_for(preds, 3), labels) == {"accuracy": pytest.approx(3 / 5)}


@pytest.mark.parametrize("task", ["stsb", "movie-valence"])
def test_pearson_spearman_by_hand(task):
    # x = [1, 2, 3], y = [1, 2, 4]: cov-sum 3, var-sums 2 and 42/9 -> r = 9 / sqrt(84); ranks agree -> rho = 1
    scores = compute_metrics(get_task(task), np.array([[1.0], [2.0], [3.0]]), np.array([1.0, 2.0, 4.0]))
    assert scores["pearson"] == pytest.approx(9 / math.sqrt(84))
    assert scores["spearmanr"] == pytest.approx(1.0)
    # rank differences d = (-2, 1, 1): rho = 1 - 6 * 6 / (3 * 8) = -0.5
    scores = compute_metrics(get_task(task), torch.tensor([1.0, 2.0, 3.0]), [3.0, 1.0, 2.0])
    assert scores["spearmanr"] == pytest.approx(-0.5)


def test_bf16_logits_accepted():
    scores = compute_metrics(get_task("sst2"), torch.tensor(logits_for(PREDS)).bfloat16(), LABELS)
    assert scores["accuracy"] == pytest.approx(0.75)


def test_shape_errors():
    with pytest.raises(ValueError, match="3 classes"):
        compute_metrics(get_task("mnli"), logits_for(PREDS, 2), LABELS)
    with pytest.raises(ValueError, match="8 predictions but 7 labels"):
        compute_metrics(get_task("sst2"), logits_for(PREDS), LABELS[:7])
    with pytest.raises(ValueError, match="regression"):
        predictions_from_logits(get_task("stsb"), np.zeros((3, 2)))


def test_main_metric_value():
    assert main_metric_value(get_task("mrpc"), {"f1": 0.8, "accuracy": 0.7}) == 0.8
    assert main_metric_value(get_task("mnli"), {"dev_matched/accuracy": 0.6}, split="dev_matched") == 0.6
    with pytest.raises(KeyError, match="matthews_correlation"):
        main_metric_value(get_task("cola"), {"accuracy": 0.9})
