"""The one vocabulary that validates every config section, with one wording.

A section's `check(c)` states its rules through a `Checks`; every problem becomes one line

    <section>.<field>=<value!r> is invalid: expected <what is allowed>

(a rule that spans fields says so in its own sentence, naming the fields and what to set). Nothing
stops at the first problem: `validate()` raises one `ConfigError` listing them all, so a cell with
three mistakes is fixed in one pass.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional


class ConfigError(ValueError):
    """Every problem found in a config, one per line (`problems` holds them as a list)."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def raise_problems(problems: list) -> None:
    """Raise ConfigError listing `problems`, if there are any."""
    if problems:
        raise ConfigError(problems)


def invalid(path: str, value: Any, expected: str) -> ConfigError:
    """The error of one bad setting found outside a section's check (e.g. when a model loads)."""
    c = Checks()
    c.fail(path, value, expected)
    return ConfigError(c.problems)


def is_int(value: Any) -> bool:
    """An int that is not a bool (True is not the integer 1 here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Checks:
    """Collects the problems of one section (`section` prefixes every field name, "" for top level)."""

    def __init__(self, section: str = "") -> None:
        self.section = section
        self.problems: list = []

    def fail(self, name: str, value: Any, expected: str) -> bool:
        """Record that `name` holds `value` where `expected` is allowed; returns False."""
        path = f"{self.section}.{name}" if self.section else name
        self.problems.append(f"{path}={value!r} is invalid: expected {expected}")
        return False

    def rule(self, message: str) -> bool:
        """Record a broken rule that spans fields (the message names them and what to set); False."""
        self.problems.append(message)
        return False

    def choice(self, name: str, value: Any, allowed: Iterable) -> bool:
        allowed = tuple(allowed)
        return value in allowed or self.fail(name, value, "one of " + ", ".join(repr(a) for a in allowed))

    def integer(
        self, name: str, value: Any, minimum: Optional[int] = None, optional: bool = False, note: str = ""
    ) -> bool:
        """An integer (never a bool) >= `minimum`; None too when `optional`."""
        if optional and value is None:
            return True
        if is_int(value) and (minimum is None or value >= minimum):
            return True
        what = "an integer" + ("" if minimum is None else f" >= {minimum}")
        return self.fail(name, value, ("None or " if optional else "") + what + note)

    def number(
        self,
        name: str,
        value: Any,
        above: Optional[float] = None,
        minimum: Optional[float] = None,
        below: Optional[float] = None,
        maximum: Optional[float] = None,
    ) -> bool:
        """An int or float (never a bool) within the bounds given (`above`/`below` exclusive)."""
        ok = (
            is_number(value)
            and (above is None or value > above)
            and (minimum is None or value >= minimum)
            and (below is None or value < below)
            and (maximum is None or value <= maximum)
        )
        if ok:
            return True
        low = "" if above is None and minimum is None else (f"({above}" if above is not None else f"[{minimum}")
        high = "" if below is None and maximum is None else (f"{below})" if below is not None else f"{maximum}]")
        if low and high:
            return self.fail(name, value, f"a number in {low}, {high}")
        if low:
            return self.fail(name, value, f"a number {'>' if above is not None else '>='} {low[1:]}")
        if high:
            return self.fail(name, value, f"a number {'<' if below is not None else '<='} {high[:-1]}")
        return self.fail(name, value, "a number")

    def boolean(self, name: str, value: Any) -> bool:
        return isinstance(value, bool) or self.fail(name, value, "true or false")

    def string(self, name: str, value: Any, optional: bool = False, empty_ok: bool = False, note: str = "") -> bool:
        """A string (non-empty unless `empty_ok`); None too when `optional`."""
        if optional and value is None:
            return True
        if isinstance(value, str) and (empty_ok or value.strip()):
            return True
        what = "a string" if empty_ok else "a non-empty string"
        return self.fail(name, value, ("None or " if optional else "") + what + note)

    def non_empty_list(self, name: str, value: Any, item_ok, items: str, optional: bool = False) -> bool:
        """A non-empty list (or tuple) whose every item passes `item_ok`; None too when `optional`."""
        if optional and value is None:
            return True
        if isinstance(value, (list, tuple)) and value and all(item_ok(x) for x in value):
            return True
        return self.fail(name, value, ("None or " if optional else "") + f"a non-empty list of {items}")


class Section:
    """A config dataclass whose `check(c, **context)` states its rules (see the module docstring)."""

    section = ""  # the prefix of its fields in messages, e.g. "adapter"

    def check(self, c: Checks, **context: Any) -> None:
        raise NotImplementedError

    def problems(self, **context: Any) -> list:
        """Every problem of this section, one message each (empty when it is valid)."""
        c = Checks(self.section)
        self.check(c, **context)
        return c.problems

    def validate(self, **context: Any):
        """Raise ConfigError listing every problem of this section; return self when there is none."""
        raise_problems(self.problems(**context))
        return self
