"""20 disposables started at once are isolated from each other, and after they end the host's
namespaces, links, nft elements, mounts and files are exactly as before (compared by listing).

On a stand-in host (tests/runtime/test_lifecycle.py's `LiveHost`). The listings of network
namespaces and mounts keep what this test's tag names, plus every mount not of a network
namespace: namespaces that other tests on the same machine add or remove in the meantime
are theirs, not ours.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.runtime.livehost import QNIX, LiveHost

COUNT = 20
PORT = 8001
START_TIMEOUT = 60.0

SPEC = """\
default_disposable = "dvm"

[host]
hostname = "lab"
subnet = "10.205.0.0/16"

[compartments.sys-net]
network = "uplink"
provides_network = true
autostart = true
memory_mb = 128
firewall = [{ cidr = "0.0.0.0/0" }]

[disposable_templates.dvm]
network = "sys-net"
memory_mb = 128
firewall = [{ proto = "tcp", cidr = "10.205.0.0/16", ports = [8001] }]
"""

# Runs inside each disposable as `python3 -c PROBE TOKEN`: announce its address, wait for the
# test to say that all have started (a line on stdin with every address), then look for the
# others and report as one JSON line.
PROBE = textwrap.dedent(
    """
    import fcntl, json, os, socket, struct, sys, threading

    token = sys.argv[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as query:
        packed = fcntl.ioctl(query.fileno(), 0x8915, struct.pack("256s", b"eth0"))  # SIOCGIFADDR
    address = socket.inet_ntoa(packed[20:24])
    home = os.path.expanduser("~")
    with open(os.path.join(home, "marker-" + token), "w") as marker:
        marker.write(token)
    listener = socket.create_server(("0.0.0.0", PORT), backlog=64)
    threading.Thread(
        target=lambda: [listener.accept()[0].close() for _ in iter(int, 1)], daemon=True
    ).start()
    print(json.dumps({"token": token, "address": address}), flush=True)

    everyone = json.loads(sys.stdin.readline())

    def connect(target, results):
        try:
            with socket.create_connection((target, PORT), timeout=3):
                results[target] = "connected"
        except OSError as exc:
            results[target] = type(exc).__name__

    results = {}
    threads = [threading.Thread(target=connect, args=(a, results)) for a in everyone]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    tokens_seen = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    words = cmdline.read().decode().split("\\0")
            except OSError:
                continue
            tokens_seen |= {w for w in words if w.startswith("qnixmark")}
    print(json.dumps({
        "token": token,
        "address": address,
        "home": sorted(os.listdir(home)),
        "tokens_seen": sorted(tokens_seen),
        "connections": results,
    }), flush=True)
    """
).replace("PORT", str(PORT))


@pytest.fixture(scope="module")
def host() -> Iterator[LiveHost]:
    made = LiveHost()
    try:
        yield made
    finally:
        made.close()


def listings(host: LiveHost) -> dict[str, Any]:
    """What the host has, as listings to compare."""
    netns = subprocess.run(
        [host.ip, "netns", "list"], capture_output=True, text=True, check=True
    ).stdout
    links = json.loads(
        subprocess.run(
            [host.ip, "-n", host.host_netns, "-j", "link"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = line.split()[4]
        others_netns = mount_point.startswith("/run/netns/") and not mount_point.startswith(
            f"/run/netns/{host.tag}"
        )
        if not others_netns:
            mounts.append(line)
    files = {}
    for root in (host.paths.run_root, host.paths.state_root):
        for path in sorted(root.rglob("*")):
            info = path.lstat()
            files[str(path)] = (oct(info.st_mode), info.st_uid, info.st_gid)
    return {
        "netns": sorted(line.split()[0] for line in netns.splitlines() if host.tag in line),
        "links": sorted(link["ifname"] for link in links),
        "ruleset": json.loads(host.nft("-j", "list", "ruleset")),
        "mounts": mounts,
        "files": files,
        "cgroups": sorted(host.cgroup_names()),
    }


def start_disposables(host: LiveHost, tokens: list[str]) -> list[subprocess.Popen[str]]:
    return [
        subprocess.Popen(
            [QNIX, "dispose", "--", "python3", "-c", PROBE, token],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=(host.base / f"{token}.err").open("w"),
            text=True,
            env=host.env,
        )
        for token in tokens
    ]


def test_twenty_disposables_at_once_are_isolated_and_leave_nothing(host: LiveHost) -> None:
    host.ok("apply", str(host.spec(SPEC)))
    # One disposable first, so that the audit log exists before the listings are taken.
    assert host.ok("dispose", "--", "hostname") == "disp1\n"
    host.disposables_gone()
    before = listings(host)
    assert before["netns"] == sorted([host.host_netns, f"{host.prefix}sys-net"])

    tokens = [f"qnixmark{index:02d}" for index in range(COUNT)]
    processes = start_disposables(host, tokens)
    try:
        with ThreadPoolExecutor(COUNT) as pool:
            ready = [
                future.result(timeout=START_TIMEOUT)
                for future in [pool.submit(p.stdout.readline) for p in processes if p.stdout]
            ]
        announced = [json.loads(line) if line else {} for line in ready]
        errors = [(host.base / f"{t}.err").read_text() for t in tokens]
        assert [a.get("token") for a in announced] == tokens, errors
        addresses = [a["address"] for a in announced]
        assert len(set(addresses)) == COUNT
        # All are running at the same moment: each one's namespace and link exist.
        assert len(listings(host)["netns"]) == len(before["netns"]) + COUNT
        everyone = json.dumps(addresses) + "\n"
        for process in processes:
            assert process.stdin is not None
            process.stdin.write(everyone)
            process.stdin.close()
        with ThreadPoolExecutor(COUNT) as pool:
            outputs = [
                future.result(timeout=START_TIMEOUT)
                for future in [pool.submit(p.stdout.read) for p in processes if p.stdout]
            ]
        for process in processes:
            process.wait(timeout=START_TIMEOUT)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    errors = [(host.base / f"{t}.err").read_text() for t in tokens]
    assert [process.returncode for process in processes] == [0] * COUNT, errors
    reports = [json.loads(output) for output in outputs]
    for token, address, report in zip(tokens, addresses, reports, strict=True):
        assert report["token"] == token
        assert report["home"] == [f"marker-{token}"]  # no other disposable's marker
        assert report["tokens_seen"] == [token]  # its own process only
        connections = report["connections"]
        # Control: its own listener, at its own address, is reachable...
        assert connections.pop(address) == "connected"
        # ...every other disposable's is not.
        assert sorted(connections) == sorted(a for a in addresses if a != address)
        assert "connected" not in connections.values(), (token, connections)

    host.disposables_gone()
    after = listings(host)
    assert after == before
    assert os.listdir(host.paths.compartments_run) == ["sys-net"]
