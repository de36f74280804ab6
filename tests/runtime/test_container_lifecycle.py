"""A container compartment's life on a stand-in host (tests/runtime/livehost.py), through the CLI:
apply starts it (autostart), `qnix run` passes stdio and the exit code, `qnix ls` shows it,
stop and start, its home survives both, its secret arrives and leaves no plaintext behind, the
secret another container lists never reaches it, a
disposable of a container template comes and goes, a killed keeper takes the container with it
and `gc` removes the rest, and `down` leaves nothing (LiveHost.close checks).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets as random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qnix.compile.inputs import load
from qnix.runtime import cgroups, live
from qnix.runtime.backends import container
from tests.conftest import need
from tests.runtime.livehost import QNIX, LiveHost
from tests.runtime.test_secrets import encrypt_to, only_its_own, secret_sightings, sightings_of

SPEC = """\
[host]
hostname = "lab"
subnet = "10.211.0.0/16"

[compartments.box]
isolation = "container"
network = "uplink"
autostart = true
memory_mb = 256
user = "alice"
snapshots = 0
secrets = ["token"]

[compartments.other]
isolation = "container"
memory_mb = 256
snapshots = 0
secrets = ["spare"]

[disposable_templates.cdvm]
isolation = "container"
memory_mb = 256

[secrets.token]
file = "secrets/token.age"
recipients = ["{recipient}"]

[secrets.spare]
file = "secrets/spare.age"
recipients = ["{recipient}"]
"""

SECRET_PROBE = r"""
import errno, hashlib, json, os, pwd, stat
path = "/run/secrets/token"
info = os.stat(path)
report = {
    "mode": oct(stat.S_IMODE(info.st_mode)),
    "owner": pwd.getpwuid(info.st_uid).pw_name,
    "sha256": hashlib.sha256(open(path, "rb").read()).hexdigest(),
    "listing": sorted(os.listdir("/run/secrets")),
}
for what, action in {"append": lambda: open(path, "ab"), "unlink": lambda: os.unlink(path)}.items():
    try:
        action()
        report[what] = "done"
    except OSError as exc:
        report[what] = errno.errorcode[exc.errno]
print(json.dumps(report))
"""


class Lab:
    def __init__(self, host: LiveHost, key: Path, plaintexts: dict[str, bytes]) -> None:
        self.host = host
        self.plaintexts = plaintexts
        self.plaintext = plaintexts["token"]
        self.env = {**host.env, "QNIX_AGE_IDENTITY": str(key)}

    def qnix(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [QNIX, *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=120,
            check=False,
        )

    def ok(self, *args: str, input: str | None = None) -> str:
        result = self.qnix(*args, input=input)
        assert result.returncode == 0, f"qnix {' '.join(args)}: {result.stderr}"
        return result.stdout


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    host = LiveHost()
    try:
        keys = host.base / "keys"
        keys.mkdir()
        key = keys / "host.agekey"
        subprocess.run([need("age-keygen"), "-o", str(key)], check=True, capture_output=True)
        recipient = subprocess.run(
            [need("age-keygen"), "-y", str(key)], check=True, capture_output=True, text=True
        ).stdout.strip()
        plaintexts = {
            name: f"qnix-container-{name}-{random.token_hex(16)}\n".encode()
            for name in ("token", "spare")
        }
        for name, plaintext in plaintexts.items():
            encrypt_to(recipient, plaintext, host.base / "secrets" / f"{name}.age")
        made = Lab(host, key, plaintexts)
        applied = made.ok("apply", str(host.spec(SPEC.format(recipient=recipient))))
        assert "box: started" in applied.splitlines()
        yield made
    finally:
        host.close()
        assert_nothing_of_containers_left(host)


def assert_nothing_of_containers_left(host: LiveHost) -> None:
    """What LiveHost.close does not look at: nspawn's sub-cgroups in the systemd hierarchies,
    the launcher's tmpfs, nspawn's per-machine folder."""
    for hierarchy in container.systemd_hierarchies():
        folder = hierarchy / cgroups.QNIX_DIR
        left = [p.name for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
        assert not [name for name in left if name.startswith(host.prefix)]
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        assert str(host.base) not in handle.read()
    propagate = Path(container.NSPAWN_RUN_DIR) / "propagate"
    if propagate.is_dir():
        assert not [p for p in os.listdir(propagate) if p.startswith(host.prefix)]


def test_it_runs_as_a_container_and_ls_shows_it(lab: Lab) -> None:
    shown = {entry["name"]: entry for entry in json.loads(lab.ok("ls", "--json"))}
    assert (shown["box"]["isolation"], shown["box"]["state"]) == ("container", "running")
    config = json.loads(lab.host.paths.keeper_config("box").read_text())
    assert config["isolation"] == "container"
    # systemd-nspawn is the keeper's child, in the compartment's cgroup with everything else.
    state = json.loads(lab.host.paths.state_file("box").read_text())
    with open(f"/proc/{state['sandbox_pid']}/cmdline", "rb") as handle:
        assert handle.read().split(b"\0")[0].endswith(b"systemd-nspawn")
    cgroup = cgroups.cgroup_of(lab.host.paths.cgroup_name("box"), cgroups.detect())
    inside = cgroups.processes(container.cgroup_tree(cgroup)) - {state["sandbox_pid"]}
    assert len(inside) == 2  # qnix's init (PID 1 inside) and the agent
    # Everything inside runs as the compartment's host uid: nothing as the container's root.
    assert {os.stat(f"/proc/{pid}").st_uid for pid in inside} == {state["host_uid"]}


def test_run_passes_stdio_and_the_exit_code(lab: Lab) -> None:
    result = lab.qnix(
        "run",
        "box",
        "--",
        "sh",
        "-c",
        'read line; echo "got $line"; echo oops >&2; exit 7',
        input="hello\n",
    )
    assert (result.returncode, result.stdout, result.stderr) == (7, "got hello\n", "oops\n")
    who = lab.ok("run", "box", "--", "sh", "-c", 'id -un; id -u; hostname; pwd; echo "$HOME"')
    assert who.splitlines() == ["alice", "1000", "box", "/home/alice", "/home/alice"]


def test_the_home_survives_stop_and_start(lab: Lab) -> None:
    lab.ok("run", "box", "--", "sh", "-c", "echo kept > ~/note")
    home = lab.host.paths.home("box")
    ws = load(lab.host.base / "spec.toml").workstation
    identity = live.host_identity(ws, "box")
    # The same host owner as a namespace compartment's state: the user inside is that uid.
    assert os.stat(home / "note").st_uid == identity.uid
    lab.ok("stop", "box")
    shown = {entry["name"]: entry for entry in json.loads(lab.ok("ls", "--json"))}
    assert shown["box"]["state"] == "stopped"
    assert not lab.host.paths.run_dir("box").exists()
    assert lab.host.cgroup_names() == set()
    lab.ok("start", "box")
    assert lab.ok("run", "box", "--", "cat", "/home/alice/note") == "kept\n"


def test_the_secret_arrives_and_leaves_no_plaintext_behind(lab: Lab) -> None:
    seen = json.loads(lab.ok("run", "box", "--", "python3", "-c", SECRET_PROBE))
    assert seen == {
        "mode": "0o400",
        "owner": "alice",
        "sha256": hashlib.sha256(lab.plaintext).hexdigest(),
        "listing": ["token"],
        "append": "EACCES",
        "unlink": "EROFS",
    }
    # While it runs, the plaintext is in the launcher's private tmpfs: no file the host sees.
    needle = lab.plaintext.strip()
    for root in (lab.host.paths.state_root, lab.host.paths.run_root, Path("/dev/shm")):
        for folder, _dirs, files in os.walk(root):
            for name in files:
                path = os.path.join(folder, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    with open(path, "rb") as handle:
                        assert needle not in handle.read(), path


def test_a_container_gets_the_one_secret_it_lists_of_two_declared(lab: Lab) -> None:
    """box lists token only: spare's name and plaintext are nowhere in it. Control: other,
    which lists spare, finds it with the same search."""
    lab.ok("start", "other")
    try:
        in_box = secret_sightings(lab.ok, "box", "token", lab.plaintexts)
        in_other = secret_sightings(lab.ok, "other", "spare", lab.plaintexts)
    finally:
        lab.ok("stop", "other")
    assert sightings_of(in_box) == only_its_own(in_box, "token")
    assert sightings_of(in_other) == only_its_own(in_other, "spare")
    assert {"/etc/passwd", "/opt/qnix-agent/agent.pyc"} <= set(in_box["scanned"])


def test_a_container_disposable_comes_and_goes(lab: Lab) -> None:
    result = lab.qnix(
        "dispose",
        "--template",
        "cdvm",
        "--",
        "sh",
        "-c",
        'hostname; id -u; touch "$HOME/x" && ls "$HOME"; exit 3',
    )
    assert (result.returncode, result.stdout) == (3, "disp1\n1000\nx\n"), result.stderr
    lab.host.disposables_gone()
    assert not lab.host.paths.run_dir("disp1").exists()
    assert not lab.host.paths.netns_path("disp1").exists()
    assert not any(name.endswith("-disp1") for name in lab.host.cgroup_names())


def test_a_killed_keeper_takes_the_container_with_it_and_gc_removes_the_rest(lab: Lab) -> None:
    state = json.loads(lab.host.paths.state_file("box").read_text())
    cgroup = cgroups.cgroup_of(lab.host.paths.cgroup_name("box"), cgroups.detect())
    assert len(cgroups.processes(cgroup)) >= 2  # nspawn and the agent at least
    os.kill(state["keeper_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while cgroups.processes(container.cgroup_tree(cgroup)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cgroups.processes(container.cgroup_tree(cgroup)) == frozenset()
    assert json.loads(lab.ok("ls", "--json"))[0]["state"] == "crashed"
    assert lab.ok("gc").splitlines() == [
        "box: removed what its crashed run left (cgroup, run folder)"
    ]
    assert not any(path.exists() for path in container.cgroup_tree(cgroup).paths)
    lab.ok("start", "box")
    assert lab.ok("run", "box", "--", "true") == ""
