"""What every typed config section is made of: `ConfigError`, `setting` (a dataclass field with
its one-line doc) and the value checks the sections' `__post_init__` use.

Its own module so that `padd.config` (the run config) and `padd.training.config` (the training
loop's settings, one section of it) share one error type and one way to document a key without
importing each other.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

__all__ = ["ConfigError", "check", "doc_of", "non_negative", "positive", "setting"]


class ConfigError(ValueError):
    """An invalid configuration; `key` is the dotted name of the offending key (relative to the
    section that raised it until `padd.config.from_dict` prefixes the section's path)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message

    def under(self, prefix: str) -> ConfigError:
        """The same error seen from the section `prefix` that holds the key."""
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.message)


def setting(
    default: Any = dataclasses.MISSING, doc: str = "", *, factory: Callable[[], Any] | None = None
) -> Any:
    """A config key: a dataclass field with its default and the one-line `doc` that
    `padd config` and `docs/config.md` print next to it."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


def doc_of(f: dataclasses.Field) -> str:
    """A field's one-line doc ("" when it has none)."""
    return f.metadata.get("doc", "")


def check(cond: bool, key: str, message: str) -> None:
    """Raise `ConfigError(key, message)` unless `cond`."""
    if not cond:
        raise ConfigError(key, message)


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def positive(obj: Any, *names: str) -> None:
    """Each named attribute of `obj` is a finite number > 0."""
    for n in names:
        v = getattr(obj, n)
        check(_number(v) and v > 0, n, f"must be > 0, got {v!r}")


def non_negative(obj: Any, *names: str) -> None:
    """Each named attribute of `obj` is a finite number >= 0."""
    for n in names:
        v = getattr(obj, n)
        check(_number(v) and v >= 0, n, f"must be >= 0, got {v!r}")
