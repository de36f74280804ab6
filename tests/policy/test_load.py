"""Reading policy.d folders: order, file names, includes, limits, and errors with file:line."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pytest

from qnix.compile.inputs import load
from qnix.policy import load as policy_load
from qnix.policy.evaluate import Decision, evaluate
from qnix.policy.load import (
    MAX_INCLUDE_DEPTH,
    load_policy_dir,
    load_policy_files,
    load_spec_policy,
)
from qnix.policy.parse import Policy, PolicyError, PolicySyntaxError, parse_line
from tests.conftest import EXAMPLES
from tests.policy.helpers import SYSTEM

ALLOW = "test.Svc * work personal allow\n"


def folder(tmp_path: Path, files: Mapping[str, str | bytes]) -> Path:
    root = tmp_path / "policy.d"
    root.mkdir()
    for name, body in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(body, bytes):
            path.write_bytes(body)
        else:
            path.write_text(body)
    return root


def places(policy: Policy) -> list[str]:
    return [rule.where for rule in policy.rules]


def errors(policy: Policy) -> list[str]:
    return [error.render() for error in policy.errors]


def decide(policy: Policy, source: str = "work", target: str = "personal") -> Decision:
    return evaluate(
        policy,
        SYSTEM,
        untrusted_service="test.Svc",
        untrusted_argument="",
        source=source,
        untrusted_target=target,
    )


# ---- the folder -----------------------------------------------------------------------------


def test_files_are_read_in_c_order(tmp_path: Path) -> None:
    names = ["a_b.policy", "a0.policy", "a.b.policy", "a-b.policy", "20-x.policy", "100-y.policy"]
    policy = load_policy_dir(folder(tmp_path, dict.fromkeys(names, ALLOW)))
    assert policy.errors == ()
    # C order is byte order: '-' < '.' < '0'-'9' < '_' < 'a'-'z', unlike most locales.
    assert places(policy) == [
        "100-y.policy:1",
        "20-x.policy:1",
        "a-b.policy:1",
        "a.b.policy:1",
        "a0.policy:1",
        "a_b.policy:1",
    ]


def test_only_policy_files_count(tmp_path: Path) -> None:
    root = folder(
        tmp_path,
        {
            "10-a.policy": ALLOW,
            "10-a.policy~": "garbage",
            "10-a.policy.swp": "garbage",
            ".10-a.policy.swp": "garbage",
            ".hidden.policy": "garbage",
            "README": "garbage",
            "Notes.txt": "garbage",
            "sub.policy/inner.policy": "garbage",
        },
    )
    policy = load_policy_dir(root)
    assert policy.errors == ()
    assert places(policy) == ["10-a.policy:1"]


def test_a_bad_file_name_denies_everything(tmp_path: Path) -> None:
    policy = load_policy_dir(folder(tmp_path, {"10-a.policy": ALLOW, "Office.policy": ALLOW}))
    message = "file name has characters other than 0-9, a-z, '_', '.' and '-'"
    assert policy.errors == (PolicyError("Office.policy", 0, message),)
    assert decide(policy) == Decision(
        "deny",
        None,
        "Office.policy:0",
        None,
        reason="the policy has 1 error, so every request is denied; first: "
        f"Office.policy:0: {message}",
        notify=True,
    )


def test_a_file_name_with_a_control_character_is_shown_escaped(tmp_path: Path) -> None:
    policy = load_policy_dir(folder(tmp_path, {"a\x1bb.policy": ALLOW}))
    assert [e.file for e in policy.errors] == ["a\\x1bb.policy"]


def test_a_syntax_error_in_the_last_file_denies_a_line_of_the_first(tmp_path: Path) -> None:
    root = folder(
        tmp_path,
        {"10-a.policy": ALLOW, "90-z.policy": "# end\n\ntest.Svc * work @anyvm allow user=Root\n"},
    )
    policy = load_policy_dir(root)
    assert errors(policy) == ["90-z.policy:3: bad user='Root': not a Unix user name"]
    decision = decide(policy)
    assert (decision.action, decision.rule) == ("deny", "90-z.policy:3")
    assert "90-z.policy:3: bad user='Root'" in decision.reason


def test_every_error_is_listed(tmp_path: Path) -> None:
    root = folder(
        tmp_path,
        {
            "10-a.policy": "test.Svc * work\nBAD.Svc\tfoo work personal allow\n" + ALLOW,
            "20-b.policy": "test.Svc * @default personal allow\n"
            "* +arg @anyvm @anyvm deny\n"
            "test.Svc * work @default allow\n"
            "test.Svc * @dispvm work allow\n"
            "test.Svc * work personal ask notify=sometimes\n",
        },
    )
    assert errors(load_policy_dir(root)) == [
        "10-a.policy:1: expected: service argument source target action [key=value ...]",
        "10-a.policy:2: bad argument 'foo': use * or +ARGUMENT",
        "20-b.policy:1: @default is valid only as a target",
        "20-b.policy:2: a * service takes only the * argument",
        "20-b.policy:3: allow for target @default must carry target=",
        "20-b.policy:4: @dispvm is valid only as a target",
        "20-b.policy:5: bad notify='sometimes': use notify=yes or notify=no",
    ]


def test_crlf_line_ends_and_form_feeds(tmp_path: Path) -> None:
    root = folder(
        tmp_path, {"10-a.policy": "# a\r\n\x0c\r\ntest.Svc\x0c*  work personal allow\r\n"}
    )
    assert places(load_policy_dir(root)) == ["10-a.policy:3"]


def test_a_missing_folder_denies(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert load_policy_dir(missing).errors == (PolicyError(str(missing), 0, "is not a folder"),)


def test_non_utf8_and_oversized_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy_load, "MAX_FILE_BYTES", 64)
    root = folder(tmp_path, {"10-a.policy": b"\xff\xfe", "20-b.policy": "#" * 65})
    assert errors(load_policy_dir(root)) == [
        "10-a.policy:0: '10-a.policy' is not UTF-8 text (byte 0)",
        "20-b.policy:0: '20-b.policy' is larger than 64 bytes",
    ]


# ---- !include -------------------------------------------------------------------------------


def test_include_reads_the_file_in_place(tmp_path: Path) -> None:
    root = folder(
        tmp_path,
        {
            "10-a.policy": "test.Svc * work vault deny\n!include include/office\n" + ALLOW,
            "include/office": "# shared\ntest.Svc * @anyvm personal ask\n!include include/more\n",
            "include/more": "test.Svc * work untrusted allow\n",
        },
    )
    policy = load_policy_dir(root)
    assert policy.errors == ()
    assert places(policy) == [
        "10-a.policy:1",
        "include/office:2",
        "include/more:1",
        "10-a.policy:3",
    ]
    assert decide(policy).rule == "include/office:2"


def test_include_paths_are_relative_to_the_folder_not_the_file(tmp_path: Path) -> None:
    root = folder(
        tmp_path,
        {
            "10-a.policy": "!include include/a\n",
            "include/a": "!include include/b\n",
            "include/b": ALLOW,
        },
    )
    assert places(load_policy_dir(root)) == ["include/b:1"]


def test_include_of_a_missing_file(tmp_path: Path) -> None:
    root = folder(tmp_path, {"10-a.policy": ALLOW + "!include include/nope\n"})
    policy = load_policy_dir(root)
    assert errors(policy) == ["10-a.policy:2: 'include/nope' is not a file"]
    assert decide(policy).action == "deny"


def test_include_of_a_folder_is_not_a_file(tmp_path: Path) -> None:
    root = folder(tmp_path, {"10-a.policy": "!include include\n", "include/x": ALLOW})
    assert errors(load_policy_dir(root)) == ["10-a.policy:1: 'include' is not a file"]


@pytest.mark.parametrize("path", ["/etc/passwd", "../x", "include/../../x", "include/../x"])
def test_include_paths_stay_inside_the_folder(tmp_path: Path, path: str) -> None:
    root = folder(tmp_path, {"10-a.policy": f"!include {path}\n"})
    (tmp_path / "x").write_text(ALLOW)
    assert errors(load_policy_dir(root)) == [
        f"10-a.policy:1: {path!r}: include paths are relative to the policy folder and stay "
        "inside it, such as include/office"
    ]


def test_a_symbolic_link_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    root = folder(tmp_path, {"10-a.policy": "!include include/outside\n", "include/in": ALLOW})
    (tmp_path / "secret").write_text(ALLOW)
    (root / "include" / "outside").symlink_to(tmp_path / "secret")
    (root / "20-b.policy").symlink_to(tmp_path / "secret")
    (root / "30-c.policy").symlink_to(root / "include" / "in")
    assert errors(load_policy_dir(root)) == [
        "20-b.policy:0: '20-b.policy' leads out of the policy folder",
        "10-a.policy:1: 'include/outside' leads out of the policy folder",
    ]
    assert places(load_policy_dir(root)) == ["30-c.policy:1"]


def test_include_cycle(tmp_path: Path) -> None:
    root = folder(
        tmp_path,
        {
            "10-a.policy": ALLOW + "!include include/b\n",
            "include/b": "!include include/c\n",
            "include/c": "test.Svc * work vault allow\n!include include/b\n",
        },
    )
    policy = load_policy_dir(root)
    assert errors(policy) == [
        "include/c:2: include cycle: 10-a.policy -> include/b -> include/c -> include/b"
    ]
    assert places(policy) == ["10-a.policy:1", "include/c:1"]


def test_a_file_including_itself(tmp_path: Path) -> None:
    root = folder(tmp_path, {"10-a.policy": "!include 10-a.policy\n"})
    assert errors(load_policy_dir(root)) == [
        "10-a.policy:1: include cycle: 10-a.policy -> 10-a.policy"
    ]


def test_a_cycle_through_a_symbolic_link(tmp_path: Path) -> None:
    root = folder(tmp_path, {"10-a.policy": "!include include/alias\n"})
    (root / "include").mkdir()
    (root / "include" / "alias").symlink_to(root / "10-a.policy")
    assert errors(load_policy_dir(root)) == [
        "10-a.policy:1: include cycle: 10-a.policy -> include/alias"
    ]


def chain(depth: int) -> dict[str, str]:
    """10-a.policy includes include/1, which includes include/2, ... down to include/DEPTH."""
    files = {"10-a.policy": "!include include/1\n"}
    for level in range(1, depth):
        files[f"include/{level}"] = f"!include include/{level + 1}\n"
    files[f"include/{depth}"] = ALLOW
    return files


def test_includes_nested_to_the_limit(tmp_path: Path) -> None:
    policy = load_policy_dir(folder(tmp_path, chain(MAX_INCLUDE_DEPTH)))
    assert policy.errors == ()
    assert places(policy) == [f"include/{MAX_INCLUDE_DEPTH}:1"]


def test_includes_nested_too_deep(tmp_path: Path) -> None:
    policy = load_policy_dir(folder(tmp_path, chain(MAX_INCLUDE_DEPTH + 1)))
    assert errors(policy) == [
        f"include/{MAX_INCLUDE_DEPTH}:1: includes are nested deeper than {MAX_INCLUDE_DEPTH}"
    ]
    assert policy.rules == ()


def test_includes_that_multiply_are_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy_load, "MAX_FILES_READ", 50)
    files = {"10-a.policy": "!include i/0\n!include i/0\n"}
    for level in range(12):  # 2**12 reads without the limit
        files[f"i/{level}"] = f"!include i/{level + 1}\n!include i/{level + 1}\n"
    files["i/12"] = ALLOW
    policy = load_policy_files(files)
    assert policy.errors
    assert {e.message for e in policy.errors} == {"more than 50 policy files read"}


# ---- !include-dir ---------------------------------------------------------------------------


def test_include_dir_reads_policy_files_in_c_order(tmp_path: Path) -> None:
    root = folder(
        tmp_path,
        {
            "10-a.policy": "test.Svc * work vault deny\n!include-dir extra\n" + ALLOW,
            "extra/b.policy": "test.Svc * work untrusted allow\n",
            "extra/a.policy": "test.Svc * work dvm allow\n",
            "extra/notes.txt": "garbage",
            "extra/.a.policy.swp": "garbage",
        },
    )
    policy = load_policy_dir(root)
    assert policy.errors == ()
    assert places(policy) == [
        "10-a.policy:1",
        "extra/a.policy:1",
        "extra/b.policy:1",
        "10-a.policy:3",
    ]


def test_include_dir_with_a_bad_file_name(tmp_path: Path) -> None:
    root = folder(
        tmp_path, {"10-a.policy": "# x\n!include-dir extra\n", "extra/My Rules.policy": ALLOW}
    )
    assert errors(load_policy_dir(root)) == [
        "10-a.policy:2: 'extra/My Rules.policy': file name has characters other than 0-9, a-z, "
        "'_', '.' and '-'"
    ]


def test_include_dir_errors(tmp_path: Path) -> None:
    root = folder(
        tmp_path,
        {
            "10-a.policy": "!include-dir nope\n!include-dir 20-b.policy\n!include-dir /etc\n"
            "!include-dir\n!include-dir a b\n",
            "20-b.policy": ALLOW,
        },
    )
    assert errors(load_policy_dir(root)) == [
        "10-a.policy:1: 'nope' is not a folder",
        "10-a.policy:2: '20-b.policy' is not a folder",
        "10-a.policy:3: '/etc': include paths are relative to the policy folder and stay "
        "inside it, such as include/office",
        "10-a.policy:4: !include-dir takes one path",
        "10-a.policy:5: !include-dir takes one path",
    ]


def test_include_dir_of_the_folder_itself_is_a_cycle(tmp_path: Path) -> None:
    root = folder(tmp_path, {"10-a.policy": ALLOW, "20-b.policy": "!include-dir .\n"})
    policy = load_policy_dir(root)
    assert errors(policy) == ["20-b.policy:1: include cycle: 20-b.policy -> 20-b.policy"]
    assert places(policy) == ["10-a.policy:1", "10-a.policy:1"]


def test_an_empty_include_dir_is_fine(tmp_path: Path) -> None:
    root = folder(tmp_path, {"10-a.policy": "!include-dir empty\n" + ALLOW})
    (root / "empty").mkdir()
    policy = load_policy_dir(root)
    assert (policy.errors, places(policy)) == ((), ["10-a.policy:2"])


# ---- !include-service -----------------------------------------------------------------------


def test_include_service_reads_the_service_format(tmp_path: Path) -> None:
    root = folder(
        tmp_path,
        {
            "10-a.policy": "!include-service test.Svc * include/svc\n"
            "!include-service other.Svc +x include/svc\n",
            "include/svc": "# Qubes 4.0 style\n$anyvm $anyvm deny\n"
            "work personal allow,target=vault,user=alice\n$include:include/more\n",
            "include/more": "!include include/last\n",
            "include/last": "@tag:trusted $dispvm ask\n",
        },
    )
    policy = load_policy_dir(root)
    assert policy.errors == ()
    shown = [
        (r.service, r.argument, str(r.source), str(r.target), r.action, r.params, r.where)
        for r in policy.rules
    ]
    deny, redirect, ask = (
        ("@anyvm", "@anyvm", "deny", (), "include/svc:2"),
        ("work", "personal", "allow", (("target", "vault"), ("user", "alice")), "include/svc:3"),
        ("@tag:trusted", "@dispvm", "ask", (), "include/last:1"),
    )
    assert shown == [
        ("test.Svc", "*", *deny),
        ("test.Svc", "*", *redirect),
        ("test.Svc", "*", *ask),
        ("other.Svc", "+x", *deny),
        ("other.Svc", "+x", *redirect),
        ("other.Svc", "+x", *ask),
    ]
    # the first matching line is the deny line from include/svc
    assert decide(policy).rule == "include/svc:2"


def test_include_service_errors(tmp_path: Path) -> None:
    root = folder(
        tmp_path,
        {
            "10-a.policy": "!include-service * +arg include/svc\n"
            "!include-service bad/svc * include/svc\n"
            "!include-service test.Svc include/svc\n"
            "!include-service test.Svc * include/nope\n"
            "!include-service test.Svc * include/svc\n",
            "include/svc": "work personal\n!include-dir x\nwork personal permit\n",
        },
    )
    assert errors(load_policy_dir(root)) == [
        "10-a.policy:1: a * service takes only the * argument",
        "10-a.policy:2: bad service name 'bad/svc'",
        "10-a.policy:3: !include-service takes SERVICE ARGUMENT FILE",
        "10-a.policy:4: 'include/nope' is not a file",
        "include/svc:1: expected: source target action [key=value ...]",
        "include/svc:2: a service file allows only !include FILE",
        "include/svc:3: unknown action 'permit'; use allow, deny or ask",
    ]


# ---- other directives -----------------------------------------------------------------------


def test_unknown_and_unsupported_directives(tmp_path: Path) -> None:
    root = folder(
        tmp_path,
        {"10-a.policy": "!compat-4.0\n!inclde include/x\n!include\n!include a b\n" + ALLOW},
    )
    policy = load_policy_dir(root)
    assert errors(policy) == [
        "10-a.policy:1: !compat-4.0 reads Qubes 4.0 policy files; qnix has none",
        "10-a.policy:2: unknown directive '!inclde'; use !include, !include-dir or "
        "!include-service",
        "10-a.policy:3: !include takes one path",
        "10-a.policy:4: !include takes one path",
    ]
    assert places(policy) == ["10-a.policy:5"]


# ---- the spec's inline rules ----------------------------------------------------------------


def test_inline_rules_come_first_as_00_spec(tmp_path: Path) -> None:
    root = folder(tmp_path, {"00-a.policy": ALLOW, "30-b.policy": ALLOW})
    policy = load_policy_dir(root, inline_rules=["# mine", "test.Svc * work personal deny"])
    assert places(policy) == ["00-spec.policy:2", "00-a.policy:1", "30-b.policy:1"]
    assert decide(policy).action == "deny"


def test_a_folder_file_may_not_take_the_inline_name(tmp_path: Path) -> None:
    root = folder(tmp_path, {"00-spec.policy": ALLOW})
    assert errors(load_policy_dir(root, inline_rules=[])) == [
        "00-spec.policy:0: this name is taken by the spec's inline rules; rename it"
    ]
    assert load_policy_dir(root).errors == ()


def test_inline_rules_cannot_include(tmp_path: Path) -> None:
    policy = load_policy_files({}, inline_rules=[ALLOW, "!include include/x"])
    assert errors(policy) == ["00-spec.policy:2: include directives are not allowed here"]


def test_parse_line_still_refuses_directives() -> None:
    with pytest.raises(PolicySyntaxError, match="include directives are not allowed here"):
        parse_line("!include x", file="f", line=1)


def test_the_office_example() -> None:
    loaded = load(EXAMPLES / "smb-office.toml")
    policy = load_spec_policy(loaded)
    assert policy.errors == ()
    assert places(policy)[:4] == [
        "00-spec.policy:1",
        "00-spec.policy:2",
        "00-spec.policy:3",
        "30-office.policy:3",
    ]
    assert len(policy.rules) == 3 + 10


def test_policy_dir_overrides_the_spec_folder(tmp_path: Path) -> None:
    loaded = load(EXAMPLES / "smb-office.toml")
    policy = load_spec_policy(loaded, policy_dir=folder(tmp_path, {"10-a.policy": ALLOW}))
    assert places(policy) == [
        "00-spec.policy:1",
        "00-spec.policy:2",
        "00-spec.policy:3",
        "10-a.policy:1",
    ]


def test_memory_and_folder_agree(tmp_path: Path) -> None:
    files = {
        "10-a.policy": "!include-dir d\n!include-service test.Svc * s\n" + ALLOW,
        "d/x.policy": "test.Svc * work vault allow\n",
        "d/sub/y.policy": "garbage never read\n",
        "s": "work untrusted deny\n",
    }
    from_disk = load_policy_dir(folder(tmp_path, dict(files)))
    assert from_disk == load_policy_files(files)
    assert places(from_disk) == ["d/x.policy:1", "s:1", "10-a.policy:3"]


def test_a_file_name_that_is_not_utf8(tmp_path: Path) -> None:
    root = folder(tmp_path, {"10-a.policy": ALLOW})
    (root / os.fsdecode(b"20-\xff.policy")).write_text(ALLOW)
    policy = load_policy_dir(root)
    assert [(e.file, e.line) for e in policy.errors] == [("20-\\udcff.policy", 0)]
    assert places(policy) == ["10-a.policy:1"]
