"""Preloaded disposables (Qubes' preloaded disposables): `qnix dispose` takes one that waits
ready, a new one is started behind it, and a used one leaves nothing behind — also when the
`qnix dispose` holding it is SIGKILLed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from qnix.runtime import quickrun
from tests.runtime.livehost import QNIX, LiveHost

SPEC = """\
default_disposable = "dvm"

[host]
hostname = "pool"
subnet = "10.214.0.0/16"

[compartments.sys-net]
network = "uplink"
provides_network = true
memory_mb = 128
firewall = [{{ cidr = "0.0.0.0/0" }}]

[disposable_templates.dvm]
network = "sys-net"
memory_mb = 128
preload = {preload}

[policy]
rules = ["qnix.OpenInDisposable * sys-net @dispvm allow"]
"""
SETTLE_TIMEOUT = 60.0


@pytest.fixture
def host() -> Iterator[LiveHost]:
    live = LiveHost()
    try:
        yield live
    finally:
        live.close()


def apply(host: LiveHost, preload: int) -> str:
    return host.ok("apply", str(host.spec(SPEC.format(preload=preload))))


def waiting(host: LiveHost) -> list[str]:
    """The preloaded disposables that wait to be claimed, by `qnix ls`."""
    return sorted(name for name, entry in host.ls().items() if entry["state"] == "preloaded")


def settle(host: LiveHost, condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"not settled in {SETTLE_TIMEOUT} s: {what}"
        time.sleep(0.1)


def running_disposables(host: LiveHost) -> set[str]:
    return {name for name, entry in host.ls().items() if entry.get("template") is not None}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["dispose", "--", "true"], quickrun.DisposeRequest(("true",))),
        (
            ["dispose", "--template", "dvm", "--", "sh", "-c", "x"],
            quickrun.DisposeRequest(("sh", "-c", "x"), template="dvm"),
        ),
        (
            ["dispose", "-t=dvm", "--run-root", "/r", "--", "id", "--", "-u"],
            quickrun.DisposeRequest(("id", "--", "-u"), template="dvm", run_root="/r"),
        ),
        (["dispose", "--", ""], quickrun.DisposeRequest(("",))),
        (["dispose", "--"], None),  # no command
        (["dispose", "true"], None),  # no --
        (["dispose", "--debug", "--", "true"], None),  # the full CLI handles the rest
        (["dispose", "extra", "--", "true"], None),
        (["dispose", "--template", "--", "true"], None),  # '--' is the template's value
        (["dispose", "-t", "a", "-t", "b", "--", "true"], None),
        (["run", "work", "--", "true"], None),
    ],
)
def test_dispose_fast_path_parses_exactly_its_own_command_lines(
    argv: list[str], expected: quickrun.DisposeRequest | None
) -> None:
    assert quickrun.parse_dispose(argv) == expected


def test_apply_preloads_and_dispose_takes_one_then_a_new_one_waits(host: LiveHost) -> None:
    changes = apply(host, preload=2)
    assert "disp1: preloaded disposable of dvm" in changes
    assert "disp2: preloaded disposable of dvm" in changes
    before = waiting(host)
    assert before == ["disp1", "disp2"]
    assert apply(host, preload=2) == "no changes\n"

    used = host.qnix("dispose", "--", "sh", "-c", "hostname; echo out; echo err >&2; exit 7")
    assert used.returncode == 7
    taken, out = used.stdout.split()
    assert taken in before and out == "out" and used.stderr == "err\n"

    # The used one is removed behind the command, and a fresh one takes its place.
    settle(host, lambda: len(waiting(host)) == 2 and len(running_disposables(host)) == 2, "refill")
    assert host.compartment_netns() == {"sys-net", *waiting(host)}
    events = host.paths.audit_log.read_text()
    assert f'"compartment":"{taken}"' in events and '"event":"dispose"' in events


def test_each_claim_gets_a_sandbox_nobody_used(host: LiveHost) -> None:
    apply(host, preload=1)
    first = host.ok("dispose", "--", "sh", "-c", "touch ~/left-behind; hostname")
    settle(host, lambda: len(waiting(host)) == 1, "refill")
    second = host.ok("dispose", "--", "sh", "-c", "hostname; ls -A ~; ls /tmp")
    name, *listing = second.split()
    assert listing == [] and first.strip() in {name, *running_disposables(host), "disp1"}


def test_concurrent_disposes_never_share_a_disposable(host: LiveHost) -> None:
    apply(host, preload=3)
    assert len(waiting(host)) == 3

    def dispose(_: int) -> str:
        return host.ok("dispose", "--", "sh", "-c", "sleep 0.5; hostname").strip()

    with ThreadPoolExecutor(max_workers=3) as pool:
        names = list(pool.map(dispose, range(3)))
    assert len(set(names)) == 3


def test_sigkill_of_dispose_ends_its_preloaded_disposable(host: LiveHost) -> None:
    apply(host, preload=1)
    (claimed,) = waiting(host)
    process = subprocess.Popen(
        [QNIX, "dispose", "--", "sleep", "600"],
        env=host.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    settle(host, lambda: claimed not in waiting(host), "the claim")
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    # The keeper sees its claim connection close: the sandbox, its namespace, link, nft
    # elements, cgroup and run folder all go; the pool is topped up again by the next apply.
    settle(host, lambda: claimed not in running_disposables(host), "the end of the disposable")
    settle(host, lambda: claimed not in host.compartment_netns(), "its namespace removed")
    assert not (host.paths.run_root / "compartments" / claimed).exists()
    table = host.nft("list", "table", "inet", "qnix")
    assert all(name not in host.cgroup_names() for name in [host.prefix + claimed])
    assert table.count("d_qx") == 1  # only the template's chain; no element of the old one
    assert apply(host, preload=1).count("preloaded disposable of dvm") == 1


def test_dropping_preload_stops_the_waiting_ones_and_gc_removes_stray_claims(
    host: LiveHost,
) -> None:
    apply(host, preload=2)
    changes = apply(host, preload=0)
    assert "disp1: stopped (more preloaded dvm than wanted)" in changes
    assert waiting(host) == [] and host.compartment_netns() == {"sys-net"}

    apply(host, preload=1)
    (name,) = waiting(host)
    keeper = host.ls()[name]["pid"]
    assert isinstance(keeper, int)
    os.kill(keeper, signal.SIGKILL)  # a crash: the claim socket stays behind
    settle(host, lambda: name not in waiting(host), "the crashed keeper")
    stray = host.paths.run_root / "pool" / "dvm" / f"{name}.sock"
    assert stray.exists()
    # A dispose does not hang on the dead claim: it builds a fresh disposable instead.
    assert host.ok("dispose", "--", "echo", "cold") == "cold\n"
    assert f"removed the claim socket of {name}" in host.ok("gc")
    assert not stray.exists()


def test_open_in_dvm_takes_a_preloaded_disposable(host: LiveHost) -> None:
    apply(host, preload=1)
    (waiting_name,) = waiting(host)
    waiting_state = quickrun.read_state(host.paths, waiting_name)
    assert waiting_state is not None
    home = host.paths.home("sys-net")
    document = home / "doc.txt"
    document.write_text("draft")
    os.chown(document, home.stat().st_uid, home.stat().st_gid)
    opener = 'sh -c \'printf " read in $(hostname)" >> "$1"\' opener'
    result = host.qnix("open-in-dvm", "--with", opener, "sys-net", "doc.txt")
    assert result.returncode == 0, result.stderr
    assert document.read_text() == f"draft read in {waiting_name}"
    assert not quickrun.keeper_alive(waiting_state)  # gone with the command
    events = [json.loads(line) for line in host.paths.audit_log.read_text().splitlines()]
    opened = [e for e in events if e["event"] == "open-in-dvm"][-1]
    assert (opened["disposable"], opened["result"]) == (waiting_name, "ok")
    settle(host, lambda: len(waiting(host)) == 1, "refill")
