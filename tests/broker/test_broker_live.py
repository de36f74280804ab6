"""The broker end to end on a stand-in host (tests/runtime/livehost.py): `qnix copy`, `move`,
`clip` and `open-in-dvm` between real compartments under an inline policy, each allowed case
beside a denied one (nothing arrives, exit code 1, the deny in the audit log), a hostile
stream refused by `unpack` inside a real compartment, and targets that hold up their side of a
copy or paste, each beside the same target behaving."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qnix.inside import qfile
from tests.broker.streams import entry, stream, tree
from tests.conftest import ROOT
from tests.runtime.livehost import QNIX, LiveHost

SPEC = """\
default_disposable = "dvm"

[host]
hostname = "lab"
subnet = "10.213.0.0/16"

[compartments.work]
memory_mb = 128
autostart = true

[compartments.personal]
memory_mb = 128
autostart = true

[compartments.vault]
memory_mb = 128
autostart = true

[disposable_templates.dvm]
memory_mb = 128

[policy]
rules = [
  "qnix.Filecopy * work personal allow",
  "qnix.Filemove * work personal allow",
  "qnix.Filecopy * personal work ask",
  "qnix.Filecopy * @anyvm @anyvm deny",
  "qnix.Filemove * @anyvm @anyvm deny",
  "qnix.Clipboard +binary work personal allow",
  "qnix.Clipboard * work personal allow",
  "qnix.Clipboard * personal work allow",
  "qnix.Clipboard * @anyvm @anyvm deny",
  "qnix.OpenInDisposable +edit vault @dispvm deny",
  "qnix.OpenInDisposable * work @dispvm allow",
  "qnix.OpenInDisposable * vault @dispvm allow",
  "qnix.OpenInDisposable * @anyvm @anyvm deny",
]
"""
PYTHON_INSIDE = "python3"


@pytest.fixture(scope="module")
def host() -> Iterator[LiveHost]:
    made = LiveHost()
    try:
        made.ok("apply", str(made.spec(SPEC)))
        yield made
    finally:
        made.close()


def home(host: LiveHost, name: str) -> Path:
    return host.paths.home(name)


def incoming(host: LiveHost, target: str, source: str) -> Path:
    return home(host, target) / qfile.INCOMING / source


def put(host: LiveHost, name: str, relative: str, data: bytes, mode: int = 0o644) -> Path:
    """A file in a compartment's home, owned by the compartment's user, as if made inside."""
    owner = home(host, name).stat()
    path = home(host, name) / relative
    for folder in reversed(path.relative_to(home(host, name)).parents[:-1]):
        if not (home(host, name) / folder).exists():
            (home(host, name) / folder).mkdir()
            os.chown(home(host, name) / folder, owner.st_uid, owner.st_gid)
    path.write_bytes(data)
    os.chown(path, owner.st_uid, owner.st_gid)
    path.chmod(mode)
    return path


def qnix_bytes(host: LiveHost, *args: str, data: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [QNIX, *args], input=data, capture_output=True, env=host.env, timeout=60, check=False
    )


def audit(host: LiveHost, event: str) -> list[dict[str, Any]]:
    lines = host.paths.audit_log.read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == event]


def last_policy(host: LiveHost, service: str) -> dict[str, Any]:
    return [e for e in audit(host, "policy") if e["service"] == service][-1]


# ---- copy and move -----------------------------------------------------------------------------


def test_copy_brings_files_folders_and_symlinks_with_exact_bytes_and_modes(host: LiveHost) -> None:
    put(host, "work", "report/summary.txt", b"quarterly\n", 0o640)
    put(host, "work", "report/data/table.bin", bytes(range(256)) * 1000, 0o600)
    put(host, "work", "run.sh", b"#!/bin/sh\necho hi\n", 0o755)
    (home(host, "work") / "report" / "latest").symlink_to("data/table.bin")
    result = host.qnix("copy", "work:report", "work:run.sh", "personal")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "copied 3 files, 2 folders, 1 symlink (256028 bytes) from work to "
        "personal:~/QubesIncoming/work/\n"
    )
    arrived = tree(incoming(host, "personal", "work"))
    sent = tree(home(host, "work"))
    assert arrived == {path: sent[path] for path in arrived}
    assert sorted(arrived) == [
        "report",
        "report/data",
        "report/data/table.bin",
        "report/latest",
        "report/summary.txt",
        "run.sh",
    ]
    assert arrived["report/summary.txt"] == ("file", 0o640, b"quarterly\n")
    assert arrived["run.sh"][1] == 0o755
    assert arrived["report/latest"] == ("symlink", 0, "data/table.bin")
    # Owned by personal's own user, and nothing else in personal's home changed.
    owner = home(host, "personal").stat().st_uid
    assert (incoming(host, "personal", "work") / "run.sh").stat().st_uid == owner
    record = audit(host, "copy")[-1]
    assert record["result"] == "ok"
    assert record["action"] == "allow"
    assert record["bytes"] == 256028
    # Each file with its sha256 and size; never its content.
    digest = hashlib.sha256(bytes(range(256)) * 1000).hexdigest()
    assert f"{digest} 256000 report/data/table.bin" in record["files"]
    assert "symlink report/latest" in record["files"]


def test_a_second_copy_of_the_same_name_is_refused_and_changes_nothing(host: LiveHost) -> None:
    put(host, "work", "once.txt", b"first")
    host.ok("copy", "work:once.txt", "personal")
    put(host, "work", "once.txt", b"second")
    result = host.qnix("copy", "work:once.txt", "personal")
    assert result.returncode == 1
    assert "once.txt is already in ~/QubesIncoming/work" in result.stderr
    assert (incoming(host, "personal", "work") / "once.txt").read_bytes() == b"first"


def test_denied_copy_delivers_nothing_and_is_audited(host: LiveHost) -> None:
    put(host, "work", "secret.txt", b"s")
    result = host.qnix("copy", "work:secret.txt", "vault")
    assert result.returncode == 1
    assert "copy from work to vault denied" in result.stderr
    assert not (home(host, "vault") / qfile.INCOMING).exists()
    decision = last_policy(host, "qnix.Filecopy")
    assert (decision["source"], decision["target"], decision["action"]) == ("work", "vault", "deny")
    assert audit(host, "copy")[-1]["result"] == "denied"


def test_ask_is_answered_by_yes_and_no(host: LiveHost) -> None:
    put(host, "personal", "asked.txt", b"?")
    denied = host.qnix("copy", "--no", "personal:asked.txt", "work")
    assert denied.returncode == 1
    assert "not confirmed" in denied.stderr
    assert not (incoming(host, "work", "personal") / "asked.txt").exists()
    host.ok("copy", "--yes", "personal:asked.txt", "work")
    assert (incoming(host, "work", "personal") / "asked.txt").read_bytes() == b"?"
    assert last_policy(host, "qnix.Filecopy")["asked"] is True


def test_move_removes_the_source_only_after_it_arrived(host: LiveHost) -> None:
    put(host, "work", "moving/a.txt", b"a")
    put(host, "work", "moving/b.txt", b"b")
    host.ok("move", "work:moving", "personal")
    assert not (home(host, "work") / "moving").exists()
    assert tree(incoming(host, "personal", "work") / "moving") == {
        "a.txt": ("file", 0o644, b"a"),
        "b.txt": ("file", 0o644, b"b"),
    }
    # The same name again: refused in personal, so the new source stays where it is.
    put(host, "work", "moving/c.txt", b"c")
    failed = host.qnix("move", "work:moving", "personal")
    assert failed.returncode == 1
    assert "already in" in failed.stderr
    assert (home(host, "work") / "moving" / "c.txt").read_bytes() == b"c"
    # Denied: the source stays too.
    denied = host.qnix("move", "work:moving", "vault")
    assert denied.returncode == 1
    assert (home(host, "work") / "moving" / "c.txt").exists()
    assert last_policy(host, "qnix.Filemove")["action"] == "deny"


def test_a_hostile_stream_is_refused_inside_the_target(host: LiveHost) -> None:
    """What a compromised source could send instead of pack's stream, fed to unpack in a real
    compartment: every one is refused and nothing lands, in or out of the incoming folder."""
    hostile = [
        stream(entry(qfile.FILE, "../../escape", b"x")),
        stream(entry(qfile.LINK, "ln", b"../../../etc"), entry(qfile.FILE, "ln/x", b"x")),
        stream(
            entry(qfile.FOLDER, "d"), entry(qfile.LINK, "d/a", b"."), entry(qfile.FILE, "d/a/f")
        ),
        stream(entry(b"C", "tty")),
        stream(entry(qfile.FILE, "ok", b"fine"), entry(qfile.FILE, "bad\nname", b"x")),
    ]
    before = tree(home(host, "vault"))
    unpack = [PYTHON_INSIDE, "-I", "/opt/qnix-agent/qfile.py", "unpack", "work"]
    for data in hostile:
        result = qnix_bytes(host, "run", "vault", "--", *unpack, data=data)
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith(b"qfile: ")
    after = tree(home(host, "vault"))
    assert {path: after[path] for path in before} == before
    assert set(after) - set(before) == {"QubesIncoming", "QubesIncoming/work"}


# ---- clipboard ---------------------------------------------------------------------------------


def set_clipboard(host: LiveHost, name: str, data: bytes) -> None:
    result = qnix_bytes(
        host,
        *("run", name, "--", PYTHON_INSIDE, "/opt/qnix-agent/clipboard.py", "set"),
        *("--max-bytes", "1000000"),  # the compartment's own limit: the host's is checked here
        data=data,
    )
    assert result.returncode == 0, result.stderr


def get_clipboard(host: LiveHost, name: str) -> bytes:
    result = qnix_bytes(
        host, "run", name, "--", PYTHON_INSIDE, "/opt/qnix-agent/clipboard.py", "get"
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_clipboard_copy_then_paste_once(host: LiveHost) -> None:
    set_clipboard(host, "work", "grüße\n".encode())
    assert host.ok("clip", "copy", "work") == "copied 8 bytes (text) from work\n"
    shown = host.ok("clip", "show")
    assert shown.startswith("8 bytes (text) from work, copied ")
    assert "grüße" not in shown
    clipboard_file = host.paths.run_root / "clipboard"
    assert clipboard_file.stat().st_mode & 0o777 == 0o600
    assert host.ok("clip", "paste", "personal") == "pasted 8 bytes (text) from work into personal\n"
    assert get_clipboard(host, "personal") == "grüße\n".encode()
    assert host.ok("clip", "show") == "the clipboard is empty\n"
    again = host.qnix("clip", "paste", "personal")
    assert again.returncode == 1
    assert "the clipboard is empty" in again.stderr
    record = audit(host, "clipboard")[-1]
    assert (record["action"], record["source"], record["target"], record["result"]) == (
        "paste",
        "work",
        "personal",
        "ok",
    )


def test_clipboard_size_limit(host: LiveHost) -> None:
    set_clipboard(host, "work", b"a" * (64 * 1024 + 1))
    result = host.qnix("clip", "copy", "work")
    assert result.returncode == 1
    assert "more than 65536 bytes" in result.stderr
    assert host.ok("clip", "show") == "the clipboard is empty\n"
    set_clipboard(host, "work", b"a" * (64 * 1024))
    host.ok("clip", "copy", "work")
    host.ok("clip", "paste", "personal")
    assert get_clipboard(host, "personal") == b"a" * (64 * 1024)


def test_clipboard_denied_paste_keeps_it_and_delivers_nothing(host: LiveHost) -> None:
    set_clipboard(host, "personal", b"before")
    set_clipboard(host, "work", b"for vault")
    host.ok("clip", "copy", "work")
    denied = host.qnix("clip", "paste", "vault")
    assert denied.returncode == 1
    assert "denied" in denied.stderr
    assert get_clipboard(host, "vault") == b""
    decision = last_policy(host, "qnix.Clipboard")
    assert (decision["source"], decision["target"], decision["action"]) == ("work", "vault", "deny")
    assert host.ok("clip", "show").startswith("9 bytes (text) from work")
    host.ok("clip", "clear")


def test_binary_needs_a_line_that_names_it(host: LiveHost) -> None:
    binary = b"\x00\xffbinary"
    set_clipboard(host, "personal", binary)
    host.ok("clip", "copy", "personal")
    denied = host.qnix("clip", "paste", "work")  # personal -> work: a `*` line, text only
    assert denied.returncode == 1
    assert "does not name +binary itself" in denied.stderr
    assert get_clipboard(host, "work") != binary
    host.ok("clip", "clear")
    set_clipboard(host, "work", binary)
    host.ok("clip", "copy", "work")
    host.ok("clip", "paste", "personal")  # work -> personal: `+binary` named
    assert get_clipboard(host, "personal") == binary


# ---- open in a disposable ----------------------------------------------------------------------


def disposables(host: LiveHost) -> list[str]:
    return [name for name in host.ls() if name.startswith("disp")]


APPEND = 'sh -c \'printf " edited in $(hostname)" >> "$1"\' opener'


def test_open_in_dvm_brings_edits_back(host: LiveHost) -> None:
    document = put(host, "work", "doc.txt", b"draft", 0o640)
    result = host.qnix("open-in-dvm", "--with", APPEND, "work", "doc.txt")
    assert result.returncode == 0, result.stderr
    assert "the edits replaced doc.txt in work" in result.stderr
    content = document.read_bytes()
    assert content.startswith(b"draft edited in disp")
    assert document.stat().st_mode & 0o777 == 0o640
    assert disposables(host) == []
    record = audit(host, "open-in-dvm")[-1]
    assert (record["result"], record["returned"], record["edit_action"]) == ("ok", True, "allow")


def test_open_in_dvm_without_edit_permission_keeps_the_original(host: LiveHost) -> None:
    document = put(host, "vault", "ledger.txt", b"numbers")
    result = host.qnix("open-in-dvm", "--with", APPEND, "vault", "ledger.txt")
    assert result.returncode == 0, result.stderr
    assert "edits not brought back" in result.stderr
    assert document.read_bytes() == b"numbers"
    assert disposables(host) == []
    decision = last_policy(host, "qnix.OpenInDisposable")
    assert (decision["argument"], decision["action"]) == ("+edit", "deny")
    # Unchanged: nothing to ask about, nothing comes back.
    viewed = host.qnix("open-in-dvm", "--with", "cat", "vault", "ledger.txt")
    assert viewed.returncode == 0
    assert viewed.stdout == "numbers"
    assert "no edits" in viewed.stderr


def test_open_in_dvm_denied(host: LiveHost) -> None:
    put(host, "personal", "photo.txt", b"p")
    result = host.qnix("open-in-dvm", "--with", APPEND, "personal", "photo.txt")
    assert result.returncode == 1
    assert "denied" in result.stderr
    assert (home(host, "personal") / "photo.txt").read_bytes() == b"p"
    assert disposables(host) == []
    assert audit(host, "open-in-dvm")[-1]["result"] == "denied"
    assert last_policy(host, "qnix.OpenInDisposable")["action"] == "deny"


# ---- a target that holds up its side ------------------------------------------------------------
#
# Through tests/broker/rigged.py the target runs the broker's programs through a snippet of its
# own user's, with a short QNIX_TRANSFER_TIMEOUT: a deadline that passed shows in the error.
# Each snippet leaves the pid of what it keeps running in ~/.stalled, for `kill_stalled`.

BEHAVES = 'exec "$@"'
HOLDS_OUTPUT = 'sleep 300 & echo $! > "$HOME/.stalled"; exec "$@"'
NEVER_READS = 'echo $$ > "$HOME/.stalled"; exec sleep 300'
NEVER_ENDS = 'cat > /dev/null; echo $$ > "$HOME/.stalled"; exec sleep 300'
DEADLINE = "5"


def rigged(
    host: LiveHost, target: str, snippet: str, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.broker.rigged", target, snippet, *args],
        cwd=ROOT,
        env={**host.env, "QNIX_TRANSFER_TIMEOUT": DEADLINE},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def stalled_alive(host: LiveHost, name: str) -> bool:
    check = host.qnix("run", name, "--", "sh", "-c", 'kill -0 "$(cat "$HOME/.stalled")"')
    return check.returncode == 0


def stall_ended(host: LiveHost, name: str) -> bool:
    """Whether the stalled command was ended once the host gave up on it: its agent ends a
    command whose client has gone."""
    deadline = time.monotonic() + 20
    while stalled_alive(host, name):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.fixture
def kill_stalled(host: LiveHost) -> Iterator[None]:
    yield
    stop = 'kill "$(cat "$HOME/.stalled")" 2>/dev/null; rm -f "$HOME/.stalled"'
    host.ok("run", "personal", "--", "sh", "-c", stop)


def test_output_held_open_by_the_target_does_not_hold_up_the_copy(
    host: LiveHost, kill_stalled: None
) -> None:
    """unpack reports its end while a process of the target keeps its stdout and stderr
    open: the copy is done (it used to wait for the pipes' end)."""
    put(host, "work", "held.txt", b"held")
    result = rigged(host, "personal", HOLDS_OUTPUT, "copy", "work:held.txt", "personal")
    assert result.returncode == 0, result.stderr
    assert "copied 1 file," in result.stdout
    assert (incoming(host, "personal", "work") / "held.txt").read_bytes() == b"held"
    assert stalled_alive(host, "personal")  # still holding both pipes
    # The holder does not change a refusal either: the same name again is refused at once.
    again = rigged(host, "personal", HOLDS_OUTPUT, "copy", "work:held.txt", "personal")
    assert again.returncode == 1
    assert "held.txt is already in ~/QubesIncoming/work" in again.stderr


@pytest.mark.parametrize(
    ("snippet", "size", "error", "hint"),
    [
        (
            NEVER_READS,
            4 << 20,  # more than the pipe holds: the sender cannot finish either
            "copy failed, nothing arrived: work was still sending and personal still "
            f"receiving after {DEADLINE} s",
            "if personal stopped reading, `qnix restart personal` ends what holds it up; a "
            f"transfer that is just big may take more than {DEADLINE} s: "
            "QNIX_TRANSFER_TIMEOUT=SECONDS",
        ),
        (
            NEVER_ENDS,
            1000,
            "copy failed, nothing arrived: personal did not finish receiving in time, after "
            "work had sent all",
            "something in personal holds it up: `qnix restart personal` ends it",
        ),
    ],
    ids=["never-reads", "never-ends"],
)
def test_a_target_that_stalls_fails_the_copy_at_the_deadline(
    host: LiveHost, kill_stalled: None, snippet: str, size: int, error: str, hint: str
) -> None:
    name = f"stall-{size}.bin"
    data = os.urandom(size)
    put(host, "work", name, data)
    result = rigged(host, "personal", snippet, "copy", f"work:{name}", "personal")
    assert result.returncode == 1
    assert result.stderr == f"error: {error}\n  hint: {hint}\n"
    assert stall_ended(host, "personal")  # the host let go, and the agent ended it
    assert not (incoming(host, "personal", "work") / name).exists()
    record = audit(host, "copy")[-1]
    assert record["result"].startswith(f"error: {error}")
    # The control: the same, through the same snippet's shell, with a target that behaves.
    control = rigged(host, "personal", BEHAVES, "copy", f"work:{name}", "personal")
    assert control.returncode == 0, control.stderr
    assert (incoming(host, "personal", "work") / name).read_bytes() == data
    assert audit(host, "copy")[-1]["result"] == "ok"


def test_a_paste_target_that_never_ends_fails_the_paste_at_the_deadline(
    host: LiveHost, kill_stalled: None
) -> None:
    set_clipboard(host, "personal", b"before")
    set_clipboard(host, "work", b"stalled paste")
    host.ok("clip", "copy", "work")
    result = rigged(host, "personal", NEVER_READS, "clip", "paste", "personal")
    assert result.returncode == 1
    error = f"personal did not finish taking the clipboard within {DEADLINE} s"
    assert result.stderr.startswith(f"error: {error}\n  hint: if personal is stuck, `qnix ")
    assert stall_ended(host, "personal")
    assert get_clipboard(host, "personal") == b"before"
    assert host.ok("clip", "show").startswith("13 bytes (text) from work")  # kept
    assert audit(host, "clipboard")[-1]["result"] == f"error: {error}"
    control = rigged(host, "personal", BEHAVES, "clip", "paste", "personal")
    assert control.returncode == 0, control.stderr
    assert get_clipboard(host, "personal") == b"stalled paste"
