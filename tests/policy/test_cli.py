"""`qnix policy check|lint`: exact JSON, exit codes 0/1/3, messages with file:line."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner, Result

from qnix.cli.policy import policy
from tests.conftest import EXAMPLES

OFFICE = str(EXAMPLES / "smb-office.toml")


def run(*args: str) -> Result:
    return CliRunner().invoke(policy, list(args))


def as_json(result: Result) -> object:
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.output
    return json.loads(lines[0])


def policy_dir(tmp_path: Path, text: str, name: str = "30-t.policy") -> str:
    root = tmp_path / "policy.d"
    root.mkdir(exist_ok=True)
    (root / name).write_text(text)
    return str(root)


def test_allow_exits_0() -> None:
    result = run("check", "qnix.OpenInDisposable", "work", "@dispvm", "--spec", OFFICE, "--json")
    assert result.exit_code == 0
    assert result.stdout == (
        '{"action": "allow", "target": "@dispvm:default-dvm", '
        '"rule": "30-office.policy:8", "user": null}\n'
    )


def test_deny_exits_1() -> None:
    result = run("check", "qnix.Filecopy", "vault", "personal", "--spec", OFFICE, "--json")
    assert result.exit_code == 1
    assert as_json(result) == {
        "action": "deny",
        "target": None,
        "rule": "00-spec.policy:1",
        "user": None,
    }


def test_ask_exits_3() -> None:
    result = run("check", "qnix.Filecopy", "work", "personal", "--spec", OFFICE, "--json")
    assert result.exit_code == 3
    assert as_json(result) == {
        "action": "ask",
        "target": None,
        "rule": "30-office.policy:3",
        "user": None,
    }


def test_ask_json_names_the_preselected_target_and_user(tmp_path: Path) -> None:
    folder = policy_dir(tmp_path, "qnix.Gpg * @tag:work vault ask default_target=vault user=gpg\n")
    result = run(
        "check", "qnix.Gpg", "work", "vault", "--spec", OFFICE, "--policy-dir", folder, "--json"
    )
    assert result.exit_code == 3
    assert as_json(result) == {
        "action": "ask",
        "target": "vault",
        "rule": "30-t.policy:1",
        "user": "gpg",
    }


def test_human_output_explains(tmp_path: Path) -> None:
    folder = policy_dir(
        tmp_path, "# gpg\nqnix.Gpg +sign @tag:work vault ask default_target=vault\n"
    )
    result = run(
        "check", "qnix.Gpg+sign", "work", "vault", "--spec", OFFICE, "--policy-dir", folder
    )
    assert result.exit_code == 3
    assert result.stdout == (
        "ask: ask by 30-t.policy:2: choose one of vault\n"
        "  rule:    30-t.policy:2\n"
        "  choices: vault\n"
        "  default: vault\n"
        "  user:    (the target default)\n"
    )
    result = run(
        "check", "qnix.Gpg+verify", "work", "vault", "--spec", OFFICE, "--policy-dir", folder
    )
    assert (result.exit_code, result.stdout) == (1, "deny: no policy line matches\n")


def test_human_output_of_an_allow() -> None:
    result = run("check", "qnix.OpenInDisposable", "work", "@dispvm:offline-dvm", "--spec", OFFICE)
    assert result.exit_code == 0
    assert result.stdout == (
        "allow: allowed by 00-spec.policy:3\n"
        "  rule:    00-spec.policy:3\n"
        "  target:  @dispvm:offline-dvm\n"
        "  user:    (the target default)\n"
    )


def test_policy_dir_without_a_spec_knows_only_the_host(tmp_path: Path) -> None:
    folder = policy_dir(
        tmp_path,
        "test.Svc * work @default allow target=personal\ntest.Svc * dom0 @anyvm deny\n"
        "test.Svc * work @adminvm allow user=root\n",
    )
    result = run("check", "test.Svc", "work", "dom0", "--policy-dir", folder, "--json")
    assert (result.exit_code, as_json(result)) == (
        0,
        {"action": "allow", "target": "@adminvm", "rule": "30-t.policy:3", "user": "root"},
    )
    # personal is not known, so the request is for @default, and the redirect goes nowhere
    result = run("check", "test.Svc", "work", "personal", "--policy-dir", folder)
    assert result.exit_code == 1
    assert result.stdout == (
        "deny: 30-t.policy:1: target 'personal' does not exist\n  rule:    30-t.policy:1\n"
    )
    result = run("check", "test.Svc", "@adminvm", "work", "--policy-dir", folder, "--json")
    assert (result.exit_code, as_json(result)) == (
        1,
        {"action": "deny", "target": None, "rule": "30-t.policy:2", "user": None},
    )


def test_a_broken_policy_denies_and_names_the_place(tmp_path: Path) -> None:
    folder = policy_dir(tmp_path, "test.Svc * work @adminvm allow\n!include include/nope\n")
    result = run("check", "test.Svc", "work", "@adminvm", "--policy-dir", folder, "--json")
    assert (result.exit_code, as_json(result)) == (
        1,
        {"action": "deny", "target": None, "rule": "30-t.policy:2", "user": None},
    )
    result = run("check", "test.Svc", "work", "@adminvm", "--policy-dir", folder)
    assert result.stdout.splitlines()[0] == (
        "deny: the policy has 1 error, so every request is denied; "
        "first: 30-t.policy:2: 'include/nope' is not a file"
    )


def test_hostile_arguments_are_denied(tmp_path: Path) -> None:
    folder = policy_dir(tmp_path, "* * * * allow target=@adminvm\n")
    for call, target in (
        ("test.Svc", "../../etc"),
        ("test.Svc+a/b", "@adminvm"),
        ("../x", "@adminvm"),
        ("test.Svc", "x" * 5000),
    ):
        result = run("check", call, "work", target, "--policy-dir", folder, "--json")
        assert result.exit_code == 1, (call, target)
        assert as_json(result) == {"action": "deny", "target": None, "rule": None, "user": None}


def test_needs_a_policy() -> None:
    result = run("check", "test.Svc", "work", "personal")
    assert result.exit_code == 2
    assert "give --policy-dir, --spec, or both" in result.stderr


def test_unknown_source_with_a_spec() -> None:
    result = run("check", "qnix.Filecopy", "wrok", "personal", "--spec", OFFICE)
    assert result.exit_code == 2
    assert "'wrok' is no compartment of" in result.stderr
    assert "did you mean 'work'?" in result.stderr


def test_invalid_spec(tmp_path: Path) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_text('[host]\nhostname = "BAD HOST"\n')
    result = run("check", "test.Svc", "work", "personal", "--spec", str(spec), "--json")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert f"{spec}: host.hostname: is not a valid host name" in result.stderr


def test_lint_lists_every_error(tmp_path: Path) -> None:
    folder = policy_dir(
        tmp_path,
        "test.Svc * work\n# fine\ntest.Svc * work personal allow\n"
        "!include include/nope\ntest.Svc * @default work ask\n",
    )
    (Path(folder) / "Bad Name.policy").write_text("")
    result = run("lint", folder)
    assert result.exit_code == 1
    assert result.stdout == (
        "Bad Name.policy:0: file name has characters other than 0-9, a-z, '_', '.' and '-'\n"
        "30-t.policy:1: expected: service argument source target action [key=value ...]\n"
        "30-t.policy:4: 'include/nope' is not a file\n"
        "30-t.policy:5: @default is valid only as a target\n"
        f"{folder}: 4 errors; while the policy has any, every request is denied\n"
    )


def test_lint_of_a_good_folder() -> None:
    result = run("lint", str(EXAMPLES / "policy.d"))
    assert (result.exit_code, result.stdout) == (0, f"{EXAMPLES / 'policy.d'}: ok, 10 rules\n")
