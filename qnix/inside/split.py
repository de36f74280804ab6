"""Split GPG and split SSH (Qubes' split-gpg and qubes.SshAgent). Standard library only.

Keys stay in the vault compartment; other compartments ask it to use them, one call at a time,
under the policy (`qnix.Gpg`, `qnix.SshAgent`). Client side, in the compartment that wants a
signature:

    python3 /opt/qnix-agent/split.py gpg-client [--target VAULT] -- GPG-OPTIONS...
    python3 /opt/qnix-agent/call.py --listen ~/.ssh/agent.sock VAULT qnix.SshAgent

Server side, run in the vault by the broker (never by hand):

    split.py gpg-server        the request from stdin: a header, then the data
    split.py ssh-agent-relay   relays agent messages to the vault's ssh-agent

gpg: the client sends a header (4-byte big-endian length, then JSON {"args": [...],
"signature": base64 or absent}) followed by the data on the call's stdin; the vault reads the
header, checks the options against a strict allow-list (`parse_gpg_args`: signing, verifying,
encrypting, decrypting, listing and exporting public keys, with values that cannot name a
file or a descriptor other than stdout/stderr) and runs its own gpg with the rest of stdin as
input and the client's stdout and stderr as output. The options never go through the policy
argument, which is short and charset-limited.

ssh: the relay passes only "list identities" and "sign" requests to the vault's agent at
~/.ssh/agent.sock (start it there with `ssh-agent -a ~/.ssh/agent.sock`); anything else —
adding or removing keys, locking, extensions — is answered "failure" without reaching it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

MAX_HEADER = 64 * 1024
MAX_SIGNATURE = 32 * 1024
MAX_ARGS = 64
MAX_ARG_LENGTH = 256
HEADER_TIMEOUT = 30  # seconds the vault waits for a request's header
REFUSED = 2  # the exit code of a request the allow-list refuses (gpg's own for errors)
DEFAULT_TARGET_ENV = "QNIX_GPG_TARGET"

# ---- the gpg allow-list ----------------------------------------------------------------------

# Commands, by every spelling accepted, to one canonical name.
GPG_COMMANDS = {
    "--sign": "--sign",
    "--clearsign": "--clearsign",
    "--clear-sign": "--clearsign",
    "--detach-sign": "--detach-sign",
    "--encrypt": "--encrypt",
    "--decrypt": "--decrypt",
    "--verify": "--verify",
    "--list-keys": "--list-keys",
    "--list-public-keys": "--list-keys",
    "--list-secret-keys": "--list-secret-keys",
    "--export": "--export",
}
# The sets of commands a request may give (git signs with -bs: a detached signature).
COMMAND_SETS = {
    frozenset({"--sign"}),
    frozenset({"--clearsign"}),
    frozenset({"--detach-sign"}),
    frozenset({"--detach-sign", "--sign"}),
    frozenset({"--encrypt"}),
    frozenset({"--encrypt", "--sign"}),
    frozenset({"--decrypt"}),
    frozenset({"--verify"}),
    frozenset({"--list-keys"}),
    frozenset({"--list-secret-keys"}),
    frozenset({"--export"}),
}
# Options without a value. --batch and --no-tty are accepted and dropped: the vault always
# passes them itself.
GPG_FLAGS = frozenset(
    {
        "--armor",
        "--textmode",
        "--no-textmode",
        "--with-colons",
        "--with-fingerprint",
        "--fingerprint",
        "--quiet",
        "--verbose",
        "--batch",
        "--no-tty",
    }
)
DROPPED_FLAGS = frozenset({"--batch", "--no-tty"})
KEY_RE = re.compile(
    r"(0x)?[0-9A-Fa-f]{8,40}!?|<?[A-Za-z0-9._%+=-]{1,64}@[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})*>?"
)


def _choice(*values: str) -> re.Pattern[str]:
    return re.compile("|".join(re.escape(v) for v in values), re.IGNORECASE)


# Options with a value, and what the value may be.
GPG_VALUES: dict[str, re.Pattern[str]] = {
    "--local-user": KEY_RE,
    "--recipient": KEY_RE,
    "--hidden-recipient": KEY_RE,
    "--digest-algo": _choice("SHA224", "SHA256", "SHA384", "SHA512"),
    "--cipher-algo": _choice("AES128", "AES192", "AES256"),
    "--status-fd": _choice("1", "2"),  # stdout or stderr: never another descriptor
    "--keyid-format": _choice("none", "short", "0xshort", "long", "0xlong"),
    "--trust-model": _choice("pgp", "classic", "direct", "always", "auto"),
    "--output": _choice("-"),  # stdout only, never a file
}
REPEATABLE = frozenset({"--recipient", "--hidden-recipient"})
GPG_SHORT = {
    "a": "--armor",
    "t": "--textmode",
    "q": "--quiet",
    "v": "--verbose",
    "s": "--sign",
    "b": "--detach-sign",
    "e": "--encrypt",
    "d": "--decrypt",
    "k": "--list-keys",
    "K": "--list-secret-keys",
    "u": "--local-user",
    "r": "--recipient",
    "R": "--hidden-recipient",
    "o": "--output",
}
# Commands whose operands name keys (all others read stdin and take none).
KEY_OPERAND_COMMANDS = frozenset({"--list-keys", "--list-secret-keys", "--export"})


class GpgRefused(Exception):
    """An option, value or operand the allow-list does not take."""


@dataclass(frozen=True, slots=True)
class GpgRequest:
    """A checked gpg request: canonical options, commands, and key operands."""

    options: tuple[str, ...]  # flags and --option=value, in the order given
    commands: frozenset[str]
    operands: tuple[str, ...]  # key specifiers, or for the client's --verify: file names

    def argv(self) -> list[str]:
        """Options and commands for gpg; never a file name (operands are keys)."""
        return [*self.options, *sorted(self.commands), "--", *self.operands]


def _shown(text: str) -> str:
    return repr(text[:40]) + ("..." if len(text) > 40 else "")


def _expand_short(arg: str, rest: list[str]) -> list[tuple[str, str | None]]:
    """`-bsau KEY` -> [(--detach-sign, None), (--sign, None), (--armor, None),
    (--local-user, KEY)], as getopt reads a bundle of short options."""
    found: list[tuple[str, str | None]] = []
    letters = arg[1:]
    for index, letter in enumerate(letters):
        option = GPG_SHORT.get(letter)
        if option is None:
            raise GpgRefused(f"option -{letter} is not allowed")
        if option in GPG_VALUES:
            value = letters[index + 1 :]
            if not value:
                if not rest:
                    raise GpgRefused(f"option -{letter} needs a value")
                value = rest.pop(0)
            found.append((option, value))
            return found
        found.append((option, None))
    return found


def parse_gpg_args(untrusted_args: Sequence[object], *, files_allowed: bool) -> GpgRequest:
    """The allow-list. `files_allowed`: the client's own --verify SIG [DATA] (files it reads
    itself and sends); the vault never accepts a file name."""
    if not isinstance(untrusted_args, (list, tuple)) or len(untrusted_args) > MAX_ARGS:
        raise GpgRefused(f"at most {MAX_ARGS} arguments")
    rest: list[str] = []
    for arg in untrusted_args:
        if not isinstance(arg, str) or not 0 < len(arg) <= MAX_ARG_LENGTH or "\0" in arg:
            raise GpgRefused("arguments are non-empty strings of at most 256 characters")
        rest.append(arg)
    options: list[str] = []
    seen_values: set[str] = set()
    commands: set[str] = set()
    operands: list[str] = []
    while rest:
        arg = rest.pop(0)
        if arg == "--":
            operands += rest
            break
        if arg == "-" or not arg.startswith("-"):
            operands.append(arg)
            continue
        if arg.startswith("--"):
            name, equals, inline = arg.partition("=")
            pairs: list[tuple[str, str | None]]
            if name in GPG_VALUES:
                if not equals:
                    if not rest:
                        raise GpgRefused(f"option {name} needs a value")
                    inline = rest.pop(0)
                pairs = [(name, inline)]
            elif equals:
                raise GpgRefused(f"option {_shown(name)} takes no value or is not allowed")
            else:
                pairs = [(name, None)]
        else:
            pairs = _expand_short(arg, rest)
        for option, value in pairs:
            if option in GPG_COMMANDS:
                commands.add(GPG_COMMANDS[option])
            elif option in GPG_FLAGS:
                if option not in DROPPED_FLAGS:
                    options.append(option)
            elif option in GPG_VALUES and value is not None:
                if not GPG_VALUES[option].fullmatch(value):
                    raise GpgRefused(f"value {_shown(value)} is not allowed for {option}")
                if option in seen_values and option not in REPEATABLE:
                    raise GpgRefused(f"option {option} given twice")
                seen_values.add(option)
                options.append(f"{option}={value}")
            else:
                raise GpgRefused(f"option {_shown(option)} is not allowed")
    if frozenset(commands) not in COMMAND_SETS:
        wanted = " ".join(sorted(commands)) or "none"
        raise GpgRefused(f"commands {wanted} are not allowed together (or none was given)")
    if commands & KEY_OPERAND_COMMANDS:
        for operand in operands:
            if not KEY_RE.fullmatch(operand):
                raise GpgRefused(f"{_shown(operand)} is not a key id, fingerprint or address")
        if len(operands) > 16:
            raise GpgRefused("at most 16 keys")
    elif commands == {"--verify"} and files_allowed:
        if len(operands) > 2 or operands[:1] == ["-"]:
            raise GpgRefused("--verify takes SIGNATURE-FILE [DATA-FILE | -] or nothing")
    else:
        operands = [o for o in operands if o != "-"]  # stdin is the input anyway
        if operands:
            raise GpgRefused(f"{_shown(operands[0])}: the data comes on stdin, not in a file")
    return GpgRequest(tuple(options), frozenset(commands), tuple(operands))


# ---- gpg: the client ---------------------------------------------------------------------------


def _read_limited(path: str, limit: int) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise GpgRefused(f"{_shown(path)} is larger than {limit} bytes")
    return data


def gpg_client(args: Sequence[str]) -> int:
    """Send the request to the vault; its gpg writes straight to our stdout and stderr."""
    target = os.environ.get(DEFAULT_TARGET_ENV) or "@default"
    args = list(args)
    if args[:1] == ["--target"] and len(args) >= 2:
        target, args = args[1], args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    try:
        request = parse_gpg_args(args, files_allowed=True)
        header: dict[str, object] = {}
        data_fd = 0
        if request.commands == {"--verify"} and request.operands:
            signature = _read_limited(request.operands[0], MAX_SIGNATURE)
            header["signature"] = base64.b64encode(signature).decode()
            if len(request.operands) == 2 and request.operands[1] != "-":
                data_fd = os.open(request.operands[1], os.O_RDONLY | os.O_CLOEXEC)
            request = GpgRequest(request.options, request.commands, ())
        header["args"] = request.argv()
    except (GpgRefused, OSError) as exc:
        sys.stderr.write(f"qnix-gpg: {exc}\n")
        return REFUSED
    body = json.dumps(header, separators=(",", ":")).encode()
    call_py = str(Path(__file__).with_name("call.py"))
    process = subprocess.Popen(
        [sys.executable, "-I", "-S", call_py, target, "qnix.Gpg"], stdin=subprocess.PIPE
    )
    assert process.stdin is not None
    with contextlib.suppress(BrokenPipeError):  # refused, or gpg stopped reading
        process.stdin.write(len(body).to_bytes(4, "big") + body)
        while chunk := os.read(data_fd, 65536):
            process.stdin.write(chunk)
    with contextlib.suppress(BrokenPipeError):
        process.stdin.close()
    return process.wait()


# ---- gpg: the server (in the vault) ---------------------------------------------------------


def _read_exact(fd: int, size: int) -> bytes:
    """Exactly `size` bytes, and not one more: the rest of stdin is gpg's input."""
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise GpgRefused("the request ended before its header")
        data += chunk
    return data


def _on_alarm(number: int, frame: object) -> NoReturn:
    raise GpgRefused("no request header in time")


def read_gpg_header(fd: int = 0) -> tuple[GpgRequest, bytes | None]:
    """The request's header from `fd`, checked: what gpg is to do, and a detached signature."""
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(HEADER_TIMEOUT)
    try:
        size = int.from_bytes(_read_exact(fd, 4), "big")
        if size > MAX_HEADER:
            raise GpgRefused("request header too large")
        try:
            untrusted = json.loads(_read_exact(fd, size))
        except (ValueError, RecursionError):
            raise GpgRefused("request header is not JSON") from None
    finally:
        signal.alarm(0)
    if not isinstance(untrusted, dict) or set(untrusted) - {"args", "signature"}:
        raise GpgRefused("request header must be {args, signature}")
    request = parse_gpg_args(untrusted.get("args", []), files_allowed=False)
    untrusted_signature = untrusted.get("signature")
    if untrusted_signature is None:
        return request, None
    if request.commands != {"--verify"} or not isinstance(untrusted_signature, str):
        raise GpgRefused("a signature comes only with --verify")
    try:
        signature = base64.b64decode(untrusted_signature, validate=True)
    except binascii.Error:
        raise GpgRefused("signature is not base64") from None
    if len(signature) > MAX_SIGNATURE:
        raise GpgRefused("signature too large")
    return request, signature


GPG_BASE = ("gpg", "--batch", "--no-tty", "--no-auto-key-retrieve", "--no-auto-key-locate")


def gpg_server() -> int:
    try:
        request, signature = read_gpg_header(0)
    except GpgRefused as exc:
        sys.stderr.write(f"qnix-gpg (vault): refused: {exc}\n")
        return REFUSED
    argv = [*GPG_BASE, *request.argv()]
    if signature is None:
        try:
            os.execvp(argv[0], argv)  # stdin (after the header), stdout, stderr: the caller's
        except OSError as exc:
            sys.stderr.write(f"qnix-gpg (vault): cannot run gpg: {exc.strerror}\n")
            return 127
    folder = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    fd, path = tempfile.mkstemp(prefix="qnix-gpg-", suffix=".sig", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(signature)
        # The one file name gpg gets: the vault's own copy of the detached signature.
        verify = [*argv[: argv.index("--")], "--", path, "-"]
        return subprocess.run(verify, check=False).returncode
    finally:
        os.unlink(path)


# ---- ssh-agent relay (in the vault) ---------------------------------------------------------

AGENT_SOCKET = "~/.ssh/agent.sock"
MAX_AGENT_MESSAGE = 256 * 1024  # OpenSSH's own limit
SSH_AGENTC_REQUEST_IDENTITIES = 11
SSH_AGENTC_SIGN_REQUEST = 13
RELAYED_TYPES = frozenset({SSH_AGENTC_REQUEST_IDENTITIES, SSH_AGENTC_SIGN_REQUEST})
SSH_AGENT_FAILURE = b"\x00\x00\x00\x01\x05"


class RelayEnd(Exception):
    """One side closed, or sent something that is not an agent message."""


def _read_message(read: int | socket.socket) -> bytes | None:
    """One agent message (length and body) from a descriptor or the agent socket; None at a
    clean end before a message."""

    def exact(size: int) -> bytes:
        data = b""
        while len(data) < size:
            wanted = size - len(data)
            chunk = os.read(read, wanted) if isinstance(read, int) else read.recv(wanted)
            if not chunk:
                if not data and size == 4:
                    raise EOFError
                raise RelayEnd("closed mid-message")
            data += chunk
        return data

    try:
        length = exact(4)
    except EOFError:
        return None
    size = int.from_bytes(length, "big")
    if not 0 < size <= MAX_AGENT_MESSAGE:
        raise RelayEnd("bad message length")
    return length + exact(size)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def ssh_agent_relay(socket_path: str = AGENT_SOCKET) -> int:
    """Relay list and sign requests from stdin to the vault's agent, answers to stdout."""
    agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        agent.connect(os.path.expanduser(socket_path))
    except OSError as exc:
        sys.stderr.write(f"qnix-ssh (vault): no ssh-agent at {socket_path}: {exc.strerror}\n")
        return 1
    try:
        with agent:
            while (request := _read_message(0)) is not None:
                if request[4] not in RELAYED_TYPES:
                    _write_all(1, SSH_AGENT_FAILURE)
                    continue
                agent.sendall(request)
                answer = _read_message(agent)
                if answer is None:
                    raise RelayEnd("the agent closed")
                _write_all(1, answer)
    except (RelayEnd, OSError) as exc:
        sys.stderr.write(f"qnix-ssh (vault): {exc}\n")
        return 1
    return 0


# ---- entry ----------------------------------------------------------------------------------

USAGE = (
    "usage: split.py gpg-client [--target VAULT] -- GPG-OPTIONS...\n"
    "       split.py gpg-server | ssh-agent-relay   (run in the vault by the broker)\n"
)


def main(argv: Sequence[str]) -> int:
    if not argv:
        sys.stderr.write(USAGE)
        return 2
    mode, args = argv[0], argv[1:]
    if mode == "gpg-client":
        return gpg_client(args)
    if mode == "gpg-server" and not args:
        return gpg_server()
    if mode == "ssh-agent-relay" and not args:
        return ssh_agent_relay()
    sys.stderr.write(USAGE)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
