"""How a problem names what the author wrote: a value as JSON (safe for a terminal, cut
short), a key path such as `compartments.work.firewall[2].ports`, a did-you-mean."""

from __future__ import annotations

import difflib
import json
import re
from typing import Any

MAX_SHOWN = 80


def show(value: Any) -> str:
    """A value as the author would write it in JSON, escaped and cut to MAX_SHOWN characters."""
    try:
        text = json.dumps(value, default=str, ensure_ascii=False)
    except (ValueError, RecursionError):
        text = "(nested too deeply)"
    # Never put a terminal control character or a bidi override from a spec onto the screen.
    text = "".join(
        ch
        if ch.isprintable()
        else (f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
        for ch in text
    )
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def format_path(loc: tuple[str | int, ...]) -> str:
    """`compartments.work.firewall[2].ports`; keys other than plain words are quoted."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]{1,64}", part):
            out += f".{part}" if out else part
        else:
            out += f"[{show(part)}]"
    return out


def did_you_mean(word: str, choices: list[str], cutoff: float = 0.6) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=cutoff)
    return f"did you mean {close[0]!r}?" if close else ""
