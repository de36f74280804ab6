"""The spawner: `apply` starts one resident process per run root that forks the keepers of new
disposables, so that `qnix dispose` without a preloaded one pays for no second interpreter and
no command line interface. Each test shows which path made the disposable (the keeper's
command line: a fork of the spawner, or a keeper of its own) and that nothing is left.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qnix.runtime import spawner
from tests.runtime.livehost import QNIX, LiveHost

SPEC = """\
default_disposable = "dvm"

[host]
hostname = "spawn"
subnet = "10.215.0.0/16"

[compartments.sys-net]
network = "uplink"
provides_network = true
memory_mb = 128
firewall = [{ cidr = "0.0.0.0/0" }]

[disposable_templates.dvm]
network = "sys-net"
memory_mb = 128

[disposable_templates.offline]
memory_mb = 128
"""


@pytest.fixture(scope="module")
def host() -> Iterator[LiveHost]:
    live = LiveHost()
    try:
        changes = live.ok("apply", str(live.spec(SPEC))).splitlines()
        assert "started the spawner (it forks the keepers of new disposables)" in changes
        yield live
    finally:
        live.close()


def keeper_command_line(host: LiveHost, name: str) -> list[str]:
    state = json.loads(host.paths.state_file(name).read_text())
    raw = Path(f"/proc/{state['keeper_pid']}/cmdline").read_bytes()
    return raw.decode().split("\0")[:-1]


def dispose_and_look(host: LiveHost, *options: str) -> tuple[str, list[str]]:
    """A disposable that waits on our stdin: its name and its keeper's command line."""
    with subprocess.Popen(
        [QNIX, "dispose", *options, "--", "sh", "-c", "hostname; read x"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=host.env,
    ) as waiting:
        assert waiting.stdin is not None and waiting.stdout is not None
        name = waiting.stdout.readline().strip()
        command_line = keeper_command_line(host, name)
        waiting.stdin.write("done\n")
        waiting.stdin.close()
        assert waiting.wait(timeout=60) == 0
    host.disposables_gone()
    return name, command_line


def test_a_disposable_without_preload_is_forked_by_the_spawner(host: LiveHost) -> None:
    assert spawner.running(host.paths)
    name, command_line = dispose_and_look(host)
    assert name == "disp1"
    assert "--spawner" in command_line  # a fork of the spawner, not an interpreter of its own
    # Its network, run folder and cgroup are gone with it.
    assert host.compartment_netns() == {"sys-net"}
    assert os.listdir(host.paths.compartments_run) == []
    assert host.cgroup_names() == set()
    # Another template, through the same spawner: no network at all.
    offline = host.ok("dispose", "--template", "offline", "--", "cat", "/proc/net/dev")
    assert "eth0" not in offline and "lo:" in offline
    host.disposables_gone()


def test_killing_dispose_ends_the_spawned_disposable(host: LiveHost) -> None:
    process = subprocess.Popen(
        [QNIX, "dispose", "--", "sh", "-c", "hostname; exec sleep 300"],
        stdout=subprocess.PIPE,
        text=True,
        env=host.env,
    )
    assert process.stdout is not None
    name = process.stdout.readline().strip()
    assert host.paths.netns_path(name).exists()  # control: it runs while its owner lives
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    host.disposables_gone()
    assert not host.paths.netns_path(name).exists()


def test_an_unknown_template_is_refused_as_without_the_spawner(host: LiveHost) -> None:
    result = host.qnix("dispose", "--template", "nosuch", "--", "true")
    assert result.returncode == 1
    assert "no disposable template 'nosuch'" in result.stderr
    assert "known: dvm, offline" in result.stderr


@pytest.mark.parametrize(
    "junk",
    [b"not json\n", b'{"op": "dispose", "template": "../x"}\n', b'{"op": "exec"}\n', b"\n"],
)
def test_a_malformed_request_is_dropped_and_the_spawner_goes_on(
    host: LiveHost, junk: bytes
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(str(host.paths.spawner_socket))
        client.sendall(junk)
        assert client.recv(64) == b""  # closed unanswered
    # Control: a well-formed request from the next `qnix dispose` is served by it.
    assert "--spawner" in dispose_and_look(host)[1]


def test_without_a_spawner_dispose_builds_its_own_and_gc_and_apply_put_it_back(
    host: LiveHost,
) -> None:
    record = json.loads(host.paths.spawner_record.read_text())
    os.kill(record["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while spawner.running(host.paths):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # Control: the same command works without it, with a keeper of its own.
    name, command_line = dispose_and_look(host)
    assert name == "disp1" and "--spawner" not in command_line
    assert "removed what a killed spawner left" in host.ok("gc").splitlines()
    assert not host.paths.spawner_socket.exists()
    assert (
        "started the spawner (it forks the keepers of new disposables)"
        in host.ok("apply", str(host.base / "spec.toml")).splitlines()
    )
    assert "--spawner" in dispose_and_look(host)[1]


def test_down_stops_the_spawner(host: LiveHost) -> None:
    down = host.ok("down").splitlines()
    assert down[0] == "stopped the spawner"
    assert not spawner.running(host.paths)
    assert not host.paths.run_root.exists()
