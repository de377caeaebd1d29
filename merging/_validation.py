"""Checks of user settings, shared by the callbacks, LightningModules, merge methods and datamodules.

Each check raises at construction, naming the argument and showing the value given:
``TypeError`` for a value of the wrong type (a bool or a float where an int is expected, a
string where a list is expected), ``ValueError`` for a value out of range. Ints are
``numbers.Integral`` but not ``bool``; floats accept any real number but ``bool``, and must be
finite. The checks return the value normalised (``float``, ``int``, ``list``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from numbers import Integral, Real
from typing import Any, TypeVar

T = TypeVar("T")


def _prefix(owner: str | None) -> str:
    return f"{owner}: " if owner else ""


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_int(
    name: str, value: Any, *, minimum: int | None = None, optional: bool = False, owner: str | None = None
) -> int | None:
    """An int (not a bool or a float) ``>= minimum``, or None when ``optional``.

    Raises:
        TypeError: not an int.
        ValueError: below ``minimum``.
    """
    if value is None and optional:
        return None
    what = "an int" + (f" >= {minimum}" if minimum is not None else "") + (" or None" if optional else "")
    if not _is_int(value):
        raise TypeError(f"{_prefix(owner)}{name} must be {what}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{_prefix(owner)}{name} must be {what}, got {value!r}")
    return int(value)


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
    owner: str | None = None,
) -> float | None:
    """A finite real number (an int is accepted, a bool is not) in the given interval.

    Args:
        name: the argument's name.
        value: the value given.
        low: lower bound (None: unbounded).
        high: upper bound (None: unbounded).
        low_open: exclude ``low``.
        high_open: exclude ``high``.
        optional: None is allowed.
        owner: the class or method named first in messages.

    Raises:
        TypeError: not a real number.
        ValueError: not finite, or out of the interval.
    """
    if value is None and optional:
        return None
    interval = _interval(low, high, low_open, high_open)
    what = ("a float " + interval if interval else "a finite float") + (" or None" if optional else "")
    if not _is_real(value):
        raise TypeError(f"{_prefix(owner)}{name} must be {what}, got {value!r}")
    value = float(value)
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or below or above:
        raise ValueError(f"{_prefix(owner)}{name} must be {what}, got {value!r}")
    return value


def check_bool(name: str, value: Any, *, owner: str | None = None) -> bool:
    """True or False (not 0/1, not a string).

    Raises:
        TypeError: not a bool.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{_prefix(owner)}{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[T], *, owner: str | None = None) -> T:
    """One of ``choices``.

    Raises:
        ValueError: not one of them (the message lists them).
    """
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{_prefix(owner)}{name} must be one of {listed}, got {value!r}")
    return value


def check_str(
    name: str,
    value: Any,
    *,
    optional: bool = False,
    path: bool = False,
    nonempty: bool = True,
    owner: str | None = None,
) -> str | None:
    """A string (non-empty when ``nonempty``; an ``os.PathLike`` too when ``path``), or None
    when ``optional``.

    Raises:
        TypeError: not a string.
        ValueError: empty.
    """
    if value is None and optional:
        return None
    if path and isinstance(value, os.PathLike):
        value = os.fspath(value)
    what = ("a path" if path else "a non-empty string" if nonempty else "a string") + (" or None" if optional else "")
    if not isinstance(value, str):
        raise TypeError(f"{_prefix(owner)}{name} must be {what}, got {value!r}")
    if nonempty and not value:
        raise ValueError(f"{_prefix(owner)}{name} must be {what}, got {value!r}")
    return value


def check_callable(name: str, value: Any, *, optional: bool = True, owner: str | None = None) -> Callable | None:
    """A callable, or None when ``optional``.

    Raises:
        TypeError: not callable.
    """
    if value is None and optional:
        return None
    if not callable(value):
        raise TypeError(f"{_prefix(owner)}{name} must be a callable{' or None' if optional else ''}, got {value!r}")
    return value


def _check_sequence(name: str, value: Any, what: str, owner: str | None) -> list:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        shown = f"the string {value!r}" if isinstance(value, str) else repr(value)
        raise TypeError(f"{_prefix(owner)}{name} must be {what}, got {shown}")
    return list(value)


def check_str_list(
    name: str, value: Any, *, optional: bool = False, nonempty: bool = True, owner: str | None = None
) -> list[str] | None:
    """A list (or tuple) of non-empty strings, never a single string.

    Raises:
        TypeError: a string, a non-sequence, or an item that is not a string.
        ValueError: empty (when ``nonempty``) or an empty item.
    """
    if value is None and optional:
        return None
    what = "a list of names" + (" or None" if optional else "")
    items = _check_sequence(name, value, what, owner)
    if nonempty and not items:
        raise ValueError(f"{_prefix(owner)}{name} must be a non-empty {what[2:]}, got []")
    for item in items:
        if not isinstance(item, str) or not item:
            raise TypeError(f"{_prefix(owner)}{name} must be {what}, got the item {item!r} in {value!r}")
    return items


def check_activation_map(name: str, value: Any, *, owner: str | None = None) -> dict[str, Callable]:
    """A non-empty mapping ``{layer name: activation σ}`` of non-empty strings to callables.

    Raises:
        TypeError: a key that is not a string or a value that is not callable.
        ValueError: empty, or an empty name.
    """
    if not value:
        raise ValueError(f"{_prefix(owner)}{name} must name at least one layer, got {value!r}")
    for key, act in value.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"{_prefix(owner)}{name} must map layer names to activations, got the key {key!r}")
        if not callable(act):
            raise TypeError(f"{_prefix(owner)}{name}[{key!r}] must be a callable activation σ, got {act!r}")
    return dict(value)


def check_int_list(
    name: str,
    value: Any,
    *,
    minimum: int | None = None,
    optional: bool = False,
    nonempty: bool = True,
    owner: str | None = None,
) -> list[int] | None:
    """A list (or tuple) of ints ``>= minimum``.

    Raises:
        TypeError: a string, a non-sequence, or an item that is not an int.
        ValueError: empty (when ``nonempty``) or an item below ``minimum``.
    """
    if value is None and optional:
        return None
    bound = f" >= {minimum}" if minimum is not None else ""
    what = f"a list of ints{bound}" + (" or None" if optional else "")
    items = _check_sequence(name, value, what, owner)
    if nonempty and not items:
        raise ValueError(f"{_prefix(owner)}{name} must be a non-empty {what[2:]}, got []")
    for item in items:
        if not _is_int(item):
            raise TypeError(f"{_prefix(owner)}{name} must be {what}, got the item {item!r} in {value!r}")
        if minimum is not None and item < minimum:
            raise ValueError(f"{_prefix(owner)}{name} must be {what}, got the item {item!r} in {value!r}")
    return [int(item) for item in items]


def check_weights(name: str, value: Any, *, optional: bool = True, owner: str | None = None) -> list[float] | None:
    """Merge weights: a non-empty list of finite reals >= 0 with a positive sum.

    Raises:
        TypeError: a string, a non-sequence, or an item that is not a real number.
        ValueError: empty, an item negative or not finite, or all zero.
    """
    if value is None and optional:
        return None
    what = "a non-empty list of finite floats >= 0 with a positive sum" + (" or None" if optional else "")
    items = _check_sequence(name, value, what, owner)
    for item in items:
        if not _is_real(item):
            raise TypeError(f"{_prefix(owner)}{name} must be {what}, got the item {item!r} in {value!r}")
    weights = [float(item) for item in items]
    if not weights or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"{_prefix(owner)}{name} must be {what}, got {value!r}")
    return weights


def check_float_list(
    name: str, value: Any, *, optional: bool = False, nonempty: bool = True, owner: str | None = None
) -> list[float] | None:
    """A list (or tuple) of finite real numbers.

    Raises:
        TypeError: a string, a non-sequence, or an item that is not a real number.
        ValueError: empty (when ``nonempty``) or an item that is not finite.
    """
    if value is None and optional:
        return None
    what = "a list of finite floats" + (" or None" if optional else "")
    items = _check_sequence(name, value, what, owner)
    if nonempty and not items:
        raise ValueError(f"{_prefix(owner)}{name} must be a non-empty {what[2:]}, got []")
    for item in items:
        if not _is_real(item):
            raise TypeError(f"{_prefix(owner)}{name} must be {what}, got the item {item!r} in {value!r}")
        if not math.isfinite(float(item)):
            raise ValueError(f"{_prefix(owner)}{name} must be {what}, got the item {item!r} in {value!r}")
    return [float(item) for item in items]


def listed(choices: Sequence[str], limit: int = 20) -> str:
    """``choices`` for an error message, the first ``limit`` of them and how many there are."""
    shown = ", ".join(repr(c) for c in choices[:limit])
    return shown + (f", ... ({len(choices)} in all)" if len(choices) > limit else "")


__all__ = [
    "check_bool",
    "check_callable",
    "check_choice",
    "check_float",
    "check_float_list",
    "check_int",
    "check_int_list",
    "check_str",
    "check_str_list",
    "check_weights",
    "listed",
]
