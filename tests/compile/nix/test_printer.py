"""The printer: whatever Python value goes in, Nix evaluates it back to exactly that value.

Values are rendered in batches into one file and evaluated by one `nix-instantiate --eval
--strict --json`; the JSON must equal the input, types included. Equality of every attribute set's
keys is what proves that no string - hostile or not - changed the structure around it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qnix.compile.nix.printer import (
    Function,
    Raw,
    attr_name,
    attr_path,
    identifier,
    path_literal,
    render,
    string,
)
from tests.compile.nix.support import nix_eval, same

INT_MIN, INT_MAX = -(2**63), 2**63 - 1
# Nix strings are byte strings of UTF-8 text and cannot hold NUL; lone surrogates are not text.
nix_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))
# JSON shows a set with an `outPath` as that string, and calls a set's `__toString`: Nix gives
# these two names a meaning of their own, so a round trip through JSON cannot show them.
JSON_SPECIAL = frozenset({"outPath", "__toString"})
nix_keys = nix_text.filter(lambda key: key not in JSON_SPECIAL)
scalars = st.none() | st.booleans() | st.integers(INT_MIN, INT_MAX) | nix_text
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(nix_keys, inner, max_size=4),
    max_leaves=24,
)

HOSTILE_STRINGS = [
    '${builtins.abort "x"}',
    '"; } evil = 1; {',
    "\\${",
    "$${x}",
    "''",
    "''${x}",
    "'' + builtins.abort \"x\" + ''",
    "\\",
    "\\\\",
    '\\"',
    "\\n",
    "a\nb",
    "a\rb",
    "a\r\nb",
    "\t",
    "$",
    "${",
    "}",
    "#",
    "/* comment */",
    "# comment\n",
    "日本語 ✓ 🐧 e\u0301",
    "\u2028\u2029\ufeff\u200b",
    "\x01\x1f\x7f",
    "",
    " ",
]
HOSTILE_KEYS = [
    *HOSTILE_STRINGS,
    "if",
    "then",
    "else",
    "or",
    "inherit",
    "rec",
    "let",
    "in",
    "with",
    "assert",
    "__curPos",
    "a.b",
    "a b",
    "${x}",
    "1abc",
    "-x",
    "x'",
    "true",
    "null",
]


def round_trip(batch: list[Any]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "values.nix"
        path.write_text(render(batch) + "\n", encoding="utf-8")
        same(nix_eval(path), batch)


@settings(max_examples=25, deadline=None)
@given(st.lists(values, min_size=1, max_size=40))
def test_any_value_evaluates_back_to_itself(batch: list[Any]) -> None:
    round_trip(batch)


def test_hostile_strings_and_keys_keep_their_place() -> None:
    batch: list[Any] = [
        *HOSTILE_STRINGS,
        {key: key for key in HOSTILE_KEYS},
        {key: {"inner": [key, {key: None}]} for key in HOSTILE_KEYS},
        [INT_MIN, INT_MIN + 1, -1, 0, 1, INT_MAX],
        [True, False, None, [], {}],
    ]
    round_trip(batch)


def test_hostile_string_is_one_string() -> None:
    """The rendering of a hostile string is one string literal: the abort never runs."""
    text = 'a"; x = ${builtins.abort "boom"}; "'
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "one.nix"
        path.write_text(render({"k": text}), encoding="utf-8")
        assert nix_eval(path) == {"k": text}
    assert string("${") == '"\\${"'
    assert string('a"b') == '"a\\"b"'


@pytest.mark.parametrize(
    "value", ["\x00", "a\x00b", ["ok", "\x00"], {"\x00": 1}, {"k": "\x00"}], ids=repr
)
def test_nul_is_refused(value: Any) -> None:
    with pytest.raises(ValueError, match="NUL"):
        render(value)


@pytest.mark.parametrize("number", [INT_MIN - 1, INT_MAX + 1, 2**100])
def test_integers_outside_64_bits_are_refused(number: int) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        render(number)


def test_attribute_names_are_bare_only_when_safe() -> None:
    assert attr_name("hostName") == "hostName"
    assert attr_name("systemd-boot") == "systemd-boot"
    assert attr_name("if") == '"if"'
    assert attr_name("kernel.sysrq") == '"kernel.sysrq"'
    assert attr_name("${x}") == '"\\${x}"'


def test_code_qnix_writes_is_built_from_identifiers_only() -> None:
    assert attr_path("pkgs", "python3Packages", "requests").code == "pkgs.python3Packages.requests"
    assert attr_path("pkgs", "or").code == 'pkgs."or"'
    with pytest.raises(ValueError, match="not a Nix identifier"):
        attr_path("pkgs; abort", "x")
    with pytest.raises(ValueError, match="not a Nix identifier"):
        identifier("a b")
    with pytest.raises(ValueError, match="not a Nix identifier"):
        render(Function(("if",), {}))


def test_functions_and_code_in_lists_are_parenthesised() -> None:
    assert render([Raw("lib.mkForce true"), Raw("pkgs.firefox")]) == (
        "[\n  (lib.mkForce true)\n  pkgs.firefox\n]"
    )
    assert render({"f": Function(("pkgs",), {"a": 1})}) == (
        "{\n  f = ({ pkgs, ... }:\n  {\n    a = 1;\n  });\n}"
    )


def test_a_path_literal_is_a_plain_relative_path_and_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "hosts/desk-01").mkdir(parents=True)
    (tmp_path / "hosts/desk-01/flake.nix").write_text("41\n")
    (tmp_path / "a").mkdir()
    (tmp_path / "a/probe.nix").write_text(
        f"(import {path_literal('hosts/desk-01/flake.nix', up=1).code}) + 1\n"
    )
    assert nix_eval(tmp_path / "a/probe.nix") == 42
    assert path_literal("hosts/desk-01/flake.nix") == Raw("./hosts/desk-01/flake.nix")
    for bad in ("", "a//b", "../etc", "a/./b", "a b", "a/${x}", "/etc/passwd", "a/"):
        with pytest.raises(ValueError, match="not a plain relative path"):
            path_literal(bad)
