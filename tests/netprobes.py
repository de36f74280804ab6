"""Tiny programs the network tests run inside namespaces and compartments (`python3 -c`), and
the helper that starts a listener."""

from __future__ import annotations

import subprocess

# argv[1]: a JSON list of [host, port] or [source address, host, port]; prints one answer each:
# "ok <what the server said>", "timeout" or "error <errno>".
PROBE = r"""
import concurrent.futures, json, socket, sys
def probe(spec):
    source, host, port = spec if len(spec) == 3 else (None, *spec)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(1.0)
    try:
        if source:
            sock.bind((source, 0))
        sock.connect((host, port))
        return "ok " + sock.recv(64).decode()
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return f"error {exc.errno}"
    finally:
        sock.close()
specs = json.loads(sys.argv[1])
with concurrent.futures.ThreadPoolExecutor(len(specs)) as pool:
    print(json.dumps(list(pool.map(probe, specs))))
"""

# argv[1:]: "PORT" or "ADDRESS:PORT" to listen on; each connection is told the peer's address.
# Prints "ready" once listening and runs until its stdin closes.
SERVE = r"""
import socket, sys, threading
def serve(sock):
    while True:
        conn, (peer, _) = sock.accept()
        conn.sendall(peer.encode())
        conn.close()
for spec in sys.argv[1:]:
    address, _, port = spec.rpartition(":")
    sock = socket.create_server((address or "0.0.0.0", int(port)))
    threading.Thread(target=serve, args=(sock,), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


def server(command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """A listener started by `command`; it prints "ready" and runs until its stdin closes."""
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "ready\n"
    return process


def stop_servers(servers: list[subprocess.Popen[str]]) -> None:
    """End listeners `server()` started: their stdin closed, then killed and reaped."""
    for process in servers:
        if process.stdin is not None:
            process.stdin.close()
        process.kill()
        process.wait(timeout=10)
