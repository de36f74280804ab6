"""A spec file's bytes as plain data: TOML, JSON (a key twice is an error, not the last one
winning) or Nix (evaluated by nix-instantiate to JSON)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

from qnix.errors import Problem, QnixError, SpecError
from qnix.spec.wording import show

_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def parse_document(path: Path, raw: bytes) -> Any:
    """Decode TOML, JSON or Nix into plain data."""
    file = str(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json", ".nix"):
        raise SpecError(
            [
                Problem(
                    file,
                    "",
                    f"unknown spec format {suffix or '(no suffix)'!r}",
                    hint="use .toml, .json or .nix",
                )
            ]
        )
    if suffix == ".nix":
        return _eval_nix(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError([Problem(file, "", f"not UTF-8 (byte {exc.start})")]) from None
    try:
        if suffix == ".toml":
            try:
                return tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise SpecError([Problem(file, "", f"TOML syntax error: {exc}")]) from None
        try:
            return json.loads(text, object_pairs_hook=_json_object)
        except json.JSONDecodeError as exc:
            raise SpecError(
                [
                    Problem(
                        file,
                        "",
                        f"JSON syntax error at line {exc.lineno} column {exc.colno}: {exc.msg}",
                    )
                ]
            ) from None
        except _DuplicateKey as exc:
            raise SpecError(
                [
                    Problem(
                        file,
                        "",
                        "JSON object has a key twice",
                        show(exc.key),
                        "JSON would silently keep the last one; merge the two",
                    )
                ]
            ) from None
    except RecursionError:
        raise SpecError([Problem(file, "", "nested too deeply")]) from None


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _eval_nix(path: Path) -> Any:
    # Imported here: a TOML or JSON spec need not pay for subprocess and logging.
    from qnix.runner import require_tool, run

    file = str(path)
    try:
        nix_instantiate = require_tool("nix-instantiate", "nix-bin")
    except QnixError as exc:
        raise QnixError(
            f"cannot evaluate {file}: nix-instantiate is not installed",
            hint=f"{exc.hint}; or write the spec as TOML or JSON",
        ) from None
    result = run(
        [nix_instantiate, "--eval", "--strict", "--json", str(path.resolve())],
        check=False,
        timeout=120,
    )
    if result.returncode != 0:
        raise SpecError([Problem(file, "", "Nix evaluation failed: " + _nix_error(result.stderr))])
    try:
        return json.loads(result.stdout, object_pairs_hook=_json_object)
    except (ValueError, RecursionError):
        raise SpecError(
            [Problem(file, "", "Nix evaluation gave no JSON", hint="the file must be an attrset")]
        ) from None


def _nix_error(stderr: str) -> str:
    """The message and position of a Nix error, without the source excerpt Nix draws."""
    lines = [line.strip() for line in _ANSI_RE.sub("", stderr).splitlines() if line.strip()]
    errors = [line.removeprefix("error:").strip() for line in lines if line.startswith("error:")]
    where = next((line for line in lines if line.startswith("at ")), "")
    if not errors:
        return " | ".join(lines[-3:]) or "nix-instantiate failed without a message"
    return errors[-1] + (f" ({where.rstrip(':')})" if where else "")
