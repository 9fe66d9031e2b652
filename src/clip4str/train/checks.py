"""Type and range checks of experiment config values, before anything is built: a wrong value is one line naming
its key, not a traceback from deep inside Lightning or the model."""

from __future__ import annotations

import dataclasses
import reprlib
import types
import typing
from typing import Any, Union

from clip4str.data.augment import check_augment

# Values that must be > 0 or >= 0 (None, where a key allows it, always passes).
POSITIVE = {"data.batch_size", "train.max_steps", "train.max_minutes", "train.base_lr", "train.num_nodes",
            "train.accumulate_grad_batches", "train.val_every_steps", "train.log_every_steps", "train.threads",
            "train.checkpoint_every_minutes", "train.checkpoint_every_steps", "train.grad_clip",
            "model.max_label_length", "model.decoder_depth", "model.decoder_heads", "model.text_context_length",
            "model.num_permutations", "model.decoder_mlp_ratio"}
NON_NEGATIVE = {"data.num_workers", "data.synth_val_size", "data.curriculum_images", "data.min_fonts",
                "data.min_photos", "train.weight_decay", "train.decoder_lr_scale", "model.refine_iters",
                "model.ctc_weight", "model.cross_loss_weight"}
SHARES = {"train.warmup_pct", "train.average_from", "model.dropout", "model.adapter_ratio"}  # in [0, 1]
# Upper bounds where a typo costs all memory before the first step (a batch of 1e10 images).
AT_MOST = {"data.batch_size": 65536, "data.num_workers": 1024, "train.threads": 4096,
           "train.accumulate_grad_batches": 65536}


_SHORT = reprlib.Repr()  # keyword arguments only from Python 3.12
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 4, 80, 80


def short(value: Any) -> str:
    """repr() cut to a line: a YAML alias bomb (nested lists sharing references) expands to gigabytes in full."""
    text = _SHORT.repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def matches(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a type annotation (int, float, str, bool, X | None, list[X], tuple, dict)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        items = [a for a in args if a is not Ellipsis]
        return isinstance(value, (list, tuple)) and (not items or all(matches(v, items[0]) for v in value))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True  # other annotations (dataclasses, literals) are checked where they are used


NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null",
         dict: "a mapping", list: "a list", tuple: "a list"}


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (list, tuple) and args:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    return NAMES.get(origin or hint, str(hint))


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def check_values(section: str, cls: type, values: dict[str, Any]) -> None:
    """Raise ValueError naming the first key of `values` whose value has the wrong type or range for `cls`;
    numbers YAML 1.1 left as strings (`1e-3`: no dot) become floats where a float is expected."""
    hints = typing.get_type_hints(cls)
    own = {f.name for f in dataclasses.fields(cls)}
    for key, value in list(values.items()):
        if key not in own:
            continue
        name, hint = f"{section}.{key}", hints[key]
        if isinstance(value, str) and matches(1.5, hint) and _number(value) is not None:
            value = values[key] = _number(value)
        if not matches(value, hint):
            quote = f" (write it in quotes: {key}: '{value}' in YAML, \"{name}='{value}'\" on the command line)" \
                if matches("x", hint) and isinstance(value, (int, float)) else ""
            raise ValueError(f"{name} must be {_describe(hint)}, got {short(value)}{quote}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if name in POSITIVE and not value > 0 or name in NON_NEGATIVE and not value >= 0:
                raise ValueError(f"{name} must be {'> 0' if name in POSITIVE else '>= 0'}, got {short(value)}")
            if name in SHARES and not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {short(value)}")
            if name in AT_MOST and value > AT_MOST[name]:
                raise ValueError(f"{name} must be at most {AT_MOST[name]}, got {short(value)}")


def check_sources(entries: Any) -> None:
    """data.train: a list of {path, weight > 0, holdout in [0, 1), augment} mappings."""
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"data.train must be a non-empty list of {{path: ..., weight: ...}}, got {short(entries)}")
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ValueError(f"data.train entries are {{path: <folder or synth>, weight: <share>}}, got {short(entry)}")
        unknown = sorted(set(entry) - {"path", "weight", "holdout", "augment"})
        if unknown:
            raise ValueError(f"data.train entry {entry['path']}: unknown key(s) {unknown}; keys: path, weight, "
                             "holdout, augment")
        check_augment(f"data.train entry {entry['path']}", entry.get("augment"))
        weight, holdout = entry.get("weight", 1.0), entry.get("holdout", 0.0)
        if not matches(weight, float) or not weight > 0:
            raise ValueError(f"data.train entry {entry['path']}: weight must be a number > 0, got {short(weight)}")
        if not matches(holdout, float) or not 0 <= holdout < 1:
            raise ValueError(f"data.train entry {entry['path']}: holdout must be in [0, 1), got {short(holdout)}")
