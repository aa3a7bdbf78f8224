"""GLUE metrics: ``scores = compute_metrics(get_task("mrpc"), logits, labels)`` → ``{"f1": .., "accuracy": ..}``.

Keys are the ones GLUE reports (values as fractions, not percent):

- accuracy: every classification task;
- f1 (of class 1, the positive class) and accuracy: MRPC, QQP, sms-spam (class 1 = spam), two-class custom data;
- macro_f1 (the unweighted mean of every class's F1) and accuracy: custom data with three or more classes;
- matthews_correlation: CoLA;
- pearson and spearmanr: STS-B, movie-valence.

``main_metric_value(spec, scores)`` is the single number used to pick the best checkpoint (``spec.main_metric``).
For a task with several dev splits (MNLI matched / mismatched) call ``compute_metrics`` once per split; the caller
prefixes keys with the split name (``"dev_matched/accuracy"``), and the first of ``spec.dev_splits`` drives model
selection. scikit-learn and scipy compute the numbers: ``evaluate``'s GLUE metric needs a hub download. A user's own
metric (``--metric path/to/module`` for their own data) is an ``evaluate`` module (:mod:`ad2_ds.metric_modules`).
"""

from typing import Dict, Mapping, Optional

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from ad2_ds.data.tasks import TaskSpec


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly bf16 (numpy has no bf16)
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def predictions_from_logits(spec: TaskSpec, predictions) -> np.ndarray:
    """Class ids [N] from logits [N, C], or float predictions [N] from regression outputs [N] or [N, 1]."""
    preds = _to_numpy(predictions)
    if spec.is_regression:
        if preds.ndim == 2 and preds.shape[1] == 1:
            preds = preds[:, 0]
        if preds.ndim != 1:
            raise ValueError(f"{spec.name} is a regression: expected predictions [N] or [N, 1], got {preds.shape}")
        return preds.astype(np.float64)
    if preds.ndim == 2:
        if preds.shape[1] != spec.num_labels:
            raise ValueError(f"{spec.name} has {spec.num_labels} classes but the logits are {preds.shape}")
        return preds.argmax(axis=1)
    if preds.ndim == 1 and np.issubdtype(preds.dtype, np.integer):
        return preds  # already class ids
    raise ValueError(f"{spec.name}: expected logits [N, {spec.num_labels}] or class ids [N], got {preds.shape}")


def compute_metrics(spec: TaskSpec, predictions, labels) -> Dict[str, float]:
    """GLUE's metrics for one evaluation split.

    predictions: logits [N, C] (or class ids [N]) for classification, [N] or [N, 1] for regression.
    labels: [N] class ids or float targets.
    """
    preds = predictions_from_logits(spec, predictions)
    labels = _to_numpy(labels).reshape(-1)
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("no examples to score")
    out: Dict[str, float] = {}
    modules = dict(spec.metric_modules)
    for name in spec.metric_names:
        if name in modules:  # the user's evaluate module (ad2_ds.metric_modules)
            from ad2_ds.metric_modules import compute_with_module

            out[name] = compute_with_module(modules[name], name, preds.tolist(), labels.tolist())
        elif name == "accuracy":
            out[name] = float(accuracy_score(labels, preds))
        elif name == "f1":
            out[name] = float(f1_score(labels, preds, pos_label=1, average="binary", zero_division=0.0))
        elif name == "macro_f1":
            classes = list(range(spec.num_labels))
            out[name] = float(f1_score(labels, preds, labels=classes, average="macro", zero_division=0.0))
        elif name == "matthews_correlation":
            out[name] = float(matthews_corrcoef(labels, preds))
        elif name == "pearson":
            out[name] = float(pearsonr(preds, labels.astype(np.float64))[0])
        elif name == "spearmanr":
            out[name] = float(spearmanr(preds, labels.astype(np.float64))[0])
        else:
            raise ValueError(f"{spec.name}: no implementation for metric {name!r}")
    return out


def main_metric_value(spec: TaskSpec, scores: Mapping[str, float], split: Optional[str] = None) -> float:
    """The number that picks the best checkpoint: ``scores[spec.main_metric]`` (higher is better).

    With ``split``, reads the split-prefixed key (``"dev_matched/accuracy"``) that a multi-split caller writes.
    """
    key = spec.main_metric if split is None else f"{split}/{spec.main_metric}"
    if key not in scores:
        raise KeyError(f"{spec.name}: main metric {key!r} is not among the scores {sorted(scores)}")
    return float(scores[key])
