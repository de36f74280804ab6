"""The lifecycle end to end through the installed `qnix`, on a stand-in host (a network namespace
the test makes, temporary roots, a namespace prefix of its own): apply, ls, run, a second apply,
stop / start / restart, a compartment leaving the spec, gc after a killed keeper, down."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from qnix.compile import names
from qnix.runtime import cgroups
from tests.conftest import need
from tests.runtime.livehost import QNIX, LiveHost

SPEC = """\
default_disposable = "dvm"

[host]
hostname = "lab"
subnet = "10.203.0.0/16"

[compartments.sys-net]
network = "uplink"
provides_network = true
memory_mb = 128
firewall = [{ cidr = "0.0.0.0/0" }]

[compartments.work]
network = "sys-net"
autostart = true
memory_mb = 256
pids = 256
firewall = [{ proto = "tcp", cidr = "203.0.113.0/24", ports = [8001] }]

[compartments.office]
isolation = "container"
memory_mb = 128

[disposable_templates.dvm]
network = "sys-net"
memory_mb = 128
firewall = [{ proto = "tcp", cidr = "203.0.113.0/24", ports = [8001] }]

[disposable_templates.offline-dvm]
memory_mb = 128

[compartments.vault]
memory_mb = 128
"""
WITHOUT_VAULT = SPEC[: SPEC.index("[compartments.vault]")]


@pytest.fixture(scope="module")
def host() -> Iterator[LiveHost]:
    made = LiveHost()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(scope="module")
def first_apply(host: LiveHost) -> str:
    return host.ok("apply", str(host.spec(SPEC)))


def links() -> dict[str, names.Link]:
    return names.allocate_links(["sys-net", "work", "office", "vault"], "10.203.0.0/16")


def keeper_pid(host: LiveHost, name: str) -> int:
    state = json.loads(host.paths.state_file(name).read_text())
    pid = state["keeper_pid"]
    assert isinstance(pid, int)
    return pid


def test_apply_brings_the_host_up(host: LiveHost, first_apply: str) -> None:
    link = links()
    lines = first_apply.splitlines()
    assert lines[0].startswith("loaded nft table inet qnix (generation ")
    assert "enabled IPv4 forwarding on the host" in lines
    assert f"vault: network namespace {host.prefix}vault" in lines
    assert (
        f"work: link {names.host_ifname('work')} {link['work'].gateway} <-> "
        f"{link['work'].address}/31, routed through sys-net"
    ) in lines
    assert "sys-net: forwards and masquerades for its clients" in lines
    assert lines[-2:] == [
        "work: started",
        "started the spawner (it forks the keepers of new disposables)",
    ]
    assert host.compartment_netns() == {"sys-net", "work", "vault", "office"}
    assert host.net.list_links() == sorted(names.host_ifname(n) for n in ("sys-net", "work"))
    assert host.cgroup_names() == {f"{host.prefix}work"}


def test_ls_lists_every_compartment(host: LiveHost, first_apply: str) -> None:
    listed = host.ls()
    link = links()
    work = listed["work"]
    assert work["state"] == "running"
    assert isinstance(work["memory_used"], int)
    assert {k: v for k, v in work.items() if k not in ("memory_used", "pid")} == {
        "name": "work",
        "label": "red",
        "isolation": "namespace",
        "state": "running",
        "network": "sys-net",
        "address": link["work"].address,
        "gateway": link["work"].gateway,
        "memory_mb": 256,
        "persistence": "persistent",
        "autostart": True,
        "template": None,
    }
    assert work["pid"] == keeper_pid(host, "work")
    assert listed["vault"]["state"] == "stopped"
    assert listed["vault"]["address"] is None
    assert listed["vault"]["network"] == "none"
    table = host.ok("ls").splitlines()
    assert table[0].split() == [
        "NAME",
        "LABEL",
        "ISOLATION",
        "STATE",
        "NETWORK",
        "ADDRESS",
        "MEMORY",
    ]
    assert table[4].split()[:6] == [
        "work",
        "red",
        "namespace",
        "running",
        "sys-net",
        f"{link['work'].address}/31",
    ]


def test_run_passes_output_input_and_exit_code(host: LiveHost, first_apply: str) -> None:
    result = host.qnix("run", "work", "--", "sh", "-c", "echo hi; echo oops >&2; exit 7")
    assert (result.returncode, result.stdout, result.stderr) == (7, "hi\n", "oops\n")
    echoed = host.qnix("run", "work", "--", "sh", "-c", "tr a-z A-Z", input="secret\n")
    assert (echoed.returncode, echoed.stdout) == (0, "SECRET\n")
    inside = host.ok("run", "work", "--", "sh", "-c", "id -u; id -un; echo $HOME; pwd; hostname")
    assert inside.splitlines() == ["1000", "user", "/home/user", "/home/user", "work"]
    # Only the compartment's user exists inside.
    assert host.ok("run", "work", "--user", "user", "--", "id", "-un") == "user\n"
    refused = host.qnix("run", "work", "--user", "root", "--", "id")
    assert refused.returncode == 1
    assert "compartment work has one user, 'user'; there is no 'root' inside" in refused.stderr
    audit = [json.loads(line) for line in host.paths.audit_log.read_text().splitlines()]
    runs = [e for e in audit if e["event"] == "run"]
    assert runs[0]["compartment"] == "work"
    assert runs[0]["argv"] == ["sh", "-c", "echo hi; echo oops >&2; exit 7"]
    assert runs[0]["result"] == 7


def test_run_gives_a_terminal_when_there_is_one(host: LiveHost, first_apply: str) -> None:
    command = f"{QNIX} run work -- sh -c 'test -t 0 && test -t 1 && echo tty: $TERM'"
    # script's input stays open until the command is done: at its end script would type an
    # end-of-file character into the terminal, which the compartment's terminal echoes.
    with subprocess.Popen(
        [need("script"), "-qec", command, "/dev/null"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**host.env, "TERM": "xterm-qnix"},
    ) as script:
        assert script.stdout is not None
        output = script.stdout.read()
        assert script.wait(timeout=60) == 0
    assert output.replace("\r", "") == "tty: xterm-qnix\n"
    piped = host.qnix("run", "work", "--", "sh", "-c", "test -t 0 || echo no tty: ${TERM:-unset}")
    assert piped.stdout == "no tty: unset\n"


def test_the_home_persists_and_belongs_to_the_compartment(host: LiveHost, first_apply: str) -> None:
    host.ok("run", "work", "--", "sh", "-c", "echo kept > note")
    note = host.paths.home("work") / "note"
    assert note.read_text() == "kept\n"
    owner = host.paths.home("work").stat().st_uid
    assert note.stat().st_uid == owner
    assert owner >= 0x70000000


def test_second_apply_changes_nothing(host: LiveHost, first_apply: str) -> None:
    assert host.ok("apply", str(host.spec(SPEC))) == "no changes\n"


def test_stop_start_restart(host: LiveHost, first_apply: str) -> None:
    before = keeper_pid(host, "work")
    assert host.ok("stop", "work") == "work: stopped\n"
    assert host.ok("stop", "work") == "work: not running\n"
    assert host.ls()["work"]["state"] == "stopped"
    assert not host.paths.run_dir("work").exists()
    assert host.cgroup_names() == set()
    assert host.ok("start", "work") == "work: started\n"
    assert host.ok("start", "work") == "work: already running\n"
    started = keeper_pid(host, "work")
    assert started != before
    assert host.ok("restart", "work") == "work: restarted\n"
    assert keeper_pid(host, "work") != started
    assert host.ok("run", "work", "--", "cat", "note") == "kept\n"
    audit = [json.loads(line) for line in host.paths.audit_log.read_text().splitlines()]
    audit = [e for e in audit if e["event"] != "snapshot"]  # tests/runtime/test_state.py's
    assert [(e["event"], e["compartment"], e["result"]) for e in audit[-5:]] == [
        ("stop", "work", "ok"),
        ("start", "work", "ok"),
        ("stop", "work", "ok"),
        ("start", "work", "ok"),
        ("run", "work", 0),
    ]


def test_run_starts_a_stopped_compartment_first(host: LiveHost, first_apply: str) -> None:
    assert host.ls()["vault"]["state"] == "stopped"
    result = host.qnix("run", "vault", "--", "sh", "-c", "cat /proc/net/dev | tail -n +3")
    assert result.returncode == 0, result.stderr
    interfaces = [line.split(":")[0].strip() for line in result.stdout.splitlines()]
    assert interfaces == ["lo"]
    assert host.ls()["vault"]["state"] == "running"


def test_gc_removes_what_a_killed_keeper_left(host: LiveHost, first_apply: str) -> None:
    pid = keeper_pid(host, "vault")
    pidfd = os.pidfd_open(pid)
    try:
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while host.ls()["vault"]["state"] == "running":
            assert time.monotonic() < deadline, "the killed keeper still counts as running"
            time.sleep(0.05)
    finally:
        os.close(pidfd)
    assert host.ls()["vault"]["state"] == "crashed"
    assert f"{host.prefix}vault" in host.cgroup_names()
    # The sandbox died with its keeper (--die-with-parent): the cgroup holds nobody.
    deadline = time.monotonic() + 5
    vault_cgroup = cgroups.cgroup_of(f"{host.prefix}vault", cgroups.detect())
    while cgroups.processes(vault_cgroup):
        assert time.monotonic() < deadline, "the compartment outlived its keeper"
        time.sleep(0.05)
    assert host.ok("gc").splitlines() == [
        "vault: removed what its crashed run left (cgroup, run folder)"
    ]
    assert host.ok("gc") == "nothing to remove\n"
    assert host.ls()["vault"]["state"] == "stopped"
    assert host.cgroup_names() == {f"{host.prefix}work"}
    assert not host.paths.run_dir("vault").exists()
    assert host.compartment_netns() == {
        "sys-net",
        "work",
        "vault",
        "office",
    }  # the live generation's


def test_a_compartment_leaving_the_spec_is_stopped_and_removed(
    host: LiveHost, first_apply: str
) -> None:
    host.ok("start", "vault")
    changed = host.ok("apply", str(host.spec(WITHOUT_VAULT))).splitlines()
    assert changed[:2] == [
        "vault: stopped (no longer in the spec)",
        f"vault: removed its network namespace {host.prefix}vault",
    ]
    assert "vault" not in host.ls()
    assert host.compartment_netns() == {"sys-net", "work", "office"}
    assert host.cgroup_names() == {f"{host.prefix}work"}
    assert host.paths.home("vault").is_dir()  # state kept without --purge
    assert host.ls()["work"]["state"] == "running"  # the others keep running
    purged = host.ok("apply", "--purge", str(host.spec(SPEC)))
    assert "vault: network namespace" in purged
    removed = host.ok("apply", "--purge", str(host.spec(WITHOUT_VAULT))).splitlines()
    assert f"vault: purged its state {host.paths.state_dir('vault')}" in removed
    assert not host.paths.state_dir("vault").exists()


def test_errors_are_clear(host: LiveHost, first_apply: str) -> None:
    unknown = host.qnix("start", "nosuch")
    assert unknown.returncode == 1
    assert "error: no compartment 'nosuch' in the live generation" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    bad = host.qnix("run", "../x", "--", "true")
    assert bad.returncode == 1
    assert "error: no compartment '../x' in the live generation" in bad.stderr
    container = host.qnix("run", "office", "--", "true")  # started on demand, like any other
    assert (container.returncode, container.stderr) == (0, "")
    assert host.ls()["office"]["state"] == "running"
    host.ok("stop", "office")


def disposable_objects(host: LiveHost) -> dict[str, object]:
    """Everything a disposable called disp1 could leave on the stand-in host."""
    listing = host.net.table_listing() or ""
    return {
        "netns": host.paths.netns_path("disp1").exists(),
        "link": names.host_ifname("disp1") in host.net.list_links(),
        "elements": names.host_ifname("disp1") in listing,
        "cgroup": f"{host.prefix}disp1" in host.cgroup_names(),
        "run_dir": host.paths.run_dir("disp1").exists(),
    }


NOTHING_OF_DISP1 = {
    "netns": False,
    "link": False,
    "elements": False,
    "cgroup": False,
    "run_dir": False,
}


def test_dispose_runs_in_a_fresh_compartment_that_then_vanishes(
    host: LiveHost, first_apply: str
) -> None:
    script = "hostname; ls -A ~; echo scratch > ~/f; tail -n +3 /proc/net/dev | cut -d: -f1"
    result = host.qnix("dispose", "--", "sh", "-c", script + "; exit 5")
    assert result.returncode == 5, result.stderr
    assert [line.strip() for line in result.stdout.splitlines()] == ["disp1", "lo", "eth0"]
    host.disposables_gone()
    offline = host.qnix("dispose", "--template", "offline-dvm", "--", "sh", "-c", script)
    assert [line.strip() for line in offline.stdout.splitlines()] == ["disp1", "lo"]
    host.disposables_gone()
    assert disposable_objects(host) == NOTHING_OF_DISP1
    audit = [json.loads(line) for line in host.paths.audit_log.read_text().splitlines()]
    assert [(e["event"], e["compartment"], e["template"], e["result"]) for e in audit[-2:]] == [
        ("dispose", "disp1", "dvm", 5),
        ("dispose", "disp1", "offline-dvm", 0),
    ]
    unknown = host.qnix("dispose", "--template", "nosuch", "--", "true")
    assert unknown.returncode == 1
    assert "error: no disposable template 'nosuch'" in unknown.stderr


def test_a_running_disposable_is_listed_and_kept_by_apply(host: LiveHost, first_apply: str) -> None:
    waiting = subprocess.Popen(
        [QNIX, "dispose", "--", "sh", "-c", "echo up; read line"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=host.env,
    )
    assert waiting.stdin is not None and waiting.stdout is not None
    try:
        assert waiting.stdout.readline() == "up\n"
        listed = host.ls()["disp1"]
        assert (listed["state"], listed["template"], listed["persistence"]) == (
            "running",
            "dvm",
            "disposable",
        )
        assert disposable_objects(host) == dict.fromkeys(NOTHING_OF_DISP1, True)
        assert host.ok("apply", str(host.spec(WITHOUT_VAULT))) == "no changes\n"
        assert disposable_objects(host)["elements"] is True
        assert host.ok("run", "disp1", "--", "hostname") == "disp1\n"
        waiting.stdin.write("done\n")
        waiting.stdin.close()
        assert waiting.wait(timeout=30) == 0
    finally:
        waiting.kill()
        waiting.wait()
    host.disposables_gone()
    assert disposable_objects(host) == NOTHING_OF_DISP1
    assert "disp1" not in host.ls()


def test_a_killed_dispose_takes_its_disposable_along(host: LiveHost, first_apply: str) -> None:
    waiting = subprocess.Popen(
        [QNIX, "dispose", "--", "sh", "-c", "echo up; sleep 60"],
        stdout=subprocess.PIPE,
        text=True,
        env=host.env,
    )
    assert waiting.stdout is not None
    assert waiting.stdout.readline() == "up\n"
    waiting.kill()
    waiting.wait()
    deadline = time.monotonic() + 15
    while disposable_objects(host) != NOTHING_OF_DISP1:
        assert time.monotonic() < deadline, disposable_objects(host)
        time.sleep(0.05)


def test_gc_removes_what_a_crashed_disposable_left(host: LiveHost, first_apply: str) -> None:
    waiting = subprocess.Popen(
        [QNIX, "dispose", "--", "sh", "-c", "echo up; sleep 60"],
        stdout=subprocess.PIPE,
        text=True,
        env=host.env,
    )
    assert waiting.stdout is not None
    assert waiting.stdout.readline() == "up\n"
    keeper = keeper_pid(host, "disp1")
    # Freeze the keeper so that it cannot clean up, then kill both: a crash of the whole host
    # side, which leaves the disposable's network behind.
    os.kill(keeper, signal.SIGSTOP)
    waiting.kill()
    waiting.wait()
    os.kill(keeper, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while host.ls().get("disp1", {}).get("state") == "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert disposable_objects(host) == dict.fromkeys(NOTHING_OF_DISP1, True)
    removed = host.ok("gc").splitlines()
    assert removed == ["disp1: removed what its crashed run left (cgroup, run folder)"]
    assert disposable_objects(host) == NOTHING_OF_DISP1
    assert host.ok("gc") == "nothing to remove\n"


def test_down_leaves_nothing_but_the_state(host: LiveHost, first_apply: str) -> None:
    down = host.ok("down").splitlines()
    assert "work: stopped" in down
    assert f"removed {host.paths.run_root}" in down
    assert host.leftovers() == {
        "netns": [],
        "links": [],
        "rules": [],
        "table": None,
        "cgroups": [],
        "run_root": None,
    }
    assert host.net.sysctl(host.host_netns, "net.ipv4.ip_forward") == "0"
    assert (host.paths.home("work") / "note").read_text() == "kept\n"
    assert host.ok("ls", "--json") == "[]\n"
    assert host.ok("down") == "nothing to remove\n"
