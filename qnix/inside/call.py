"""Call a service of another compartment (Qubes' qrexec-client-vm). Standard library only.

    python3 -I -S /opt/qnix-agent/call.py TARGET SERVICE[+ARGUMENT]
    python3 -I -S /opt/qnix-agent/call.py --listen SOCKET TARGET SERVICE[+ARGUMENT]

The host provides a call socket in every compartment (CALL_SOCKET, in a read-only folder the
compartment cannot change). One call is one connection: a framed request (a 4-byte big-endian
length, then at most 64 KiB of JSON: the agent's framing) that carries this program's stdin,
stdout and stderr as file descriptors. The host decides under the live policy, with this
compartment as the source whatever the request says, and on allow runs the service's program
in the target with those descriptors as its stdio; it answers with the program's exit code,
which becomes ours. A refusal prints the host's short reason and exits with REFUSED (126).

`--listen SOCKET` serves a unix socket here instead: every connection becomes one call with
the connection as the program's stdin and stdout (socat UNIX-LISTEN:...,fork EXEC:... in
Qubes), e.g. an SSH_AUTH_SOCK whose keys live in another compartment.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import re
import signal
import socket
import stat
import struct
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

CALL_SOCKET = "/run/qnix-call/call.sock"
MAX_MESSAGE = 64 * 1024
HEADER = struct.Struct(">I")
REFUSED = 126  # as qrexec: the call was not allowed (or could not be made)
BROKEN = 125  # the host's answer never came or made no sense
# What the host accepts (qnix.policy.evaluate: REQUEST_SERVICE_RE, REQUEST_ARGUMENT_RE); checked
# here too only to fail early with a clear message, the host checks again.
SERVICE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
ARGUMENT_RE = re.compile(r"\+[A-Za-z0-9_.+-]{0,64}")
TARGET_RE = re.compile(
    r"@default|@dispvm|@dispvm:[a-z][a-z0-9-]{0,30}|@adminvm|[a-z][a-z0-9-]{0,30}"
)


class CallError(Exception):
    """The call could not be made, or the host's answer makes no sense."""


def split_service(text: str) -> tuple[str, str]:
    """`SERVICE+ARGUMENT` -> (SERVICE, +ARGUMENT); `SERVICE` -> (SERVICE, "")."""
    service, plus, argument = text.partition("+")
    argument = plus + argument
    if not SERVICE_RE.fullmatch(service) or (argument and not ARGUMENT_RE.fullmatch(argument)):
        raise CallError(
            f"{text[:80]!r} is not SERVICE[+ARGUMENT] (letters, digits, '_.-', at most 64 each)"
        )
    return service, argument


def _send(sock: socket.socket, message: dict[str, Any], fds: Sequence[int]) -> None:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE:
        raise CallError("request too large")
    data = HEADER.pack(len(body)) + body
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    sent = sock.sendmsg([data], ancillary)
    sock.sendall(data[sent:])


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        # Descriptors the host has no reason to send are refused by not asking for any.
        try:
            chunk = sock.recv(size - len(data))
        except OSError as exc:
            raise CallError(f"the call broke off: {exc.strerror}") from None
        if not chunk:
            raise CallError("the host closed the call")
        data += chunk
    return data


def _recv(sock: socket.socket) -> dict[str, Any]:
    (size,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
    if size > MAX_MESSAGE:
        raise CallError("oversized answer from the host")
    try:
        message = json.loads(_recv_exact(sock, size))
    except ValueError:
        raise CallError("the host's answer is not JSON") from None
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise CallError("the host's answer is not a message")
    return message


def _code(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 255:
        raise CallError(f"bad exit code from the host: {value!r}")
    return value


def call(
    target: str,
    service: str,
    argument: str = "",
    stdio: Sequence[int] = (0, 1, 2),
    socket_path: str = CALL_SOCKET,
) -> int:
    """Make one call with `stdio` as the service's stdin, stdout and stderr; its exit code.
    A refusal is written to stdio[2] and returns REFUSED."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(socket_path)
        except OSError as exc:
            raise CallError(f"cannot reach the call socket {socket_path}: {exc.strerror}") from None
        request = {"op": "call", "target": target, "service": service, "argument": argument}
        try:
            _send(sock, request, stdio)
        except OSError as exc:
            raise CallError(f"the call broke off: {exc.strerror}") from None
        while True:
            answer = _recv(sock)
            op = answer["op"]
            if op == "started":
                continue
            if op == "exited":
                return _code(answer.get("code"))
            if op in ("refused", "error"):
                message = str(answer.get("message", ""))[:512]
                # The message comes from the host, but keep terminal controls out all the same.
                shown = "".join(c if c.isprintable() else "?" for c in message)
                with contextlib.suppress(OSError):
                    os.write(stdio[2], f"qnix-call: {service} refused: {shown}\n".encode())
                return REFUSED
            raise CallError(f"unexpected answer from the host: {op[:40]!r}")


def _bind_listener(path: str) -> socket.socket:
    """A listening socket at `path` (0600). A stale socket there is replaced, anything else
    is left alone."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old_umask)
    listener.listen(16)
    return listener


def listen(path: str, target: str, service: str, argument: str) -> NoReturn:
    """Forever: each connection to `path` becomes one call with the connection as stdin and
    stdout (our stderr stays the service's stderr)."""
    listener = _bind_listener(path)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    while True:
        connection, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            code = REFUSED
            try:
                fd = connection.fileno()
                code = call(target, service, argument, (fd, fd, 2))
            except CallError as exc:
                with contextlib.suppress(OSError):
                    os.write(2, f"qnix-call: {exc}\n".encode())
            finally:
                connection.close()
            os._exit(code)
        connection.close()


USAGE = (
    "usage: call.py TARGET SERVICE[+ARGUMENT]\n"
    "       call.py --listen SOCKET TARGET SERVICE[+ARGUMENT]\n"
)


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    listen_path = None
    if args[:1] == ["--listen"]:
        if len(args) < 2:
            sys.stderr.write(USAGE)
            return 2
        listen_path = args[1]
        args = args[2:]
    if len(args) != 2:
        sys.stderr.write(USAGE)
        return 2
    target, requested = args
    try:
        if not TARGET_RE.fullmatch(target):
            raise CallError(f"{target[:40]!r} is not a compartment name or @token")
        service, argument = split_service(requested)
        if listen_path is not None:
            listen(listen_path, target, service, argument)
        return call(target, service, argument)
    except CallError as exc:
        sys.stderr.write(f"qnix-call: {exc}\n")
        return REFUSED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
