"""`qnix boot`: a reboot is a clean start. The office example is applied on a stand-in host,
its compartments used; then a power cut and a reboot are done by hand (never through qnix:
every process of this qnix killed with SIGKILL, its cgroups and namespaces gone, the host's
network namespace made anew — no links, rules or nft table, forwarding off — and the run root
removed), keeping the state root; `qnix boot` must then leave the host as a fresh apply does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qnix.compile import names
from qnix.compile.artifacts import compile_spec
from qnix.compile.inputs import load
from qnix.runtime import cgroups
from qnix.runtime.quickrun import read_state
from tests.conftest import EXAMPLES
from tests.runtime.livehost import QNIX, LiveHost

OFFICE = EXAMPLES / "smb-office.toml"
DEMO_KEY = EXAMPLES / "keys" / "demo-only.agekey"
NO_DRIFT = "no drift: the host matches the live generation\n"


class Office(LiveHost):
    """A stand-in host with the office example's secrets' key at hand."""

    TIMEOUT = 300.0

    def __init__(self) -> None:
        super().__init__(age_identity=DEMO_KEY)

    def states(self) -> dict[str, str]:
        return {row["name"]: row["state"] for row in json.loads(self.ok("ls", "--json"))}


@pytest.fixture
def office() -> Iterator[Office]:
    made = Office()
    try:
        yield made
    finally:
        made.close()


def power_cut_and_reboot(host: LiveHost) -> None:
    """What a power cut and a reboot do, done by hand: every process of this qnix instance
    (keepers, the spawner, whatever runs in its compartments) killed with SIGKILL, its
    cgroups and network namespaces gone, the host's network namespace new (no qx links, no
    routing rules, no nft table, forwarding off), the run root (a tmpfs) empty. The state
    root stays."""
    run_root = str(host.paths.run_root).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if run_root in argv:
            os.kill(int(entry), signal.SIGKILL)
    for name in host.cgroup_names():
        cgroup = cgroups.cgroup_of(name, cgroups.detect())
        cgroups.kill(cgroup)
        cgroups.remove(cgroup)
    for name in host.netns_names():  # the compartments' and the stand-in host's own
        subprocess.run([host.ip, "netns", "delete", name], check=True)
    subprocess.run([host.ip, "netns", "add", host.host_netns], check=True)
    subprocess.run([host.ip, "-n", host.host_netns, "link", "set", "lo", "up"], check=True)
    subprocess.run(["rm", "-rf", str(host.paths.run_root)], check=True)


def route_to(host: LiveHost, address: str) -> str:
    """Where the stand-in host would send a packet for `address`: `dev IFNAME`, or ip's
    refusal."""
    result = subprocess.run(
        [host.ip, "-n", host.host_netns, "-j", "route", "get", address],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return result.stderr.strip()
    return f"dev {json.loads(result.stdout)[0]['dev']}"


def count_events(host: LiveHost, event: str) -> int:
    lines = host.paths.audit_log.read_text().splitlines()
    return [json.loads(line)["event"] for line in lines].count(event)


# ---- the office example through a power cut -------------------------------------------------


def test_a_reboot_is_a_clean_start_equal_to_a_fresh_apply(office: Office) -> None:
    host, paths = office, office.paths
    office.ok("apply", str(OFFICE))
    office.ok("run", "work", "--", "sh", "-c", "echo kept > ~/report.txt; echo x > /tmp/scratch")
    office.ok("run", "sys-net", "--", "sh", "-c", "echo x > /tmp/scratch")
    fresh = "test -e /tmp/scratch && echo old || echo fresh"
    # The control: while they run, their writable layers keep what was written.
    assert office.ok("run", "work", "--", "sh", "-c", fresh) == "old\n"
    assert office.ok("run", "sys-net", "--", "sh", "-c", fresh) == "old\n"
    office.ok("start", "personal")
    # A disposable in use when the power goes (the preloaded one, refilled only after it).
    in_use = subprocess.Popen(
        [QNIX, "dispose", "--", "sleep", "600"],
        env=office.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while [s for n, s in office.states().items() if n.startswith("disp")] != ["running"]:
            assert time.monotonic() < deadline, office.states()
            time.sleep(0.2)
        power_cut_and_reboot(host)
    finally:
        in_use.kill()
        in_use.wait()
    assert not paths.run_root.exists() and host.leftovers()["table"] is None

    booted = office.ok("boot")
    assert any(line.startswith("booted generation ") for line in booted.splitlines()), booted

    # The host equals a fresh apply: no drift, and applying the spec again changes nothing.
    assert office.ok("drift") == NO_DRIFT
    assert office.ok("apply", str(OFFICE)).splitlines()[0] == "no changes"
    after = office.states()
    compartments = {n: s for n, s in after.items() if not n.startswith("disp")}
    assert compartments == {
        "banking": "stopped",
        "comms": "stopped",
        "personal": "stopped",  # started by hand before: not an autostart compartment
        "sys-firewall": "running",
        "sys-net": "running",
        "untrusted": "stopped",
        "vault": "stopped",
        "work": "running",
    }
    # The disposable in use is gone; the pool is refilled with one that waits.
    disposables = {n: s for n, s in after.items() if n.startswith("disp")}
    assert list(disposables.values()) == ["preloaded"]
    assert set(host.compartment_netns()) == {*compartments, *disposables}
    # Persistent homes are kept; root trees and writable layers are new.
    assert office.ok("run", "work", "--", "cat", "/home/user/report.txt") == "kept\n"
    assert office.ok("run", "work", "--", "sh", "-c", fresh) == "fresh\n"
    assert office.ok("run", "sys-net", "--", "sh", "-c", fresh) == "fresh\n"
    # The audit chain holds, with exactly one entry for the boot.
    assert office.qnix("audit", "verify").returncode == 0
    assert count_events(host, "boot") == 1
    last_boot = next(
        json.loads(line)
        for line in reversed(paths.audit_log.read_text().splitlines())
        if json.loads(line)["event"] == "boot"
    )
    assert last_boot["result"] == "ok"
    assert last_boot["running"] == sorted(["sys-net", "sys-firewall", "work", *disposables])


# ---- from the folder `qnix build` wrote (what the NixOS boot unit passes) ---------------------


def flake_folder(host: LiveHost, spec: Path) -> Path:
    """`qnix build SPEC -o DIR`, and what a flake folder holds besides the generation: a
    flake.lock and a git repository."""
    folder = host.base / "flake"
    host.ok("build", str(spec), "-o", str(folder))
    (folder / "flake.lock").write_text('{"nodes": {"root": {}}, "root": "root", "version": 7}\n')
    subprocess.run(["git", "init", "-q", str(folder)], check=True)
    return folder


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_boot_from_a_built_flake_folder_equals_a_fresh_apply(office: Office) -> None:
    host, paths = office, office.paths
    # Built away from the spec: the policy folder the spec names (policy.d beside it) is not
    # where the flake is; the flake holds its compiled copy.
    folder = flake_folder(host, OFFICE)
    built = compile_spec(load(OFFICE))
    assert not paths.installed_dir.exists()

    booted = office.ok("boot", "--generation", str(folder)).splitlines()
    assert booted[0] == f"installed generation {built.generation[:16]}"
    assert f"booted generation {built.generation[:16]}" in booted
    # Installed: the generation's files, not the lock file or the repository.
    assert files_under(paths.installed_dir) == sorted(built.files)
    assert all((paths.installed_dir / n).read_bytes() == d for n, d in built.files.items())

    assert office.ok("drift") == NO_DRIFT
    assert office.ok("apply", str(OFFICE)).splitlines()[0] == "no changes"
    running = {n for n, s in office.states().items() if s == "running"}
    assert running == {"sys-net", "sys-firewall", "work"}
    assert office.ok("run", "work", "--", "hostname") == "work\n"
    # The next reboot needs no folder: the installed copy brings the same generation up.
    power_cut_and_reboot(host)
    assert f"booted generation {built.generation[:16]}" in office.ok("boot").splitlines()
    assert office.ok("drift") == NO_DRIFT
    assert count_events(host, "boot") == 2


# ---- fail closed ------------------------------------------------------------------------------

SMALL = """\
[host]
hostname = "lab"
subnet = "10.209.0.0/16"

[compartments.web]
network = "uplink"
memory_mb = 128
autostart = true
firewall = [{ proto = "tcp", cidr = "0.0.0.0/0", ports = [443] }]
"""


@pytest.fixture
def host() -> Iterator[LiveHost]:
    made = LiveHost()
    try:
        yield made
    finally:
        made.close()


def test_until_boot_no_compartment_has_a_network(host: LiveHost) -> None:
    link = names.allocate_links(["web"], "10.209.0.0/16")["web"]
    host.net.set_sysctl(host.host_netns, "net.ipv4.ip_forward", "0")
    host.ok("apply", str(host.spec(SMALL)))
    # The control: applied, web's address is routed to its link, and forwarding is on.
    assert route_to(host, link.address) == f"dev {names.host_ifname('web')}"
    assert host.net.sysctl(host.host_netns, "net.ipv4.ip_forward") == "1"
    assert host.ok("run", "web", "--", "hostname") == "web\n"

    power_cut_and_reboot(host)
    # Before boot: no namespace, no route to web's address, no table, nothing forwarded, and
    # nothing starts (it would have no network).
    assert route_to(host, link.address) == "RTNETLINK answers: Network is unreachable"
    assert host.compartment_netns() == set()
    assert host.net.table_listing() is None
    assert host.net.sysctl(host.host_netns, "net.ipv4.ip_forward") == "0"
    refused = host.qnix("start", "web")
    assert (refused.returncode, refused.stderr) == (
        1,
        f"error: no live generation under {host.paths.run_root}\n"
        "  hint: bring the host up: qnix boot (the installed generation)\n",
    )
    assert host.compartment_netns() == set()

    # A damaged installed generation brings nothing up.
    ruleset = host.paths.installed_dir / "nftables" / "qnix.nft"
    whole = ruleset.read_bytes()
    ruleset.write_bytes(whole.replace(b"drop", b"accept"))
    damaged = host.qnix("boot")
    assert (damaged.returncode, damaged.stderr) == (
        1,
        f"error: the installed generation {host.paths.installed_dir} is damaged: "
        "nftables/qnix.nft differs from its hash in manifest.json\n"
        "  hint: nothing was brought up; bring the host to its spec again: qnix apply SPEC\n",
    )
    assert route_to(host, link.address) == "RTNETLINK answers: Network is unreachable"
    assert host.net.table_listing() is None
    assert host.net.sysctl(host.host_netns, "net.ipv4.ip_forward") == "0"
    ruleset.write_bytes(whole)

    # After boot, the same probes find web's link and forwarding on, and web runs.
    host.ok("boot")
    assert route_to(host, link.address) == f"dev {names.host_ifname('web')}"
    assert host.net.sysctl(host.host_netns, "net.ipv4.ip_forward") == "1"
    assert host.compartment_netns() == {"web"}
    assert host.ok("run", "web", "--", "hostname") == "web\n"
    assert host.ok("drift") == NO_DRIFT

    # On a host that was not rebooted, boot is a clean start all the same: web anew.
    keeper = read_state(host.paths, "web")
    host.ok("boot")
    again = read_state(host.paths, "web")
    assert keeper is not None and again is not None
    assert again["keeper_pid"] != keeper["keeper_pid"]
    assert host.ok("drift") == NO_DRIFT
    assert count_events(host, "boot") == 2  # the damaged one never started


def test_boot_with_nothing_applied_has_nothing_to_do(host: LiveHost) -> None:
    result = host.qnix("boot")
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        f"nothing to do: no generation is installed under {host.paths.installed_dir} "
        "(qnix apply SPEC installs one)\n",
        "",
    )
    assert not host.paths.run_root.exists()
    assert not host.paths.audit_log.exists()
    assert host.compartment_netns() == set()


def test_a_built_folder_with_a_file_changed_is_refused_whole(host: LiveHost) -> None:
    folder = flake_folder(host, host.spec(SMALL))
    ruleset = folder / "nftables" / "qnix.nft"
    whole = ruleset.read_bytes()
    hint = "  hint: nothing was brought up; build it again: qnix build SPEC -o DIR\n"

    ruleset.write_bytes(whole.replace(b"drop", b"accept"))
    changed = host.qnix("boot", "--generation", str(folder))
    assert (changed.returncode, changed.stdout, changed.stderr) == (
        1,
        "",
        f"error: the generation {folder} is damaged: "
        f"nftables/qnix.nft differs from its hash in manifest.json\n{hint}",
    )
    ruleset.unlink()
    missing = host.qnix("boot", "--generation", str(folder))
    assert (missing.returncode, missing.stderr) == (
        1,
        f"error: the generation {folder} is damaged: nftables/qnix.nft is missing\n{hint}",
    )
    # Nothing came up, and nothing was installed or recorded.
    assert host.compartment_netns() == set()
    assert host.net.table_listing() is None
    assert not host.paths.installed_dir.exists()
    assert not host.paths.run_root.exists()
    assert not host.paths.audit_log.exists()

    # The control: the same folder with the file as built boots.
    ruleset.write_bytes(whole)
    assert host.ok("boot", "--generation", str(folder)).startswith("installed generation ")
    assert host.compartment_netns() == {"web"}
    assert host.ok("run", "web", "--", "hostname") == "web\n"
    assert host.ok("drift") == NO_DRIFT
