"""A teacher's labels against the user's data, and the data's labels written into a model's config.

order = match_teacher_labels(teacher.config, spec)   # None: same labels in the same order
align_teacher_labels(teacher, spec)                 # the head's rows reordered to the data's label order
set_label_names(student.config, spec)               # id2label / label2id in the saved config.json
"""

import logging
from typing import List, Optional, Tuple

from ad2_ds.data.tasks import TaskSpec

from .options import DataError

logger = logging.getLogger(__name__)


def label_names(config) -> Optional[List[str]]:
    """A HF config's class names in id order, or None when they are the default ``LABEL_0``, ``LABEL_1``, ..."""
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(config.num_labels)]
    if all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return names


def match_teacher_labels(teacher_config, spec: TaskSpec) -> Optional[Tuple[int, ...]]:
    """Which teacher output serves each of the data's labels: None when they already agree, else ``order`` with
    ``logits_t[:, order]`` in the data's label order.

    Same names in another order: remapped (logged). Unnamed teacher labels (``LABEL_k``) of the right count: by
    position, with a warning. Anything else: :class:`DataError`.
    """
    n_t = teacher_config.num_labels
    if spec.is_regression:
        if n_t != 1:
            raise DataError(f"{spec.name} is a regression but the teacher predicts {n_t} labels; it needs 1")
        return None
    data_names = list(spec.label_list)
    names = label_names(teacher_config)
    if names is None:
        if n_t != len(data_names):
            raise DataError(
                f"the teacher predicts {n_t} unnamed labels but {spec.name} has {len(data_names)}: {data_names}"
            )
        logger.warning(
            "the teacher's labels are unnamed (LABEL_0..LABEL_%d): mapped by position to %s", n_t - 1, data_names
        )
        return None
    if sorted(names) != sorted(data_names):
        raise DataError(
            f"the teacher's labels {names} are not the data's labels {data_names}: use a teacher trained on this "
            "label set, or drop --teacher to fine-tune one"
        )
    if names == data_names:
        return None
    order = tuple(names.index(n) for n in data_names)
    logger.info("the teacher's labels %s are the data's in another order: remapped to %s", names, data_names)
    return order


def align_teacher_labels(model, spec: TaskSpec):
    """Check a teacher model's labels against the data's (:func:`match_teacher_labels`); when only the order
    differs, reorder its classification head's output rows in place so that it predicts in the data's order.
    Returns the model, whose config then names the data's labels."""
    order = match_teacher_labels(model.config, spec)
    if order is not None:
        head = classifier_head(model)
        with _no_grad():
            head.weight.copy_(head.weight[list(order)].clone())
            if head.bias is not None:
                head.bias.copy_(head.bias[list(order)].clone())
    if not spec.is_regression:
        set_label_names(model.config, spec)
    return model


def classifier_head(model):
    """The last ``nn.Linear`` whose outputs are the class logits (``classifier``, ``classifier.out_proj``, ...)."""
    from torch import nn

    n = model.config.num_labels
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == n]
    if not heads:
        raise DataError(f"no linear layer with {n} outputs in {type(model).__name__}: cannot reorder its labels")
    return heads[-1]


def _no_grad():
    import torch

    return torch.no_grad()


def set_label_names(config, spec: TaskSpec) -> None:
    """Write the task's labels into a model config (``id2label`` / ``label2id``, saved in config.json)."""
    if spec.is_regression:
        config.num_labels = 1
        config.problem_type = "regression"
        return
    config.id2label = {i: name for i, name in enumerate(spec.label_list)}
    config.label2id = {name: i for i, name in enumerate(spec.label_list)}
