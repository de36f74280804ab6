"""Calls from inside a compartment, end to end on a stand-in host: allowed calls run in the
target with stdio and exit code passing through, denied ones run nothing, the source is the
compartment the call socket belongs to, hostile requests are refused while the server keeps
serving, and the call socket cannot be replaced from inside.

The stand-in host is tests/runtime/livehost.py; qnix.VMShell (a shell in the target reading
its commands from the caller's stdin) is the service that shows what runs where.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qnix.broker import calls
from qnix.broker.services import SERVICES, service_argv
from qnix.compile import names
from qnix.policy.evaluate import REQUEST_ARGUMENT_RE, REQUEST_SERVICE_RE
from qnix.runtime import agent, quickrun
from qnix.runtime.paths import CALL_SOCKET_NAME, call_dir
from tests.runtime.livehost import QNIX, LiveHost

SPEC = """\
default_disposable = "dvm"

[host]
hostname = "lab"
subnet = "10.213.0.0/16"

[compartments.work]
memory_mb = 128
autostart = true

[compartments.other]
memory_mb = 128
autostart = true

[compartments.vault]
memory_mb = 128
network = "none"

[disposable_templates.dvm]
memory_mb = 128
network = "none"
preload = 1

[policy]
rules = [
  "qnix.VMShell * work @dispvm allow",
  "qnix.VMShell * other @dispvm deny",
  "qnix.VMShell * work vault allow",
  "qnix.VMShell * work other deny",
  "qnix.VMShell * other vault ask default_target=vault",
  "qnix.Unknown * work vault allow",
]
"""
CALL = ["python3", "-I", "-S", "/opt/qnix-agent/call.py"]
DENIED = "qnix-call: qnix.VMShell refused: denied by policy\n"

# Runs inside a compartment: makes raw requests on the call socket, one connection each, and
# prints every answer frame. Cases on stdin: {"raw": base64 bytes, "fds": which descriptors}.
PROBE = r"""
import array, base64, json, os, socket, sys
results = []
for case in json.load(sys.stdin):
    read, write = os.pipe()
    fds = {
        "stdio": [read, write, write],
        "none": [],
        "four": [read, write, write, write],
        "folder": [os.open("/", os.O_RDONLY), write, write],
    }[case["fds"]]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.connect("/run/qnix-call/call.sock")
    data = base64.b64decode(case["raw"])
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    sent = sock.sendmsg([data], rights if fds else [])
    sock.sendall(data[sent:])
    sock.shutdown(socket.SHUT_WR)
    answer = b""
    try:  # a peer that closes with part of our request unread resets after its answer
        while chunk := sock.recv(65536):
            answer += chunk
    except ConnectionResetError:
        pass
    frames = []
    while answer:
        size = int.from_bytes(answer[:4], "big")
        frames.append(json.loads(answer[4 : 4 + size]))
        answer = answer[4 + size :]
    results.append(frames)
    for fd in set(fds) | {read, write}:
        os.close(fd)
print(json.dumps(results))
"""


ASK_TIMEOUT = 5.0  # how long a call's question waits here (60 s by default)


@pytest.fixture(scope="module")
def host() -> Iterator[LiveHost]:
    # The keepers (which serve the calls) inherit the environment of `qnix apply`.
    os.environ["QNIX_ASK_TIMEOUT"] = str(ASK_TIMEOUT)
    made = LiveHost()
    try:
        made.ok("apply", str(made.spec(SPEC)))
        yield made
    finally:
        made.close()
        del os.environ["QNIX_ASK_TIMEOUT"]


def call(
    host: LiveHost, source: str, target: str, service: str, script: str
) -> subprocess.CompletedProcess[str]:
    """`call.py TARGET SERVICE` run in `source`, with `script` as its stdin."""
    return host.qnix("run", source, "--", *CALL, target, service, input=script)


def raw_requests(host: LiveHost, source: str, cases: list[dict[str, str]]) -> list[Any]:
    result = host.qnix(
        "run", source, "--", "python3", "-I", "-S", "-c", PROBE, input=json.dumps(cases)
    )
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert isinstance(answers, list)
    return answers


def raw_frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def frame(message: object) -> bytes:
    return raw_frame(json.dumps(message).encode())


def case(raw: bytes, fds: str = "stdio") -> dict[str, str]:
    return {"raw": base64.b64encode(raw).decode(), "fds": fds}


def request(target: str = "vault", service: str = "qnix.VMShell", **extra: object) -> bytes:
    return frame({"op": "call", "target": target, "service": service, "argument": "", **extra})


def call_events(host: LiveHost) -> list[dict[str, Any]]:
    lines = host.paths.audit_log.read_text().splitlines()
    return [entry for entry in map(json.loads, lines) if entry["event"] == "call"]


def marker(host: LiveHost, name: str, file: str) -> Path:
    return host.paths.home(name) / file


# ---- allowed calls ----------------------------------------------------------------------------


def test_an_allowed_call_runs_in_the_target_with_stdio_and_exit_code(host: LiveHost) -> None:
    assert host.ls()["vault"]["state"] == "stopped"
    script = (
        'echo "in $(hostname) as $(id -un) for $QNIX_REMOTE_DOMAIN"\n'
        "echo to-stderr >&2\n"
        "echo ran > ~/marker-allowed\n"
        "exit 7\n"
    )
    result = call(host, "work", "vault", "qnix.VMShell", script)
    assert (result.returncode, result.stdout, result.stderr) == (
        7,
        "in vault as user for work\n",
        "to-stderr\n",
    )
    # The target was started for the call (autostart), and the script ran there, not here.
    assert host.ls()["vault"]["state"] == "running"
    assert marker(host, "vault", "marker-allowed").read_text() == "ran\n"
    assert not marker(host, "work", "marker-allowed").exists()
    last = call_events(host)[-1]
    assert {k: last[k] for k in ("source", "service", "target", "decision", "code")} == {
        "source": "work",
        "service": "qnix.VMShell",
        "target": "vault",
        "decision": "allow",
        "code": 7,
    }


def disposables(host: LiveHost) -> set[str]:
    return {name for name, entry in host.ls().items() if entry.get("template") is not None}


def settle(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"not settled: {what}"
        time.sleep(0.1)


def test_a_call_to_dispvm_runs_in_a_disposable_of_its_own_that_is_gone_after(
    host: LiveHost,
) -> None:
    settle(lambda: len(disposables(host)) == 1, "the preloaded disposable")
    (preloaded,) = disposables(host)
    waiting_state = quickrun.read_state(host.paths, preloaded)
    assert waiting_state is not None
    script = 'echo "in $(hostname) for $QNIX_REMOTE_DOMAIN"\necho x > ~/mark\nexit 5\n'
    result = call(host, "work", "@dispvm", "qnix.VMShell", script)
    assert (result.returncode, result.stdout, result.stderr) == (
        5,
        f"in {preloaded} for work\n",
        "",
    )
    last = call_events(host)[-1]
    assert {k: last[k] for k in ("target", "resolved_target", "disposable", "code")} == {
        "target": "@dispvm",
        "resolved_target": "@dispvm:dvm",
        "disposable": preloaded,
        "code": 5,
    }
    # It ended with the call: its keeper is gone (a new one may wait under the same name).
    assert not quickrun.keeper_alive(waiting_state)
    settle(lambda: len(disposables(host)) == 1, "the refill")

    # Two at once: each in a disposable of its own (the second a fresh one), neither sees the
    # other's files.
    script = "sleep 1; ls ~; echo $(hostname) > ~/mark; hostname\n"
    both = [
        subprocess.Popen(
            [QNIX, "run", "work", "--", *CALL, "@dispvm", "qnix.VMShell"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=host.env,
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(script, timeout=60)[0] for process in both]
    assert [process.returncode for process in both] == [0, 0]
    # `ls ~` printed nothing: each home was empty, the other's mark not in it.
    assert all(output.count("\n") == 1 for output in outputs), outputs
    assert len(set(outputs)) == 2, outputs
    settle(lambda: len(disposables(host)) == 1, "the pool after two calls")


def test_a_denied_call_to_dispvm_starts_no_disposable(host: LiveHost) -> None:
    settle(lambda: len(disposables(host)) == 1, "the preloaded disposable")
    waiting = disposables(host)
    result = call(host, "other", "@dispvm", "qnix.VMShell", "echo ran\n")
    assert (result.returncode, result.stdout, result.stderr) == (calls.REFUSED, "", DENIED)
    last = call_events(host)[-1]
    assert (last["decision"], last["disposable"]) == ("deny", None)
    assert disposables(host) == waiting


def test_the_argument_reaches_the_service_environment_only(host: LiveHost) -> None:
    result = call(host, "work", "vault", "qnix.VMShell+two.words", 'echo "$QNIX_SERVICE_ARGUMENT"')
    assert (result.returncode, result.stdout) == (0, "+two.words\n")


# ---- denied calls -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "target", "why"),
    [
        ("work", "other", "deny line"),
        ("other", "work", "no line"),
        ("other", "vault", "ask, and nobody to answer"),
    ],
)
def test_a_denied_call_runs_nothing_in_the_target(
    host: LiveHost, source: str, target: str, why: str
) -> None:
    file = f"marker-{source}-{target}"
    result = call(host, source, target, "qnix.VMShell", f"echo ran > ~/{file}\n")
    assert (result.returncode, result.stdout, result.stderr) == (calls.REFUSED, "", DENIED), why
    assert not marker(host, target, file).exists()
    last = call_events(host)[-1]
    assert (last["source"], last["target"], last["decision"], last["code"]) == (
        source,
        target,
        "deny",
        calls.REFUSED,
    )


def test_an_unknown_service_is_refused_even_where_the_policy_allows_it(host: LiveHost) -> None:
    result = call(host, "work", "vault", "qnix.Unknown", "echo ran > ~/marker-unknown\n")
    assert (result.returncode, result.stdout, result.stderr) == (
        calls.REFUSED,
        "",
        "qnix-call: qnix.Unknown refused: unknown service\n",
    )
    assert not marker(host, "vault", "marker-unknown").exists()


def test_a_caller_cannot_choose_its_source(host: LiveHost) -> None:
    # `other` may not call vault (ask, nobody answers); claiming to be `work` does not help.
    spoofed, plain = raw_requests(
        host,
        "other",
        [case(request(source="work")), case(request())],
    )
    assert spoofed == [{"op": "refused", "message": "unknown fields in the request: 'source'"}]
    assert plain == [{"op": "refused", "message": "denied by policy"}]
    events = call_events(host)[-2:]
    assert [(e["source"], e["decision"]) for e in events] == [
        ("other", "malformed"),
        ("other", "deny"),
    ]


def test_only_the_compartments_own_uid_may_call(host: LiveHost) -> None:
    """Host root connecting to work's call socket is not work: refused, nothing read."""
    path = call_dir(host.paths.run_dir("work")) / CALL_SOCKET_NAME
    read, write = os.pipe()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            body = {"op": "call", "target": "vault", "service": "qnix.VMShell", "argument": ""}
            agent.send_message(sock, body, (read, write, write))
            answer, fds = agent.recv_message(sock)
        assert (answer, fds) == ({"op": "refused", "message": "not this compartment's caller"}, [])
    finally:
        os.close(read)
        os.close(write)
    last = call_events(host)[-1]
    assert (last["source"], last["decision"], last["reason"]) == ("work", "refused", "peer uid 0")


# ---- hostile requests -------------------------------------------------------------------------


def test_malformed_and_oversized_requests_are_refused_and_serving_goes_on(
    host: LiveHost,
) -> None:
    malformed = "malformed request"
    cases = {
        "not JSON": (case(b"\x00\x00\x00\x05hello"), malformed),
        "oversized": (case((1 << 20).to_bytes(4, "big") + b"{}"), "request too large"),
        "cut short": (case(b"\x00\x00\x01\x00{}"), malformed),
        "a list": (case(frame([1, 2])), malformed),
        "deep nesting": (case(raw_frame(b"[" * 50000)), malformed),
        "huge number": (case(raw_frame(b"1" * 60000)), malformed),
        "another op": (case(frame({"op": "exec", "argv": ["sh"]})), "not a call request"),
        "bad service": (case(request(service="qnix.VMShell;id")), "invalid service name"),
        "long service": (case(request(service="a" * 65)), "invalid service name"),
        "bad argument": (case(request(argument="+a b")), "invalid service argument"),
        "long argument": (case(request(argument="+" + "a" * 65)), "invalid service argument"),
        "bad target": (case(request(target="../vault")), "invalid target"),
        "target not a string": (case(request(target=["vault"])), "invalid target"),
        "no descriptors": (
            case(request(), "none"),
            "a call carries exactly three descriptors: stdin, stdout, stderr",
        ),
        "four descriptors": (case(request(), "four"), "too many descriptors"),
        "a folder as stdin": (
            case(request(), "folder"),
            "stdio must be files, pipes, sockets or terminals",
        ),
    }
    answers = raw_requests(host, "work", [sent for sent, _ in cases.values()])
    expected = [[{"op": "refused", "message": message}] for _, message in cases.values()]
    assert dict(zip(cases, answers, strict=True)) == dict(zip(cases, expected, strict=True))
    # Still serving, and none of it ran anything.
    result = call(host, "work", "vault", "qnix.VMShell", "echo still here")
    assert (result.returncode, result.stdout) == (0, "still here\n")


def test_at_most_max_calls_at_once(host: LiveHost) -> None:
    """MAX_CALLS connections that say nothing hold every slot: the next is refused at once;
    once they close, calls are served again."""
    script = f"""
import json, socket, time
held = []
for _ in range({calls.MAX_CALLS}):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect("/run/qnix-call/call.sock")
    held.append(sock)
time.sleep(0.3)
extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
extra.settimeout(10)
extra.connect("/run/qnix-call/call.sock")
answer = extra.recv(4096)
for sock in held:
    sock.close()
print(json.dumps(json.loads(answer[4:])))
"""
    result = host.qnix("run", "work", "--", "python3", "-I", "-S", "-c", script)
    assert json.loads(result.stdout) == {"op": "refused", "message": "too many calls at once"}
    for _ in range(50):  # the held slots are given back as their connections close
        served = call(host, "work", "vault", "qnix.VMShell", "echo served")
        if served.returncode != calls.REFUSED:
            break
    assert (served.returncode, served.stdout) == (0, "served\n")


# ---- the socket itself ------------------------------------------------------------------------


def test_the_call_socket_cannot_be_replaced_from_inside(host: LiveHost) -> None:
    folder = call_dir(host.paths.run_dir("work"))
    links = names.allocate_links(["work", "other", "vault"], "10.213.0.0/16")
    gid = names.host_id(links["work"], "10.213.0.0/16")
    folder_info = os.lstat(folder)
    socket_info = os.lstat(folder / CALL_SOCKET_NAME)
    assert (folder_info.st_uid, stat.S_IMODE(folder_info.st_mode)) == (0, 0o755)
    assert stat.S_ISSOCK(socket_info.st_mode)
    assert (socket_info.st_uid, socket_info.st_gid, stat.S_IMODE(socket_info.st_mode)) == (
        0,
        gid,
        0o660,
    )
    attempts = r"""
import json, os, socket
sock = "/run/qnix-call/call.sock"
tries = {
    "unlink": lambda: os.unlink(sock),
    "rename": lambda: os.rename(sock, "/run/qnix-call/old"),
    "symlink": lambda: os.symlink("/run/qnix-agent/agent.sock", "/run/qnix-call/new"),
    "create": lambda: open("/run/qnix-call/new", "w"),
    "chmod": lambda: os.chmod(sock, 0o777),
    "rmdir": lambda: os.rmdir("/run/qnix-call"),
    "bind": lambda: socket.socket(socket.AF_UNIX).bind(sock),
    "umount": lambda: os.system("umount /run/qnix-call 2>/dev/null") and 1 / 0,
}
outcome = {}
for name, attempt in tries.items():
    try:
        attempt()
        outcome[name] = "done"
    except OSError as exc:
        outcome[name] = os.strerror(exc.errno)
    except ZeroDivisionError:
        outcome[name] = "refused"
print(json.dumps(outcome))
"""
    result = host.qnix("run", "work", "--", "python3", "-I", "-S", "-c", attempts)
    assert json.loads(result.stdout) == {
        "unlink": "Read-only file system",
        "rename": "Read-only file system",
        "symlink": "Read-only file system",
        "create": "Read-only file system",
        "chmod": "Read-only file system",
        "rmdir": "Device or resource busy",
        "bind": "Address already in use",
        "umount": "refused",
    }
    assert os.lstat(folder / CALL_SOCKET_NAME).st_ino == socket_info.st_ino
    result = call(host, "work", "vault", "qnix.VMShell", "echo unchanged")
    assert (result.returncode, result.stdout) == (0, "unchanged\n")


# ---- pure pieces ------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    target=st.one_of(st.text(max_size=80), st.integers(), st.none()),
    service=st.one_of(st.text(max_size=80), st.sampled_from(sorted(SERVICES))),
    argument=st.one_of(st.text(max_size=80), st.just("+ok")),
    extra=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=2),
)
def test_a_request_is_refused_or_fits_what_the_policy_accepts(
    target: object, service: object, argument: object, extra: dict[str, str]
) -> None:
    read, write = os.pipe()
    try:
        untrusted = {**extra, "op": "call", "target": target, "service": service}
        untrusted["argument"] = argument
        try:
            checked = calls.validate_request(untrusted, (read, write, write))
        except calls.CallRefused:
            return
        assert set(extra) <= calls.REQUEST_FIELDS
        assert REQUEST_SERVICE_RE.fullmatch(checked.service)
        assert checked.argument == "" or REQUEST_ARGUMENT_RE.fullmatch(checked.argument)
        assert calls.TARGET_RE.fullmatch(checked.target)
        assert not set(checked.target + checked.service + checked.argument) - set(
            "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.+-@:"
        )
    finally:
        os.close(read)
        os.close(write)


def test_every_service_runs_a_fixed_command() -> None:
    assert service_argv("qnix.Gpg", "/usr/bin/python3") == [
        "/usr/bin/python3",
        "-I",
        "-S",
        "/opt/qnix-agent/split.py",
        "gpg-server",
    ]
    assert service_argv("qnix.SshAgent", "/usr/bin/python3") == [
        "/usr/bin/python3",
        "-I",
        "-S",
        "/opt/qnix-agent/split.py",
        "ssh-agent-relay",
    ]
    assert service_argv("qnix.VMShell", "/usr/bin/python3") == ["/bin/sh"]
    assert service_argv("qnix.Nothing", "/usr/bin/python3") is None


def test_call_py_refuses_a_malformed_command_line_before_connecting() -> None:
    call_py = Path(calls.__file__).parent.parent / "inside" / "call.py"
    python = str(Path(QNIX).with_name("python"))
    usage = subprocess.run([python, "-I", "-S", str(call_py)], capture_output=True, text=True)
    assert usage.returncode == 2
    assert usage.stderr.startswith("usage: call.py TARGET SERVICE[+ARGUMENT]\n")
    for target, service, message in [
        ("../x", "qnix.Gpg", "qnix-call: '../x' is not a compartment name or @token\n"),
        ("vault", "qnix.Gpg+a b", "qnix-call: 'qnix.Gpg+a b' is not SERVICE[+ARGUMENT] "),
    ]:
        result = subprocess.run(
            [python, "-I", "-S", str(call_py), target, service], capture_output=True, text=True
        )
        assert result.returncode == calls.REFUSED
        assert result.stderr.startswith(message)


# ---- ask: a question the admin answers with qnix policy answer ---------------------------------


def waiting_question(host: LiveHost) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        waiting = json.loads(host.ok("policy", "asks", "--json"))
        if waiting:
            (question,) = waiting
            return dict(question)
        time.sleep(0.1)
    raise AssertionError("no question appeared")


@pytest.mark.parametrize("choice", ["vault", "no"])
def test_an_ask_waits_for_the_admins_answer(host: LiveHost, choice: str) -> None:
    file = f"marker-asked-{choice}"
    with subprocess.Popen(
        [QNIX, "run", "other", "--", *CALL, "vault", "qnix.VMShell"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=host.env,
    ) as caller:
        question = waiting_question(host)
        assert (question["source"], question["service"], question["targets"]) == (
            "other",
            "qnix.VMShell",
            ["vault"],
        )
        assert question["default"] == "vault"
        # Only an offered target (or no) is taken.
        refused = host.qnix("policy", "answer", str(question["id"]), "work")
        assert refused.returncode == 1
        assert f"'work' is not a target offered by question {question['id']}" in refused.stderr
        host.ok("policy", "answer", str(question["id"]), choice)
        out, err = caller.communicate(f"echo ran > ~/{file}; echo done\n", timeout=60)
    if choice == "vault":
        assert (caller.returncode, out, err) == (0, "done\n", "")
        assert marker(host, "vault", file).read_text() == "ran\n"
    else:
        assert (caller.returncode, out, err) == (calls.REFUSED, "", DENIED)
        assert not marker(host, "vault", file).exists()
    assert json.loads(host.ok("policy", "asks", "--json")) == []


def test_an_unanswered_ask_denies_after_the_timeout(host: LiveHost) -> None:
    started = time.monotonic()
    result = call(host, "other", "vault", "qnix.VMShell", "echo ran > ~/marker-unanswered\n")
    assert (result.returncode, result.stderr) == (calls.REFUSED, DENIED)
    assert time.monotonic() - started >= ASK_TIMEOUT
    assert not marker(host, "vault", "marker-unanswered").exists()
    assert json.loads(host.ok("policy", "asks", "--json")) == []
