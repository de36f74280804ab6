"""The probes `qnix selftest` runs inside a compartment, as its own user.

Standard library only: the host passes this file's text to the compartment's own
`python3 -I -S -c`, with one of three modes as arguments; each prints one JSON line.

* `status`: what the process sees of itself and its compartment: /proc/self/status's
  capabilities, NoNewPrivs and Seccomp, its user's name, its pid namespace, whether /usr is
  mounted read-only, the names under /run/secrets, its network interfaces.
* `listen SECONDS ADDRESS PROTO:PORT...`: bind each port on the compartment's address, print
  `{"ready": [...]}`, answer what comes (a TCP connection is accepted and closed, a UDP
  datagram echoed) until stdin ends or SECONDS pass; nothing is left behind.
* `connect ADDRESS PROTO PORT TIMEOUT`: `{"result": "open"}` if the listener answered, else
  `closed` with the reason.
"""

import json
import os
import select
import socket
import sys
import time

STATUS_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")
SECRETS_DIR = "/run/secrets"


def status() -> dict[str, object]:
    fields: dict[str, str] = {}
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in STATUS_FIELDS:
                fields[key] = value.strip()
    try:
        import pwd

        user = pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        user = str(os.getuid())
    try:
        secret_names = sorted(os.listdir(SECRETS_DIR))
    except FileNotFoundError:
        secret_names = []
    return {
        "status": fields,
        "uid": os.getuid(),
        "user": user,
        "pid_ns": os.readlink("/proc/self/ns/pid"),
        "usr_read_only": bool(os.statvfs("/usr").f_flag & os.ST_RDONLY),
        "secrets": secret_names,
        "interfaces": sorted(name for _, name in socket.if_nameindex()),
    }


def listen(seconds: float, address: str, wanted: list[str]) -> dict[str, object]:
    sockets: list[tuple[str, socket.socket]] = []
    for item in wanted:
        proto, _, port = item.partition(":")
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        sock = socket.socket(socket.AF_INET, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, int(port)))
        if proto == "tcp":
            sock.listen(16)
        sockets.append((proto, sock))
    print(json.dumps({"ready": list(wanted)}), flush=True)
    deadline = time.monotonic() + seconds
    stdin = sys.stdin.fileno()
    by_fd = {sock.fileno(): (proto, sock) for proto, sock in sockets}
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stdin, *by_fd], [], [], deadline - time.monotonic())
        if stdin in ready and not os.read(stdin, 4096):
            break
        for fd in ready:
            if fd == stdin:
                continue
            proto, sock = by_fd[fd]
            if proto == "tcp":
                conn, _ = sock.accept()
                conn.close()
            else:
                data, peer = sock.recvfrom(512)
                sock.sendto(data, peer)
    for _, sock in sockets:
        sock.close()
    return {"done": True}


def connect(address: str, proto: str, port: int, timeout: float) -> dict[str, object]:
    try:
        if proto == "tcp":
            socket.create_connection((address, port), timeout=timeout).close()
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.settimeout(timeout)
            sock.sendto(b"qnix-selftest", (address, port))
            sock.recvfrom(512)
            sock.close()
    except OSError as exc:
        return {"result": "closed", "reason": type(exc).__name__}
    return {"result": "open"}


def main(argv: list[str]) -> None:
    if argv[0] == "status":
        answer = status()
    elif argv[0] == "listen":
        answer = listen(float(argv[1]), argv[2], argv[3:])
    else:
        answer = connect(argv[1], argv[2], int(argv[3]), float(argv[4]))
    print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
