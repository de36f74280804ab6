"""Building blocks for the modules `qnix run` and `qnix dispose` import on their fast path,
which may not import typing, dataclasses or re (each costs milliseconds of every command)."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Self

LOWER = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
LETTERS = LOWER + LOWER.upper()


def is_word(text: str, first: str, rest: str, max_length: int) -> bool:
    """`text` is one character of `first` then at most max_length - 1 of `rest` (a regular
    expression `[first][rest]{0,max_length-1}` matched in full)."""
    return (
        0 < len(text) <= max_length
        and text[0] in first
        and all(character in rest for character in text[1:])
    )


class Record:
    """An immutable record, equal by its fields and positional like a tuple: a frozen
    dataclass or a NamedTuple without their imports. A subclass names its fields in order in
    `_FIELDS` (and in `__slots__`, in any order) and calls `super().__init__(*values)`."""

    __slots__: tuple[str, ...] = ()
    _FIELDS: tuple[str, ...] = ()

    def __init__(self, *values: object) -> None:
        for field, value in zip(self._FIELDS, values, strict=True):
            object.__setattr__(self, field, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: cannot set {name}")

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, field) for field in self._FIELDS)

    def _asdict(self) -> dict[str, object]:
        return dict(zip(self._FIELDS, self._values(), strict=True))

    def _replace(self, **changes: object) -> Self:
        return type(self)(*(changes.get(f, v) for f, v in self._asdict().items()))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Record)
            and type(other) is type(self)
            and self._values() == other._values()
        )

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = ", ".join(f"{f}={v!r}" for f, v in zip(self._FIELDS, self._values(), strict=True))
        return f"{type(self).__name__}({shown})"
