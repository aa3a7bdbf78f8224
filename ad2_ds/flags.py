"""Command-line flags from config dataclasses: a field's metadata holds its help text, so a new field gets its flag.

    parser = argparse.ArgumentParser()
    add_flags(parser, RunConfig)                        # one --flag per field, nested configs included
    config = from_flags(RunConfig, vars(parser.parse_args(argv)))

Fields are declared with :func:`setting` (``setting(64, "max tokens per example")``). Metadata keys:

- ``help``: the flag's help text.
- ``flag``: the flag's name when it differs from the field's (``naive_pga`` for ``fast_pga``).
- ``negate``: the flag is a switch that sets a True-by-default field to False (``--no_progress``).
- ``parse``: turns the flag's string into the field's value (``parse_ranks`` for ``"0,1"``).
- ``choices``: the allowed values.
- ``repeat``: the flag may be given several times (``--teacher A --teacher B``): one value is the value itself, as
  before; several are a tuple.
- ``cli``: False for a field with no flag.
- ``teacher_outputs``: False when the value cannot change what the teacher returns for the training data, so runs
  differing only in it may share one teacher cache (the sweep's cache sharing reads this; the default is True, the
  safe side). ``teacher_outputs="unless default"``: it can, but only away from its default, which is what every run
  before the field existed did; a teacher cache's fingerprint leaves it out at its default, so adding such a field
  does not make the caches users already built stale.
"""

import argparse
import dataclasses
import typing
from typing import Any, Dict, Iterator, Tuple


def setting(default=dataclasses.MISSING, help: str = "", *, default_factory=dataclasses.MISSING, **meta) -> Any:
    """A dataclass field with its flag's metadata (see the module docstring)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help, **meta})


def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(tp):
    """``Optional[float]`` -> float; ``Tuple[int, ...]`` -> tuple."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else str
    origin = typing.get_origin(tp)
    return origin or tp


def walk(cls, prefix: Tuple[str, ...] = ()) -> Iterator[Tuple[Tuple[str, ...], dataclasses.Field, Any]]:
    """Every leaf field of ``cls`` and its nested config dataclasses: ``(path, field, base type)``."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        if dataclasses.is_dataclass(tp):
            yield from walk(tp, prefix + (f.name,))
        else:
            yield prefix + (f.name,), f, tp


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or (f"no_{f.name}" if f.metadata.get("negate") else f.name)


def flags_of(cls) -> Dict[str, str]:
    """Field name -> flag name (without ``--``), for every leaf field that has a flag."""
    return {path[-1]: flag_name(f) for path, f, _ in walk(cls) if f.metadata.get("cli", True)}


def add_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per leaf field of ``cls`` (nested configs share the flat namespace), its default the field's."""
    for _, f, tp in walk(cls):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        name, help_text = "--" + flag_name(f), meta.get("help") or None
        default = f.default if f.default is not dataclasses.MISSING else None
        if tp is bool:
            # A switch turns the default around: --random_start sets True, --no_progress / --naive_pga set False.
            parser.add_argument(name, action="store_true", help=help_text)
            continue
        kind = meta.get("parse") or (tp if tp in (int, float, str) else str)
        extra = {"metavar": meta["metavar"]} if "metavar" in meta else {}
        if meta.get("repeat"):
            extra["action"] = "append"
        parser.add_argument(name, type=kind, default=default, choices=meta.get("choices"), help=help_text, **extra)


def from_flags(cls, values: Dict[str, Any], **overrides):
    """``cls`` built from parsed flag values (``vars(args)``); ``overrides`` replace top-level fields."""
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in overrides:
            kwargs[f.name] = overrides[f.name]
            continue
        tp = _base_type(hints[f.name])
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = from_flags(tp, values)
        elif f.metadata.get("cli", True):
            value = values[flag_name(f)]
            is_switch = tp is bool
            if is_switch:
                value = (not value) if (f.metadata.get("negate") or f.default is True) else bool(value)
            elif f.metadata.get("repeat") and isinstance(value, list):
                value = value[0] if len(value) == 1 else tuple(value)
            if value is not None or f.default is None:
                kwargs[f.name] = value
    return cls(**kwargs)


def as_flat_dict(config) -> Dict[str, Any]:
    """Leaf field name -> value, nested configs flattened (the ``args`` of results.json, as before)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update(as_flat_dict(value))
        else:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def teacher_neutral_flags(cls) -> Dict[str, int]:
    """``--flag`` -> how many values follow it, for every flag whose field cannot change the teacher's outputs
    (metadata ``teacher_outputs=False``): runs that differ only in these may share a teacher cache."""
    return {
        "--" + flag_name(f): 0 if tp is bool else 1
        for _, f, tp in walk(cls)
        if f.metadata.get("cli", True) and not f.metadata.get("teacher_outputs", True)
    }
