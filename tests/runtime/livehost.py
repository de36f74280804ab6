"""`LiveHost`: the stand-in every live runtime test uses (tests/runtime, tests/cli,
tests/isolation): a network namespace that plays the host, temporary state and run roots, and
a namespace prefix of its own, so nothing of the real host's is touched and everything made can
be found again.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qnix.runtime import cgroups
from qnix.runtime.net import HostNetwork
from qnix.runtime.paths import RuntimePaths
from tests.conftest import need

QNIX = str(Path(sys.executable).with_name("qnix"))
TEST_TAG = "qxt"


def describe_cgroups(names: set[str] | list[str]) -> dict[str, object]:
    """Who is in each leftover cgroup and when it was made: what a failure needs to say, so
    that a leftover seen once in CI can be traced."""
    host = cgroups.detect()
    described: dict[str, object] = {}
    for name in sorted(names):
        cgroup = cgroups.cgroup_of(name, host)
        inside = {}
        for pid in sorted(cgroups.processes(cgroup)):
            try:
                inside[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                inside[pid] = b"(gone)"
        made = [time.ctime(path.stat().st_ctime) for path in cgroup.paths if path.exists()]
        described[name] = {"made": made, "processes": inside}
    return described


class LiveHost:
    """A stand-in host for qnix: run `close()` (or use the fixture) to remove all of it.
    `age_identity`: the host's age identity its commands are given (QNIX_AGE_IDENTITY)."""

    TIMEOUT = 60.0  # for one qnix command

    def __init__(self, age_identity: Path | None = None) -> None:
        self.age_identity = age_identity
        tag = TEST_TAG + secrets.token_hex(3)
        self.tag = tag
        self.prefix = f"{tag}-"
        self.host_netns = f"{tag}host"  # outside the prefix: qnix must never remove it
        self.base = Path(tempfile.mkdtemp(prefix=f"qnixtest-{tag}-", dir="/tmp"))
        self.base.chmod(0o711)  # compartment users pass through it to their homes
        self.ip = need("ip")
        self.links_before = HostNetwork().list_links()
        subprocess.run([self.ip, "netns", "add", self.host_netns], check=True)
        subprocess.run([self.ip, "-n", self.host_netns, "link", "set", "lo", "up"], check=True)
        self.paths = RuntimePaths(
            state_root=self.base / "state",
            run_root=self.base / "run",
            netns_prefix=self.prefix,
            host_netns=self.host_netns,
            desktop_root=self.base / "desktop",
        ).checked()
        self.net = HostNetwork(prefix=self.prefix, host_netns=self.host_netns)
        self.mounts: list[Path] = []

    def state_on_btrfs(self, size_mb: int = 512) -> None:
        """Put the state root on a btrfs file system of its own (an image on a loop device)."""
        image = self.base / "btrfs.img"
        with image.open("wb") as handle:
            handle.truncate(size_mb << 20)
        subprocess.run([need("mkfs.btrfs"), "-q", str(image)], check=True, capture_output=True)
        self.paths.state_root.mkdir()
        subprocess.run(
            [need("mount"), "-o", "loop", str(image), str(self.paths.state_root)], check=True
        )
        self.mounts.append(self.paths.state_root)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "QNIX_STATE_ROOT": str(self.paths.state_root),
            "QNIX_RUN_ROOT": str(self.paths.run_root),
            "QNIX_NETNS_PREFIX": self.prefix,
            "QNIX_HOST_NETNS": self.host_netns,
            "QNIX_DESKTOP_ROOT": str(self.paths.desktop_root),
            **({"QNIX_AGE_IDENTITY": str(self.age_identity)} if self.age_identity else {}),
        }

    def qnix(
        self,
        *args: str,
        input: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [QNIX, *args],
            input=input,
            capture_output=True,
            text=True,
            env=env or self.env,
            timeout=timeout or self.TIMEOUT,
            check=False,
        )

    def ok(self, *args: str, input: str | None = None) -> str:
        result = self.qnix(*args, input=input)
        assert result.returncode == 0, f"qnix {' '.join(args)}: {result.stderr}"
        return result.stdout

    def disposables_gone(self, timeout: float = 30) -> None:
        """Wait until no disposable runs: `qnix dispose` returns when its command ends, and
        the disposable's keeper removes the rest right after (as Qubes removes a DispVM)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                left = [n for n in os.listdir(self.paths.compartments_run) if n.startswith("disp")]
            except FileNotFoundError:
                left = []
            if not left:
                return
            assert time.monotonic() < deadline, f"disposables still there: {left}"
            time.sleep(0.02)

    def spec(self, text: str, name: str = "spec.toml") -> Path:
        path = self.base / name
        path.write_text(text)
        return path

    def ls(self) -> dict[str, dict[str, object]]:
        return {entry["name"]: entry for entry in json.loads(self.ok("ls", "--json"))}

    def netns_names(self) -> set[str]:
        return {n for n in os.listdir("/run/netns") if n.startswith(self.tag)}

    def compartment_netns(self) -> set[str]:
        return {n[len(self.prefix) :] for n in self.netns_names() if n.startswith(self.prefix)}

    def cgroup_names(self) -> set[str]:
        return {n for n in cgroups.names() if n.startswith(self.prefix)}

    def nft(self, *args: str, check: bool = True) -> str:
        return subprocess.run(
            [self.ip, "netns", "exec", self.host_netns, need("nft"), *args],
            capture_output=True,
            text=True,
            check=check,
        ).stdout

    def leftovers(self) -> dict[str, object]:
        """What qnix must have removed by `down`: empty values only."""
        return {
            "netns": sorted(self.compartment_netns()),
            "links": self.net.list_links(),
            "rules": self.net.list_rule_interfaces(),
            "table": self.net.table_listing(),
            "cgroups": sorted(self.cgroup_names()),
            "run_root": sorted(os.listdir(self.paths.run_root))
            if self.paths.run_root.exists()
            else None,
        }

    def close(self) -> None:
        down = self.qnix("down")
        leftovers = self.leftovers()
        cgroups_left = describe_cgroups(self.cgroup_names())
        for name in self.netns_names():
            subprocess.run([self.ip, "netns", "delete", name], check=False)
        for name in self.cgroup_names():
            cgroup = cgroups.cgroup_of(name, cgroups.detect())
            cgroups.kill(cgroup)
            cgroups.remove(cgroup)
        for mount in reversed(self.mounts):
            subprocess.run([need("umount"), str(mount)], check=True)
        shutil.rmtree(self.base, ignore_errors=True)
        assert down.returncode == 0, down.stderr
        assert leftovers == {
            "netns": [],
            "links": [],
            "rules": [],
            "table": None,
            "cgroups": [],
            "run_root": None,
        }, (leftovers, cgroups_left)
        assert not self.netns_names()
        assert not self.base.exists()
        assert HostNetwork().list_links() == self.links_before
