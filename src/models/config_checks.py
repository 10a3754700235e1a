"""Checks every model config dataclass runs when it is built (EMMA, Temporal LoRA, TTT, Titans), and the preset
mechanism of the configs whose presets are tables of field values (:class:`PresetConfig`).

``config_overrides`` is a free ``dict`` on the command line, so nothing checks its keys, types or ranges before the
model is built; a bad value would surface as a traceback from deep inside torch or peft, or as a NaN some training
steps later (``readout_temperature: 0``). Here it is one line naming the key as the user writes it:
``model.init_args.config_overrides.readout_temperature=0 must be > 0.``
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from dataclasses import fields, is_dataclass
from typing import Any, ClassVar, Literal, Self, Union, get_args, get_origin, get_type_hints

from src.errors import EngramError

OVERRIDES_KEY = "model.init_args.config_overrides"

# The ranges a field may be declared with, named by the words that complete "must be ...".
RULES: dict[str, Callable[[float], bool]] = {
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    ">= 2": lambda v: v >= 2,
    "in (0, 1)": lambda v: 0 < v < 1,
    "in (0, 1]": lambda v: 0 < v <= 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
}


class PresetConfig:
    """``from_name`` / ``from_dict`` / ``to_dict`` / ``replace`` for a config dataclass whose named presets
    (``PRESETS``) hold field values; ``PRESET_FAMILY`` names the family in the error for an unknown preset. A family
    whose presets depend on the overrides (TTT's inner learning rate) extends :meth:`preset_values`."""

    PRESETS: ClassVar[Mapping[str, Mapping[str, Any]]]
    PRESET_FAMILY: ClassVar[str]

    @classmethod
    def preset_values(cls, name: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
        return dict(cls.PRESETS[name])

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Self:
        """The preset ``name`` with optional field overrides."""
        if name not in cls.PRESETS:
            raise EngramError(f"unknown {cls.PRESET_FAMILY} preset {name!r}; choose one of {sorted(cls.PRESETS)}.")
        return cls.from_dict({**cls.preset_values(name, overrides), **overrides})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Self:
        """Build from keyword values (e.g. a YAML block); unknown keys are an error that lists the valid ones."""
        check_known(cls, values)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def check_known(cls: type, values: Mapping[str, Any], prefix: str = OVERRIDES_KEY) -> None:
    """Refuse keys of ``values`` that are not fields of the dataclass ``cls``, listing the valid ones."""
    known = sorted(f.name for f in fields(cls))
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise EngramError(f"{prefix} has unknown key(s) {unknown}; valid keys: {', '.join(known)}.")


def check_fields(config: Any, ranges: Mapping[str, str], prefix: str = OVERRIDES_KEY) -> None:
    """Every field of the dataclass instance ``config`` must match its annotation (``Literal`` choices included) and,
    if named in ``ranges``, lie in that range (a key of :data:`RULES`). Raises for the first field that does not."""
    hints = get_type_hints(type(config))
    for f in fields(config):
        value = getattr(config, f.name)
        if not _matches(value, hints[f.name]):
            raise EngramError(f"{prefix}.{f.name}={value!r} must be {_describe(hints[f.name])}.")
        rule = ranges.get(f.name)
        if rule is not None and value is not None and not RULES[rule](value):  # None: the feature is off
            raise EngramError(f"{prefix}.{f.name}={value!r} must be {rule}.")


def _matches(value: Any, hint: Any) -> bool:
    origin = get_origin(hint)
    if origin is Literal:
        return value in get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, arm) for arm in get_args(hint))
    if origin is tuple:  # only the tuple[X, ...] form is used; YAML gives lists, which the modules turn into tuples
        return isinstance(value, tuple | list) and all(_matches(v, get_args(hint)[0]) for v in value)
    if hint is float:  # an int is a fine float; a bool is neither (YAML's true/false are no numbers)
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arm) for arm in get_args(hint))
    if origin is tuple:
        return f"a list whose items are each {_describe(get_args(hint)[0])}"
    if is_dataclass(hint):
        return f"a mapping of {hint.__name__} fields ({', '.join(f.name for f in fields(hint))})"
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))
