"""VM compartments (`isolation = "vm"`) under the real QEMU, on a stand-in host.

QEMU runs with TCG here (QNIX_VM_ACCEL=tcg): the tests must not depend on nested KVM. The
guest kernel is the host's installed one (`make test` installs linux-image-amd64). The
"upstream" is a network namespace this module makes, with servers on two ports.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import select
import signal
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qnix.compile import names
from qnix.runtime import quickrun, vmlink
from qnix.runtime.backends import vm, vm_relay
from tests.conftest import need
from tests.isolation.test_host_boundary import killed_client, output_file_after_the_end
from tests.netprobes import PROBE, SERVE, server, stop_servers
from tests.runtime.livehost import LiveHost
from tests.runtime.test_secrets import (
    encrypt_to,
    files_holding,
    new_key,
    only_its_own,
    secret_sightings,
    sightings_of,
)

HOST_UPLINK, UPSTREAM = "203.0.113.8", "203.0.113.9"
SUBNET = "10.226.0.0/16"
ALLOWED, DENIED, PEER_PORT = 8101, 8102, 8103

SPEC = f"""\
[host]
hostname = "lab"
subnet = "{SUBNET}"

[compartments.box]
isolation = "vm"
autostart = true
memory_mb = 256
network = "uplink"
secrets = ["token"]
firewall = [
  {{ proto = "tcp", cidr = "{UPSTREAM}/32", ports = [{ALLOWED}] }},
  {{ proto = "tcp", cidr = "0.0.0.0/0", ports = [{PEER_PORT}] }},
]

[compartments.sealed]
isolation = "vm"
memory_mb = 192
secrets = ["spare"]

[compartments.peer]
network = "uplink"
autostart = true
memory_mb = 128

[disposable_templates.vmdvm]
isolation = "vm"
memory_mb = 192

[policy]
rules = [
  "qnix.VMShell * box peer allow",
  "qnix.VMShell * box @anyvm deny",
]

[secrets.token]
file = "secrets/token.age"
recipients = ["RECIPIENT"]

[secrets.spare]
file = "secrets/spare.age"
recipients = ["RECIPIENT"]
"""
WIDER = SPEC.replace(f"ports = [{ALLOWED}] }}", f"ports = [{ALLOWED}, {DENIED}] }}")


@dataclass
class Lab:
    host: LiveHost
    key: Path
    recipient: str
    token: str
    spare: str
    links: dict[str, names.Link]

    @property
    def env(self) -> dict[str, str]:
        return {**self.host.env, "QNIX_AGE_IDENTITY": str(self.key)}

    def qnix(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.host_qnix(), *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=180,
            check=False,
        )

    @staticmethod
    def host_qnix() -> str:
        return str(Path(sys.executable).with_name("qnix"))

    def ok(self, *args: str, input: str | None = None) -> str:
        result = self.qnix(*args, input=input)
        assert result.returncode == 0, f"qnix {' '.join(args)}: {result.stderr}"
        return result.stdout

    def apply(self, spec: str) -> str:
        return self.ok("apply", str(self.host.spec(spec.replace("RECIPIENT", self.recipient))))

    def probe(self, compartment: str, *targets: tuple[str, int]) -> list[str]:
        answers: list[str] = json.loads(
            self.ok("run", compartment, "--", "python3", "-c", PROBE, json.dumps(targets))
        )
        return answers

    def qemu_pid(self, name: str) -> int:
        state = quickrun.running_state(self.host.paths, name)
        assert state is not None, f"{name} is not running"
        return int(state["sandbox_pid"])


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    os.environ[vm.ACCEL_ENV] = "tcg"  # the keepers inherit it from `qnix apply`
    host = LiveHost()
    ip = host.ip
    upstream = f"{host.tag}up"
    servers: list[subprocess.Popen[str]] = []
    try:
        key, recipient = new_key(tmp_path_factory.mktemp("key"))
        token, spare = ("vm-secret-" + secrets.token_hex(16) for _ in range(2))
        encrypt_to(recipient, token.encode(), host.base / "secrets" / "token.age")
        encrypt_to(recipient, spare.encode(), host.base / "secrets" / "spare.age")
        subprocess.run([ip, "netns", "add", upstream], check=True)
        pair = ("type", "veth", "peer", "name", "eth0", "netns", upstream)
        for command in (
            ["-n", host.host_netns, "link", "add", "up0", *pair],
            ["-n", host.host_netns, "addr", "add", f"{HOST_UPLINK}/31", "dev", "up0"],
            ["-n", host.host_netns, "link", "set", "up0", "up"],
            ["-n", upstream, "addr", "add", f"{UPSTREAM}/31", "dev", "eth0"],
            ["-n", upstream, "link", "set", "eth0", "up"],
            ["-n", host.host_netns, "route", "add", "default", "via", UPSTREAM],
        ):
            subprocess.run([ip, *command], check=True)
        listeners = (f"0.0.0.0:{ALLOWED}", f"0.0.0.0:{DENIED}")
        servers.append(
            server([ip, "netns", "exec", upstream, sys.executable, "-c", SERVE, *listeners])
        )
        made = Lab(
            host,
            key,
            recipient,
            token,
            spare,
            names.allocate_links(["box", "sealed", "peer"], SUBNET),
        )
        made.apply(SPEC)
        in_peer = [Lab.host_qnix(), "run", "peer", "--", "python3", "-c", SERVE]
        servers.append(server([*in_peer, f"0.0.0.0:{PEER_PORT}"], env=made.env))
        yield made
    finally:
        stop_servers(servers)
        subprocess.run([ip, "netns", "delete", upstream], check=False)
        host.close()
        del os.environ[vm.ACCEL_ENV]


def test_a_command_runs_in_the_guest_with_stdio_exit_code_and_its_own_kernel(lab: Lab) -> None:
    script = "cat; id -un; hostname; echo to-stderr >&2; exit 3"
    result = lab.qnix("run", "box", "--", "sh", "-c", script, input="from-stdin\n")
    assert (result.returncode, result.stdout, result.stderr) == (
        3,
        "from-stdin\nuser\nbox\n",
        "to-stderr\n",
    )
    # Its own kernel, booted by qnix: the guest's command line and first process.
    inside = lab.ok("run", "box", "--", "sh", "-c", "cat /proc/cmdline; cat /proc/1/comm")
    assert "rdinit=/init" in inside and "rdinit=/init" not in Path("/proc/cmdline").read_text()
    assert inside.splitlines()[-1].startswith("python")
    # Only the guest's processes: none of the host's is there.
    count = lab.ok("run", "box", "--", "sh", "-c", "ls -d /proc/[0-9]* | wc -l")
    assert int(count) < 60
    # QEMU itself runs as the compartment's host uid.
    qemu = lab.qemu_pid("box")
    status = Path(f"/proc/{qemu}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert set(uids) == {str(0x70000000 + names.link_slot(lab.links["box"].gateway, SUBNET))}
    # The console says each stage of the guest's start, so a start that hangs shows where.
    console = (lab.host.paths.run_dir("box") / vm.CONSOLE_LOG).read_text().splitlines()
    stages = [line for line in console if line.startswith("qnix: ")]
    assert [stage.split(",")[0] for stage in stages] == [
        "qnix: init",
        "qnix: shares mounted",
        "qnix: set up",
        "qnix: said hello",
    ]


def test_the_secret_is_in_the_guest_only_and_never_on_disk(lab: Lab) -> None:
    """box lists token and sealed spare, of the two declared: each guest holds its own secret
    and nothing of the other's (each is the other's control: the same search finds its own)."""
    listed = lab.ok("run", "box", "--", "sh", "-c", "stat -c '%a %U' /run/secrets/token")
    assert listed == "400 user\n"
    assert lab.ok("run", "box", "--", "cat", "/run/secrets/token") == lab.token
    plaintexts = {"token": lab.token.encode(), "spare": lab.spare.encode()}
    in_box = secret_sightings(lab.ok, "box", "token", plaintexts)
    in_sealed = secret_sightings(lab.ok, "sealed", "spare", plaintexts)  # boots it
    assert sightings_of(in_box) == only_its_own(in_box, "token")
    assert sightings_of(in_sealed) == only_its_own(in_sealed, "spare")
    assert "/etc/resolv.conf" in in_box["scanned"]
    cached = {str(p) for p in (lab.host.paths.run_root / vm.BASE_CACHE_DIR).rglob("*.cpio")}
    assert cached  # the base initramfs every start reuses: scanned below with the rest
    for plaintext in plaintexts.values():
        found, scanned = files_holding(
            plaintext, [lab.host.paths.state_root, lab.host.paths.run_root, Path("/tmp")]
        )
        assert found == [] and cached <= scanned


def test_the_firewall_allows_one_port_and_not_the_other(lab: Lab) -> None:
    targets = ((UPSTREAM, ALLOWED), (UPSTREAM, DENIED))
    assert lab.probe("box", *targets) == [f"ok {HOST_UPLINK}", "timeout"]
    lab.apply(WIDER)  # control: the rule names the second port too
    try:
        assert lab.probe("box", *targets) == [f"ok {HOST_UPLINK}", f"ok {HOST_UPLINK}"]
    finally:
        lab.apply(SPEC)
    # Another compartment and the host stay out of reach, whatever port the rule allows.
    peer = lab.links["peer"].address
    assert lab.probe("peer", (peer, PEER_PORT)) == [f"ok {peer}"]  # control: the peer serves
    assert lab.probe("box", (peer, PEER_PORT), (lab.links["box"].gateway, PEER_PORT)) == [
        "timeout",
        "timeout",
    ]
    assert lab.ok("drift") == "no drift: the host matches the live generation\n"


def test_a_vm_without_network_has_only_loopback(lab: Lab) -> None:
    lab.ok("start", "sealed")
    try:
        listing = lab.ok("run", "sealed", "--", "cat", "/proc/net/dev")
        assert [line.split(":")[0].strip() for line in listing.splitlines()[2:]] == ["lo"]
    finally:
        lab.ok("stop", "sealed")


def test_the_home_persists_and_a_stop_leaves_nothing_running(lab: Lab) -> None:
    mark = secrets.token_hex(8)
    lab.ok("run", "box", "--", "sh", "-c", f"echo {mark} > ~/kept")
    home_file = lab.host.paths.home("box") / "kept"
    assert home_file.read_text() == f"{mark}\n"
    assert home_file.stat().st_uid == os.stat(lab.host.paths.home("box")).st_uid
    qemu = lab.qemu_pid("box")
    netns = lab.host.prefix + "box"
    lab.ok("stop", "box")
    assert not Path(f"/proc/{qemu}").exists()
    links = subprocess.run(
        [lab.host.ip, "-n", netns, "-o", "link"], capture_output=True, text=True, check=True
    ).stdout
    assert vm.TAP_IFNAME not in links
    qdiscs = subprocess.run(
        [lab.host.ip, "netns", "exec", netns, need("tc"), "qdisc", "show", "dev", "eth0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "ingress" not in qdiscs
    lab.ok("start", "box")
    assert lab.ok("run", "box", "--", "cat", "kept") == f"{mark}\n"
    assert lab.ok("drift") == "no drift: the host matches the live generation\n"


def test_a_disposable_vm_leaves_nothing(lab: Lab) -> None:
    before = lab.host.compartment_netns()
    out = lab.ok("dispose", "--template", "vmdvm", "--", "sh", "-c", "hostname; ls -A ~")
    assert out.startswith("disp") and len(out.split()) == 1
    lab.host.disposables_gone(timeout=60)
    assert lab.host.compartment_netns() == before
    assert not [n for n in lab.host.ls() if n.startswith("disp")]


def test_a_killed_keeper_takes_its_vm_with_it(lab: Lab) -> None:
    state = quickrun.running_state(lab.host.paths, "box")
    assert state is not None
    qemu = int(state["sandbox_pid"])
    os.kill(int(state["keeper_pid"]), signal.SIGKILL)
    deadline = time.monotonic() + 20
    while Path(f"/proc/{qemu}").exists():
        assert time.monotonic() < deadline, "QEMU outlived its keeper"
        time.sleep(0.1)
    assert "box: " in lab.ok("gc")
    lab.ok("start", "box")
    assert lab.ok("run", "box", "--", "true") == ""


def test_a_command_on_a_terminal_gets_the_guests_own(lab: Lab) -> None:
    """`qnix run` on a terminal: a terminal in the guest of our size, that follows resizes and
    turns ^C into SIGINT there."""
    master, slave = os.openpty()
    termios.tcsetwinsize(slave, (33, 99))
    output = b""

    def run(*command: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [Lab.host_qnix(), "run", "box", "--", *command],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env={**lab.env, "TERM": "xterm-qnix"},
        )

    def read_until(text: bytes) -> bytes:
        nonlocal output
        deadline = time.monotonic() + 60
        while text not in output:
            assert time.monotonic() < deadline, f"no {text!r} in {output!r}"
            if select.select([master], [], [], 1)[0]:
                output += os.read(master, 4096)
        return output.replace(b"\r", b"")

    try:
        process = run("sh", "-c", "stty size; tty; read line; stty size; exit 3")
        shown = read_until(b"/dev/pts/")
        assert b"33 99\n/dev/pts/" in shown
        termios.tcsetwinsize(slave, (40, 120))
        process.send_signal(signal.SIGWINCH)  # what the terminal's driver would send us
        time.sleep(1)
        os.write(master, b"go\n")
        assert process.wait(timeout=60) == 3
        assert b"40 120" in read_until(b"40 120")
        process = run("sh", "-c", "echo ready; exec sleep 60")
        read_until(b"ready")
        os.write(master, b"\x03")
        assert process.wait(timeout=60) == 130
    finally:
        os.close(master)
        os.close(slave)


def relay_rss(lab: Lab, name: str) -> int:
    """Resident bytes of the relay of VM compartment `name`."""
    run_dir = str(lab.host.paths.run_dir(name)).encode()
    for entry in os.listdir("/proc"):
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            status = Path(f"/proc/{entry}/status").read_text()
        except (OSError, NotADirectoryError):
            continue
        if vm_relay.__name__.encode() in argv and any(a.startswith(run_dir) for a in argv):
            line = next(row for row in status.splitlines() if row.startswith("VmRSS:"))
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no relay of {name}")


def test_a_reader_that_does_not_read_holds_up_its_own_command_only(lab: Lab) -> None:
    """One command's output that nobody reads waits in a bounded window; the other commands of
    the same VM go on, and once read, not a byte of it is lost."""
    size = 16 << 20
    before = relay_rss(lab, "box")
    stalled = subprocess.Popen(
        [Lab.host_qnix(), "run", "box", "--", "head", "-c", str(size), "/dev/zero"],
        stdout=subprocess.PIPE,
        env=lab.env,
    )
    assert stalled.stdout is not None
    try:
        # Filled: the pipe we do not read (the relay writes it as the client's own stdout).
        capacity = fcntl.fcntl(stalled.stdout, fcntl.F_GETPIPE_SZ)
        deadline = time.monotonic() + 60
        while (
            int.from_bytes(fcntl.ioctl(stalled.stdout, termios.FIONREAD, b"\0" * 4), "little")
            < capacity
        ):
            assert time.monotonic() < deadline, "the stalled command's output never filled its pipe"
            time.sleep(0.1)
        for number in range(3):
            assert (
                lab.ok("run", "box", "--", "echo", f"meanwhile {number}") == f"meanwhile {number}\n"
            )
        sent = lab.qnix("run", "box", "--", "wc", "-c", input="x" * (2 << 20))
        assert (sent.returncode, sent.stdout.strip()) == (0, str(2 << 20))
        # What waits on the host is at most the window (the guest holds the rest back).
        assert relay_rss(lab, "box") - before < 4 * vmlink.WINDOW
        assert len(stalled.stdout.read()) == size
        assert stalled.wait(timeout=60) == 0
    finally:
        stalled.kill()
        stalled.wait()
        stalled.stdout.close()


def test_commands_at_once_each_get_their_own_bytes_back(lab: Lab) -> None:
    """Several commands stream both ways at once over the one port: each channel's frames
    reach their own command and client, in order, every byte."""
    inputs = [os.urandom(1 << 20) for _ in range(6)]
    commands = [
        subprocess.Popen(
            [Lab.host_qnix(), "run", "box", "--", "cat"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=lab.env,
        )
        for _ in inputs
    ]
    results: list[bytes | None] = [None] * len(inputs)

    def talk(number: int) -> None:
        results[number] = commands[number].communicate(inputs[number], timeout=120)[0]

    talkers = [threading.Thread(target=talk, args=(n,)) for n in range(len(inputs))]
    for talker in talkers:
        talker.start()
    for talker in talkers:
        talker.join()
    assert [c.returncode for c in commands] == [0] * len(inputs)
    assert [r == i for r, i in zip(results, inputs, strict=True)] == [True] * len(inputs)


CALL = ["python3", "-I", "-S", "/opt/qnix-agent/call.py"]


def test_a_call_from_inside_a_vm_is_decided_and_served_on_the_host(lab: Lab) -> None:
    script = 'echo "in $(hostname) for $QNIX_REMOTE_DOMAIN"\necho to-stderr >&2\nexit 4\n'
    result = lab.qnix("run", "box", "--", *CALL, "peer", "qnix.VMShell", input=script)
    assert (result.returncode, result.stdout, result.stderr) == (
        4,
        "in peer for box\n",
        "to-stderr\n",
    ), result
    # More than a window each way: the call's stdin in, its output out.
    script = ("#" + "z" * 1000 + "\n") * 3000 + "echo read all of it\n"
    big = lab.qnix("run", "box", "--", *CALL, "peer", "qnix.VMShell", input=script)
    assert (big.returncode, big.stdout, big.stderr) == (0, "read all of it\n", "")
    big = lab.qnix(
        "run", "box", "--", *CALL, "peer", "qnix.VMShell", input="head -c 3000000 /dev/zero\n"
    )
    assert (big.returncode, len(big.stdout), big.stderr) == (0, 3000000, "")
    denied = lab.qnix("run", "box", "--", *CALL, "sealed", "qnix.VMShell", input="echo ran\n")
    assert (denied.returncode, denied.stdout, denied.stderr) == (
        126,
        "",
        "qnix-call: qnix.VMShell refused: denied by policy\n",
    )
    events = [json.loads(line) for line in lab.host.paths.audit_log.read_text().splitlines()]
    made = [e for e in events if e["event"] == "call"][-2:]
    assert [(e["source"], e["target"], e["decision"]) for e in made] == [
        ("box", "peer", "allow"),
        ("box", "sealed", "deny"),
    ]


def test_the_shares_lead_nowhere_else_on_the_host(lab: Lab) -> None:
    """9p shares: links in the home lead into the guest's own tree, never to the host's, and
    /usr is read-only. Control: on the host the same links do reach the marker."""
    home = lab.host.paths.home("box")
    marker = home.parent / "outside-marker"
    marker.write_text("host only\n")
    owner = (home.stat().st_uid, home.stat().st_gid)
    try:
        for name, target in (("up", ".."), ("absolute", str(marker))):
            os.symlink(target, home / name)
            os.lchown(home / name, *owner)
        assert (home / "up" / "outside-marker").read_text() == "host only\n"  # the control
        assert (home / "absolute").read_text() == "host only\n"
        script = (
            "cat ~/up/outside-marker ~/absolute 2>/dev/null; echo cat=$?; "
            "touch /usr/qnix-was-here 2>/dev/null; echo touch=$?; ls ~/up"
        )
        shown = lab.ok("run", "box", "--", "sh", "-c", script)
        assert shown == "cat=1\ntouch=1\nuser\n"  # ~/up is the guest's /home
        assert not Path("/usr/qnix-was-here").exists()
    finally:
        for name in ("up", "absolute"):
            (home / name).unlink(missing_ok=True)
        marker.unlink()


def test_a_command_cannot_touch_our_output_file_after_it_ends(lab: Lab, tmp_path: Path) -> None:
    """The relay writes into pipes of `qnix run`'s, which it closes at the command's end; what
    the command leaves running in the guest writes to nobody (control: in the test itself, the
    output that came before the end arrived)."""
    output_file_after_the_end(lab.host, "box", tmp_path / "late.txt")


def test_a_command_ends_when_its_client_is_killed(lab: Lab) -> None:
    killed_client(lab.host, "box")
