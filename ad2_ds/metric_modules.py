"""A metric of one's own for one's own data, through Hugging Face ``evaluate``: ``--metric path/to/my_metric``.

    recipes/distill_glue.py --train_file t.csv --validation_file d.csv --metric ./metrics/cost_weighted ...
    key, module = load_metric_module("./metrics/cost_weighted")   # an evaluate module: folder or .py script
    score = compute_with_module("./metrics/cost_weighted", key, predictions, references)

The module is what ``evaluate.load`` takes: a local folder holding ``<name>.py`` (or the script itself), or a hub name
(``accuracy``, ``someone/metric``) where the machine reaches the hub; ``evaluate`` itself ships no metric scripts.
Its ``compute(predictions=..., references=...)`` gets class ids (regression: floats) and must return one number, or
one under the module's own name: that score picks the best student, and higher must be better. It is loaded in the
checks before anything else loads (a module that cannot be loaded is one line there) and tried once on the dev
labels when the data is read, so a module that fails says so before any model is loaded.
"""

import logging
from typing import Dict, Sequence

logger = logging.getLogger(__name__)
_LOADED: Dict[str, object] = {}


class MetricModuleError(ValueError):
    """The metric module cannot be loaded or used: one line saying which and what to do."""


def load_metric_module(spec: str):
    """The loaded ``evaluate`` module for ``spec`` (loaded once per process, kept in memory: it writes no cache
    files, so ranks on one machine never share one)."""
    if spec in _LOADED:
        return _LOADED[spec]
    try:
        import evaluate
    except ImportError as e:
        raise MetricModuleError(
            f"--metric {spec}: a metric module needs the evaluate package: pip install evaluate"
        ) from e
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # no line per retry of an unreachable hub: the one error below says it
    try:
        module = evaluate.load(spec, keep_in_memory=True)
    except Exception as e:  # a missing path, no hub, a script that does not import: one line for all
        text = " ".join(str(e).split())[:300]
        raise MetricModuleError(
            f"--metric {spec}: not a metric this task computes, and evaluate cannot load it ({type(e).__name__}: "
            f"{text}); pass a local evaluate module (a folder with {spec.rstrip('/').split('/')[-1]}.py, or the .py "
            "file), or a built-in metric"
        ) from None
    finally:
        hub_logger.setLevel(level)
    _LOADED[spec] = module
    return module


def metric_key(spec: str, references: Sequence, is_regression: bool) -> str:
    """The key of the module's score, found by one compute on the dev labels as their own predictions."""
    result = _compute(spec, references, references)
    name = getattr(load_metric_module(spec), "name", None)
    numbers = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if name in numbers:
        return name
    if len(numbers) == 1:
        return next(iter(numbers))
    raise MetricModuleError(
        f"--metric {spec}: its compute returned {sorted(result)}; it must return one number (or one named "
        f"{name!r}) to pick the best student by"
    )


def compute_with_module(spec: str, key: str, predictions: Sequence, references: Sequence) -> float:
    """The module's score of class ids (or regression predictions) against the labels."""
    return float(_compute(spec, predictions, references)[key])


def _compute(spec: str, predictions: Sequence, references: Sequence) -> dict:
    module = load_metric_module(spec)
    try:
        result = module.compute(predictions=list(predictions), references=list(references))
    except Exception as e:  # the user's script: whatever it raises, one line naming it
        text = " ".join(str(e).split())[:300]
        raise MetricModuleError(f"--metric {spec}: its compute failed ({type(e).__name__}: {text})") from None
    if not isinstance(result, dict):
        raise MetricModuleError(f"--metric {spec}: its compute returned {type(result).__name__}, not a dict of scores")
    return result
