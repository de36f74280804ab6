"""`qnix integrity init|check` end to end through the installed `qnix` on a stand-in host, with
the real AIDE: a baseline, a clean check, one changed file in a compartment's state reported
as exactly that file, hostile file names shown escaped, the audit events, and the errors.

AIDE covers a folder the test makes in place of /etc (and the test's state root), never the real
/etc, so a run takes well under a second.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qnix.compile.aide import DATABASE
from qnix.errors import QnixError
from qnix.runtime.integrity import (
    differences,
    files_of_config,
    own_files,
    printable,
    read_database,
)
from qnix.runtime.paths import RuntimePaths
from tests.conftest import need
from tests.runtime.livehost import QNIX, LiveHost

SPEC = """\
[host]
hostname = "lab"
subnet = "10.205.0.0/16"

[compartments.work]
memory_mb = 128

[compartments.scratch]
persistence = "disposable"
memory_mb = 128
"""


@pytest.fixture(scope="module")
def host() -> Iterator[LiveHost]:
    need("aide")
    live = LiveHost()
    try:
        yield live
    finally:
        live.close()


@pytest.fixture(scope="module")
def baseline(host: LiveHost) -> Path:
    """The host applied, a note in work's home and a stand-in /etc, then `integrity init`
    covering the stand-in /etc and the whole state root (so the audit log and AIDE's own
    database lie inside what is covered, and must still not show up)."""
    host.ok("apply", str(host.spec(SPEC)))
    etc = host.base / "etc"
    etc.mkdir()
    (etc / "hosts").write_text("127.0.0.1 localhost\n")
    note = host.paths.home("work") / "notes.txt"
    note.write_text("quarterly figures\n")
    out = host.ok(
        "integrity", "init", "--host-path", str(etc), "--host-path", str(host.paths.state_root)
    )
    assert out.startswith("integrity baseline of ")
    return note


def events_of(paths: RuntimePaths, kind: str) -> list[dict[str, Any]]:
    entries = [json.loads(line) for line in paths.audit_log.read_text().splitlines()]
    return [e for e in entries if e["event"] == kind]


def test_init_writes_a_private_config_and_database(host: LiveHost, baseline: Path) -> None:
    files = own_files(host.paths)
    assert files.config.parent == host.paths.state_root / "integrity"
    assert files.config.parent.stat().st_mode & 0o777 == 0o700
    assert files.config.stat().st_mode & 0o777 == 0o600
    assert files.database.name == DATABASE and files.database.stat().st_mode & 0o777 == 0o600
    assert not files.new_database.exists() and not files.scan.exists()
    config = files.config.read_text()
    assert f"{host.paths.state_root}/compartments/work(/|\\z) QnixState\n" in config
    assert "compartments/scratch" not in config  # a disposable keeps no state
    assert f"{host.paths.generation_dir}(/|\\z) QnixStatic\n" in config
    (init,) = events_of(host.paths, "integrity")
    assert init["action"] == "init" and init["result"] == "ok"
    assert init["config"] == str(files.config)
    assert init["entries"] > 0 and len(init["database_sha256"]) == 64


def test_check_with_nothing_changed_exits_0(host: LiveHost, baseline: Path) -> None:
    result = host.qnix("integrity", "check")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("integrity: no changes in ")
    assert result.stdout.count("\n") == 1
    last = events_of(host.paths, "integrity")[-1]
    assert (last["action"], last["result"]) == ("check", "clean")
    assert (last["added"], last["removed"], last["changed"]) == ([], [], [])


def test_a_changed_file_in_compartment_state_is_reported_alone(
    host: LiveHost, baseline: Path
) -> None:
    baseline.write_text("quarterly figures, edited by someone\n")
    result = host.qnix("integrity", "check")
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        f"changed: {baseline}",
        "integrity: 0 added, 0 removed, 1 changed",
    ]
    last = events_of(host.paths, "integrity")[-1]
    assert (last["action"], last["result"]) == ("check", "changed")
    assert (last["added"], last["removed"], last["changed"]) == ([], [], [str(baseline)])
    assert (last["added_count"], last["removed_count"], last["changed_count"]) == (0, 0, 1)


def test_the_same_check_through_an_explicit_config(host: LiveHost, baseline: Path) -> None:
    config = own_files(host.paths).config
    result = host.qnix("integrity", "check", "--config", str(config))
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines()[0] == f"changed: {baseline}"


def test_names_a_compartment_chose_are_shown_escaped(host: LiveHost, baseline: Path) -> None:
    home = os.fsencode(host.paths.home("work"))
    hostile = [b"evil\n\x1b[2Jchanged: passwd", b"\xff\xfe", b"back\\slash"]
    for name in hostile:
        with open(home + b"/" + name, "wb") as handle:
            handle.write(b"x")
    try:
        result = host.qnix("integrity", "check")
    finally:
        for name in hostile:
            os.unlink(home + b"/" + name)
    assert result.returncode == 1, result.stderr
    assert "\x1b" not in result.stdout
    lines = result.stdout.splitlines()
    base = str(host.paths.home("work"))
    assert lines == [
        f"added: {base}/back\\\\slash",
        f"added: {base}/evil\\x0a\\x1b[2Jchanged: passwd",
        f"added: {base}/\\xff\\xfe",
        f"changed: {baseline}",
        "integrity: 3 added, 0 removed, 1 changed",
    ]


def test_a_removed_file_and_a_new_host_file(host: LiveHost, baseline: Path) -> None:
    (host.base / "etc" / "hosts").unlink()
    (host.base / "etc" / "motd").write_text("hello\n")
    result = host.qnix("integrity", "check")
    assert result.returncode == 1, result.stderr
    etc = host.base / "etc"
    assert result.stdout.splitlines() == [
        f"added: {etc}/motd",
        f"removed: {etc}/hosts",
        f"changed: {etc}",  # the folder's times and link count moved too
        f"changed: {baseline}",
        "integrity: 1 added, 1 removed, 2 changed",
    ]


def test_a_new_baseline_accepts_the_changes(host: LiveHost, baseline: Path) -> None:
    host.ok(
        "integrity",
        "init",
        "--host-path",
        str(host.base / "etc"),
        "--host-path",
        str(host.paths.state_root),
    )
    result = host.qnix("integrity", "check")
    assert result.returncode == 0, result.stdout + result.stderr


# ---- errors ----------------------------------------------------------------------------------


def run_qnix(*args: str) -> tuple[int, str, str]:
    result = subprocess.run([QNIX, *args], capture_output=True, text=True, check=False)
    return result.returncode, result.stdout, result.stderr


def test_check_without_a_baseline_fails_with_a_hint(tmp_path: Path) -> None:
    code, out, err = run_qnix("integrity", "check", "--state-root", str(tmp_path / "state"))
    assert (code, out) == (1, "")
    assert err == (
        f"error: no integrity baseline: {tmp_path}/state/integrity/aide.db is missing\n"
        "  hint: record one first: qnix integrity init\n"
    )


def test_init_without_a_live_generation_fails_with_a_hint(tmp_path: Path) -> None:
    code, out, err = run_qnix(
        "integrity",
        "init",
        "--state-root",
        str(tmp_path / "state"),
        "--run-root",
        str(tmp_path / "run"),
    )
    assert (code, out) == (1, "")
    assert err == (
        f"error: no live generation under {tmp_path}/run\n"
        "  hint: bring the host up first: qnix apply SPEC\n"
    )


def test_a_config_of_ones_own_as_on_a_nixos_host(tmp_path: Path) -> None:
    """`--config`: a baseline from an aide.conf qnix did not write (a NixOS host's
    /etc/aide.conf), with no live generation needed."""
    need("aide")
    watched = tmp_path / "watched"
    watched.mkdir()
    (watched / "policy").write_text("allow\n")
    databases = tmp_path / "aide"
    databases.mkdir(mode=0o700)
    config = tmp_path / "aide.conf"
    config.write_text(
        f"database_in=file:{databases}/aide.db\n"
        f"database_out=file:{databases}/aide.db.new\n"
        f"{watched}(/|\\z) p+u+g+s+sha256\n"
    )
    state = str(tmp_path / "state")
    code, out, err = run_qnix("integrity", "init", "--config", str(config), "--state-root", state)
    assert (code, err) == (0, ""), out
    assert out.startswith(f"integrity baseline of 2 entries in {databases}/aide.db\n")
    code, out, err = run_qnix("integrity", "check", "--config", str(config), "--state-root", state)
    assert (code, out, err) == (0, "integrity: no changes in 2 entries\n", "")
    (watched / "policy").write_text("deny\n")
    code, out, err = run_qnix("integrity", "check", "--config", str(config), "--state-root", state)
    assert (code, err) == (1, "")
    assert out == f"changed: {watched}/policy\nintegrity: 0 added, 0 removed, 1 changed\n"
    code, out, err = run_qnix(
        "integrity", "init", "--config", str(config), "--host-path", "/srv", "--state-root", state
    )
    assert code == 2 and "--host-path shapes qnix's own aide.conf" in err


def test_a_foreign_config_must_name_its_databases(tmp_path: Path) -> None:
    paths = RuntimePaths(state_root=tmp_path / "state", run_root=tmp_path / "run")
    config = tmp_path / "aide.conf"
    config.write_text("database_in=file:@@{DBDIR}/aide.db\ndatabase_out=file:/var/lib/x.new\n")
    with pytest.raises(QnixError, match="names no database_in as a file: URL"):
        files_of_config(paths, config)
    config.write_text(
        "# first of each counts, as in AIDE\n"
        "database_in=file:/var/lib/aide/aide.db\n"
        "database_out = file:/var/lib/aide/aide.db.new\n"
        "database_in=file:/elsewhere\n"
    )
    files = files_of_config(paths, config)
    assert (files.database, files.new_database) == (
        Path("/var/lib/aide/aide.db"),
        Path("/var/lib/aide/aide.db.new"),
    )
    assert files.scan == tmp_path / "state" / "integrity" / "aide.db.scan"


def test_printable_escapes_everything_a_terminal_would_act_on() -> None:
    raw = b"a b\\c\n\x1b[0m\x7f\xc3\xa9\xe2\x80\xae\xff"
    name = raw.decode("utf-8", "surrogateescape")
    assert printable(name) == "a b\\\\c\\x0a\\x1b[0m\\x7fé\\u202e\\xff"
    assert printable("plain/path-1_2.txt") == "plain/path-1_2.txt"


# ---- reading AIDE's databases ------------------------------------------------------------------

DATABASE_TEXT = (
    b"@@begin_db\n"
    b"# This file was generated by Aide, version 0.18.3\n"
    b"@@db_spec name perm uid gid size sha256 \n"
    b"/etc 40755 0 0 4096 0\n"
    b"/etc/a%20b%0A%FF%25 100644 0 0 3 c2hhMjU2\n"
    b"/etc/plus+eq= 100644 0 0 1 eA==\n"
    b"@@end_db\n"
)


def test_a_database_reads_back_every_name_exactly(tmp_path: Path) -> None:
    plain = tmp_path / "aide.db"
    plain.write_bytes(DATABASE_TEXT)
    packed = tmp_path / "aide.db.gz"
    packed.write_bytes(gzip.compress(DATABASE_TEXT))
    for path in (plain, packed):
        entries = read_database(path)
        assert [os.fsencode(name) for name in entries] == [
            b"/etc",
            b"/etc/a b\n\xff%",
            b"/etc/plus+eq=",
        ]
        assert entries["/etc"] == {
            "perm": b"40755",
            "uid": b"0",
            "gid": b"0",
            "size": b"4096",
            "sha256": b"0",
        }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (DATABASE_TEXT.replace(b"@@end_db\n", b""), "cut short"),
        (DATABASE_TEXT.replace(b" 0 0 3 ", b" 0 0 "), "not a line of an AIDE database"),
        (DATABASE_TEXT.replace(b"@@db_spec name", b"@@db_spec perm"), "does not start with name"),
        (b"/etc 40755\n@@end_db\n", "not a line of an AIDE database"),
        (DATABASE_TEXT + b"/late 1 2 3 4 5\n", "not a line of an AIDE database"),
        (DATABASE_TEXT.replace(b"/etc 40755", b"   \n/etc 40755"), "not a line"),
    ],
)
def test_a_damaged_database_is_refused(tmp_path: Path, text: bytes, message: str) -> None:
    path = tmp_path / "aide.db"
    path.write_bytes(text)
    with pytest.raises(QnixError, match=message):
        read_database(path)


def test_differences_between_two_databases() -> None:
    old = {"/a": {"sha256": b"x"}, "/b": {"sha256": b"y"}, "/c": {"sha256": b"z"}}
    new = {"/a": {"sha256": b"x"}, "/b": {"sha256": b"Y"}, "/d": {"sha256": b"w"}}
    assert differences(old, new) == (("/d",), ("/c",), ("/b",))
    assert differences(old, old) == ((), (), ())
