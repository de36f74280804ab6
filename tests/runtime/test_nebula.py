"""Nebula per compartment, with the real nebula and nebula-cert.

The certificate authority and the certificates first (no namespace): the exact commands, and
what the real nebula-cert made of them. Then live, on a stand-in host: `office` is a network
namespace this module makes, reached from the stand-in host by a veth, running the server's
Nebula configuration that `qnix build` writes (the lighthouse, admitting group `work` to one
port and group `staff` to another) with TCP servers on its overlay address. `qnix apply` starts
`work` (groups work, staff) and `personal` (group staff); each one's keeper runs nebula in the
compartment's own network namespace. `work` reaches the admitted port, `personal` does not,
and the control shows the server answers `personal` on the port its group is admitted to.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qnix.compile.artifacts import compile_spec
from qnix.compile.inputs import load
from qnix.compile.overlay import compartment_config_file, server_config_file
from qnix.errors import QnixError
from qnix.runtime import nebula
from qnix.runtime.paths import RuntimePaths
from qnix.spec.load import LoadedSpec
from qnix.spec.model import Workstation
from tests.netprobes import PROBE, SERVE, server, stop_servers
from tests.runtime.livehost import LiveHost

HOST_UPLINK, OFFICE = "203.0.113.0", "203.0.113.1"
SUBNET = "10.205.0.0/16"
SERVER, WORK, PERSONAL = "10.42.0.1", "10.42.0.11", "10.42.0.12"
SHARE, WEB = 8445, 8443  # work's group is admitted to SHARE, staff to WEB

SPEC = f"""\
[host]
hostname = "desk"
subnet = "{SUBNET}"

[overlay]
subnet = "10.42.0.0/24"
ca_cert = "CA/ca.crt"
ca_key = "CA/ca.key"

[overlay.servers.office]
address = "{SERVER}"
host = "{OFFICE}"
lighthouse = true
admit = [
  {{ groups = ["work"], proto = "tcp", ports = [{SHARE}] }},
  {{ groups = ["staff"], proto = "tcp", ports = [{WEB}] }},
]

[compartments.work]
network = "uplink"
autostart = true
memory_mb = 256
firewall = [{{ proto = "udp", cidr = "{OFFICE}/32", ports = [4242] }}]
overlay = {{ address = "{WORK}", groups = ["work", "staff"] }}

[compartments.personal]
network = "uplink"
autostart = true
memory_mb = 256
firewall = [{{ proto = "udp", cidr = "{OFFICE}/32", ports = [4242] }}]
overlay = {{ address = "{PERSONAL}", groups = ["staff"] }}
"""


def _spec(folder: Path) -> Path:
    path = folder / "spec.toml"
    path.write_text(SPEC.replace("CA/", f"{folder}/ca/"))
    return path


def _make_ca(folder: Path) -> Path:
    """A CA of the office's, made by the real nebula-cert."""
    ca = folder / "ca"
    ca.mkdir(mode=0o700)
    tool = shutil.which("nebula-cert")
    assert tool is not None, "nebula-cert is not installed (apt-get install nebula)"
    subprocess.run(
        [tool, "ca", "-name", "office", "-out-crt", "ca.crt", "-out-key", "ca.key"],
        cwd=ca, check=True, capture_output=True,
    )  # fmt: skip
    return ca


def _printed(cert: Path) -> dict[str, object]:
    tool = shutil.which("nebula-cert")
    assert tool is not None
    shown = subprocess.run(
        [tool, "print", "-json", "-path", str(cert)], capture_output=True, text=True, check=True
    )
    details: dict[str, object] = json.loads(shown.stdout)["details"]
    return details


# ---- certificates, no namespace --------------------------------------------------------------


def _workstation(text: str) -> Workstation:
    return Workstation.model_validate(tomllib.loads(text))


def test_qnix_makes_a_ca_that_signs_only_the_specs_groups_and_subnet(tmp_path: Path) -> None:
    text = SPEC.replace('ca_cert = "CA/ca.crt"\nca_key = "CA/ca.key"\n', "")
    ws = _workstation(text)
    paths = RuntimePaths(state_root=tmp_path / "state", run_root=tmp_path / "run")
    folder = tmp_path / "state" / "overlay"
    assert nebula.make_ca_argv(ws, folder / "ca.crt", folder / "ca.key") == [
        shutil.which("nebula-cert"),
        "ca",
        "-name",
        "qnix desk",
        "-groups",
        "staff,work",
        "-ips",
        "10.42.0.0/24",
        "-out-crt",
        f"{folder}/ca.crt",
        "-out-key",
        f"{folder}/ca.key",
    ]
    cert, key = nebula.certificate_authority(paths, ws)
    assert (cert, key) == (folder / "ca.crt", folder / "ca.key")
    assert folder.stat().st_mode & 0o777 == 0o700
    assert key.stat().st_mode & 0o777 == 0o600
    printed = _printed(cert)
    assert (printed["isCa"], printed["groups"], printed["ips"]) == (
        True,
        ["staff", "work"],
        ["10.42.0.0/24"],
    )
    # Made once: a second start takes the same CA.
    made = cert.read_bytes()
    assert nebula.certificate_authority(paths, ws) == (cert, key)
    assert cert.read_bytes() == made


def test_a_compartment_is_signed_with_its_address_and_groups_and_nothing_else(
    tmp_path: Path,
) -> None:
    text = SPEC.replace('ca_cert = "CA/ca.crt"\nca_key = "CA/ca.key"\n', "")
    ws = _workstation(text)
    paths = RuntimePaths(state_root=tmp_path / "state", run_root=tmp_path / "run")
    generation = paths.generation_dir
    for path, data in compile_spec_of(ws).items():
        (generation / path).parent.mkdir(parents=True, exist_ok=True)
        (generation / path).write_bytes(data)
    run_dir = tmp_path / "run" / "compartments" / "work"
    run_dir.mkdir(parents=True)
    ca = nebula.certificate_authority(paths, ws)
    folder = run_dir / nebula.FOLDER_NAME
    assert nebula.sign_argv(ws, "work", ca, folder) == [
        shutil.which("nebula-cert"),
        "sign",
        "-ca-crt",
        str(ca[0]),
        "-ca-key",
        str(ca[1]),
        "-name",
        "work.desk",
        "-ip",
        f"{WORK}/24",
        "-groups",
        "work,staff",
        "-out-crt",
        f"{folder}/host.crt",
        "-out-key",
        f"{folder}/host.key",
    ]
    assert nebula.nebula_argv() == [shutil.which("nebula"), "-config", "config.yml"]
    assert nebula.prepare(paths, ws, "work", run_dir) == folder
    assert sorted(p.name for p in folder.iterdir()) == [
        "ca.crt",
        "config.yml",
        "host.crt",
        "host.key",
    ]
    assert folder.stat().st_mode & 0o777 == 0o700
    printed = _printed(folder / "host.crt")
    assert (printed["name"], printed["ips"], printed["groups"]) == (
        "work.desk",
        [f"{WORK}/24"],
        ["work", "staff"],
    )
    # The control of the CA's limits: a group the spec did not give when the CA was made is
    # refused by nebula-cert, whatever asks for it.
    wider = _workstation(text.replace('groups = ["work", "staff"]', 'groups = ["work", "finance"]'))
    other = tmp_path / "run" / "compartments" / "other"
    other.mkdir()
    with pytest.raises(QnixError) as refused:
        nebula.prepare(paths, wider, "work", other)
    assert "certificate contained a group not present on the signing ca: finance" in (
        refused.value.message
    )


def compile_spec_of(ws: Workstation) -> dict[str, bytes]:
    """The build of a workstation model (the spec text's own, without a file)."""
    loaded = LoadedSpec(Path("spec.toml"), b"", ws, ())
    return dict(compile_spec(loaded).files)


# ---- live ------------------------------------------------------------------------------------


@dataclass
class Office:
    host: LiveHost
    namespace: str

    def probe(self, compartment: str, port: int) -> str:
        result = self.host.qnix(
            "run", compartment, "--", "python3", "-c", PROBE, json.dumps([[SERVER, port]])
        )
        assert result.returncode == 0, result.stderr
        answers: list[str] = json.loads(result.stdout)
        return answers[0]

    def reached(self, compartment: str, port: int, timeout: float = 20) -> str:
        """The first answer that is not a timeout: the first packet waits for the tunnel's
        handshake with the lighthouse and the server."""
        deadline = time.monotonic() + timeout
        while True:
            answer = self.probe(compartment, port)
            if answer != "timeout" or time.monotonic() > deadline:
                return answer


def _wait_for(process: subprocess.Popen[str], line: str, timeout: float) -> None:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        said = process.stdout.readline()
        if line in said:
            return
        assert said, f"nebula ended before saying {line!r}"
    raise AssertionError(f"nebula did not say {line!r} in {timeout}s")


@pytest.fixture(scope="module")
def office() -> Iterator[Office]:
    host = LiveHost()
    ip = host.ip
    namespace = f"{host.tag}up"
    running: list[subprocess.Popen[str]] = []
    try:
        subprocess.run([ip, "netns", "add", namespace], check=True)
        to_office = ("peer", "name", "eth0", "netns", namespace)
        for command in (
            ["-n", host.host_netns, "link", "add", "up0", "type", "veth", *to_office],
            ["-n", host.host_netns, "addr", "add", f"{HOST_UPLINK}/31", "dev", "up0"],
            ["-n", host.host_netns, "link", "set", "up0", "up"],
            ["-n", namespace, "addr", "add", f"{OFFICE}/31", "dev", "eth0"],
            ["-n", namespace, "link", "set", "eth0", "up"],
            ["-n", namespace, "link", "set", "lo", "up"],
            ["-n", host.host_netns, "route", "add", "default", "via", OFFICE],
        ):
            subprocess.run([ip, *command], check=True)
        ca = _make_ca(host.base)
        spec = _spec(host.base)
        built = compile_spec(load(spec)).files
        # The office server: the configuration qnix wrote for it, a certificate of the CA's.
        folder = host.base / "office"
        folder.mkdir()
        (folder / "config.yml").write_bytes(built[server_config_file("office")])
        shutil.copyfile(ca / "ca.crt", folder / "ca.crt")
        subprocess.run(
            [shutil.which("nebula-cert") or "nebula-cert", "sign", "-ca-crt", str(ca / "ca.crt"),
             "-ca-key", str(ca / "ca.key"), "-name", "office", "-ip", f"{SERVER}/24",
             "-groups", "servers", "-out-crt", "host.crt", "-out-key", "host.key"],
            cwd=folder, check=True, capture_output=True,
        )  # fmt: skip
        lighthouse = subprocess.Popen(
            [ip, "netns", "exec", namespace, shutil.which("nebula") or "nebula",
             "-config", "config.yml"],
            cwd=folder, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        running.append(lighthouse)
        _wait_for(lighthouse, nebula.READY_LINE, 15)
        listeners = (f"{SERVER}:{SHARE}", f"{SERVER}:{WEB}")
        running.append(
            server([ip, "netns", "exec", namespace, sys.executable, "-c", SERVE, *listeners])
        )
        host.ok("apply", str(spec))
        yield Office(host, namespace)
    finally:
        stop_servers([p for p in running if p.stdin is not None])
        for process in running:
            if process.stdin is None:
                process.terminate()
                process.wait(10)
        host.close()
        subprocess.run([ip, "netns", "delete", namespace], check=False)


def test_nebula_runs_in_the_compartments_namespace_and_not_the_hosts(office: Office) -> None:
    host = office.host
    for name, address in (("work", WORK), ("personal", PERSONAL)):
        inside = subprocess.run(
            [host.ip, "-n", host.paths.netns(name), "-j", "addr", "show", "dev", "nebula1"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        (link,) = json.loads(inside.stdout)
        ipv4 = [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"]
        assert ipv4 == [(address, 24)]
    # Neither the stand-in host nor this machine has the overlay's interface.
    for where in (["-n", host.host_netns], []):
        listed = subprocess.run(
            [host.ip, *where, "-j", "link", "show"], capture_output=True, text=True, check=True
        )
        assert "nebula1" not in [link["ifname"] for link in json.loads(listed.stdout)]


def test_work_reaches_the_office_share_and_personal_does_not(office: Office) -> None:
    # The server sees each compartment by its overlay address: the certificate's.
    assert office.reached("work", SHARE) == f"ok {WORK}"
    # The control: the server answers personal, on the port its group (staff) is admitted to,
    # so personal's tunnel is up and the server is there.
    assert office.reached("personal", WEB) == f"ok {PERSONAL}"
    assert office.probe("personal", SHARE) == "timeout"
    assert office.probe("work", SHARE) == f"ok {WORK}"


def test_drift_expects_the_overlays_interface_and_nothing_more(office: Office) -> None:
    host = office.host
    assert host.ok("drift").strip() == "no drift: the host matches the live generation"
    # The control: another interface in the same namespace is reported.
    netns = host.paths.netns("work")
    subprocess.run(
        [host.ip, "-n", netns, "link", "add", "stray0", "type", "veth", "peer", "stray1"],
        check=True,
    )
    try:
        found = host.qnix("drift")
        assert found.returncode == 1
        assert f"{netns}:stray0" in found.stdout
        assert "nebula1" not in found.stdout
    finally:
        subprocess.run([host.ip, "-n", netns, "link", "delete", "stray0"], check=True)


def test_stopping_a_compartment_ends_its_nebula(office: Office) -> None:
    host = office.host
    host.ok("stop", "personal")
    try:
        # nebula ended: its interface went with it, and its folder with the run folder.
        left = subprocess.run(
            [host.ip, "-n", host.paths.netns("personal"), "link", "show", "dev", "nebula1"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert left.returncode != 0 or not left.stdout, left.stdout
        assert not host.paths.run_dir("personal").exists()
    finally:
        host.ok("start", "personal")
    assert office.reached("personal", WEB) == f"ok {PERSONAL}"


OUTBOUND_ANY = "  outbound:\n    - port: any\n      proto: any\n      host: any\n  inbound: []\n"


def _outsider(office: Office, groups: str, address: str) -> str:
    """A nebula node of the test's own in a namespace of its own, with every outbound port
    open and a certificate of the office's CA carrying `groups`: what the server lets through
    to the share, decided by the certificate alone."""
    host, ip = office.host, office.host.ip
    namespace = f"{host.tag}out"
    folder = host.base / f"outsider-{address}"
    folder.mkdir()
    built = compile_spec(load(host.base / "spec.toml")).files
    config = built[compartment_config_file("personal")].decode()
    config = config.split("firewall:\n")[0] + "firewall:\n" + OUTBOUND_ANY
    (folder / "config.yml").write_text(config)
    shutil.copyfile(host.base / "ca" / "ca.crt", folder / "ca.crt")
    subprocess.run(
        [shutil.which("nebula-cert") or "nebula-cert", "sign", "-ca-crt",
         str(host.base / "ca" / "ca.crt"), "-ca-key", str(host.base / "ca" / "ca.key"),
         "-name", "outsider", "-ip", f"{address}/24", "-groups", groups,
         "-out-crt", "host.crt", "-out-key", "host.key"],
        cwd=folder, check=True, capture_output=True,
    )  # fmt: skip
    process = None
    try:
        subprocess.run([ip, "netns", "add", namespace], check=True)
        pair = ("peer", "name", "eth0", "netns", namespace)
        for command in (
            ["-n", office.namespace, "link", "add", "out0", "type", "veth", *pair],
            ["-n", office.namespace, "addr", "add", "198.51.100.0/31", "dev", "out0"],
            ["-n", office.namespace, "link", "set", "out0", "up"],
            ["-n", namespace, "addr", "add", "198.51.100.1/31", "dev", "eth0"],
            ["-n", namespace, "link", "set", "eth0", "up"],
            ["-n", namespace, "link", "set", "lo", "up"],
            ["-n", namespace, "route", "add", "default", "via", "198.51.100.0"],
        ):
            subprocess.run([ip, *command], check=True)
        process = subprocess.Popen(
            [ip, "netns", "exec", namespace, shutil.which("nebula") or "nebula",
             "-config", "config.yml"],
            cwd=folder, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        _wait_for(process, nebula.READY_LINE, 15)
        probe = [ip, "netns", "exec", namespace, sys.executable, "-c", PROBE]
        deadline = time.monotonic() + 10
        while True:  # the first answer past the handshake, on the port staff may use
            (web,) = json.loads(subprocess.check_output([*probe, json.dumps([[SERVER, WEB]])]))
            if web != "timeout" or time.monotonic() > deadline:
                break
        assert web == f"ok {address}"
        (share,) = json.loads(subprocess.check_output([*probe, json.dumps([[SERVER, SHARE]])]))
        return str(share)
    finally:
        if process is not None:
            process.terminate()
            process.wait(10)
        subprocess.run([ip, "netns", "delete", namespace], check=False)


def test_the_office_admits_the_share_by_the_certificates_group(office: Office) -> None:
    # Nothing on the outsider's side holds it back: the server refuses staff the share.
    assert _outsider(office, "staff", "10.42.0.98") == "timeout"
    # The control: the same node, its certificate carrying work, is let in.
    assert _outsider(office, "staff,work", "10.42.0.99") == "ok 10.42.0.99"
