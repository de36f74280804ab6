"""`qnix pull` on two stand-in hosts from a fleet repository served by `git daemon` on
127.0.0.1: a signed change lands on both; unsigned, unlisted-key, buried-unsigned,
force-pushed and self-signed-signers changes are refused with nothing applied (each with its
control: the same change properly signed lands); a change that breaks `apply`, and one that
applies but fails the health check, are rolled back; a pull killed at any point and run again
leaves the old or the new generation."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qnix.runtime import cgroups
from tests.conftest import need
from tests.runtime.gitserver import GitServer, ssh_key
from tests.runtime.livehost import QNIX, LiveHost

HOSTS = ("lab-a", "lab-b")
NO_DRIFT = "no drift: the host matches the live generation\n"


def age_key(folder: Path, name: str) -> tuple[Path, str]:
    identity = folder / name
    subprocess.run([need("age-keygen"), "-o", str(identity)], check=True, capture_output=True)
    recipient = subprocess.run(
        [need("age-keygen"), "-y", str(identity)], check=True, capture_output=True, text=True
    ).stdout.strip()
    return identity, recipient


def fleet_toml(
    declared_key: str, extras: tuple[str, ...] = (), broken: bool = False, doomed: bool = False
) -> str:
    """Two desks of one role; `extras`: more compartments (a change); `broken`: an autostart
    compartment with a secret for a key the hosts do not hold (apply fails starting it);
    `doomed`: one more autostart compartment (the health check test ends it)."""
    text = '[fleet]\nname = "lab"\n\n[roles.desk.host]\nsubnet = "10.208.0.0/16"\n\n'
    text += "[roles.desk.compartments.work]\nautostart = true\nmemory_mb = 128\n\n"
    for extra in extras:
        text += f"[roles.desk.compartments.{extra}]\nmemory_mb = 64\n\n"
    if doomed:
        text += "[roles.desk.compartments.doomed]\nautostart = true\nmemory_mb = 64\n\n"
    if broken:
        text += (
            "[roles.desk.compartments.locked]\nautostart = true\nmemory_mb = 64\n"
            'secrets = ["token"]\n\n'
            f'[roles.desk.secrets.token]\nfile = "token.age"\nrecipients = ["{declared_key}"]\n\n'
        )
    for name in HOSTS:
        text += f'[hosts.{name}]\nroles = ["desk"]\nnixos = false\nage_key = "{declared_key}"\n\n'
    return text


@dataclass
class Fleet:
    server: GitServer
    hosts: dict[str, LiveHost]
    admin: Path
    admin_line: str
    declared_key: str
    base: Path

    def pull(self, name: str = "lab-a") -> subprocess.CompletedProcess[str]:
        return self.hosts[name].qnix("pull")

    def trust(self, name: str = "lab-a") -> dict[str, Any]:
        path = self.hosts[name].paths.state_root / "pull" / "trust.json"
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    def status(self, name: str = "lab-a") -> dict[str, Any]:
        path = self.hosts[name].paths.state_root / "pull" / "status.json"
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    def events(self, event: str, name: str = "lab-a") -> list[dict[str, Any]]:
        lines = self.hosts[name].paths.audit_log.read_text().splitlines()
        return [entry for entry in map(json.loads, lines) if entry["event"] == event]

    def compartments(self, name: str = "lab-a") -> list[str]:
        return sorted(self.hosts[name].ls())

    def change(self, extras: tuple[str, ...], key: Path | None, **files: str) -> str:
        text = fleet_toml(self.declared_key, extras)
        return self.server.commit({"fleet.toml": text, **files}, f"desks get {extras}", key)

    def at_deployed(self) -> str:
        """The served branch back at what lab-a deployed: each test starts from there."""
        deployed = str(self.trust()["commit"])
        self.server.reset(deployed)
        return deployed

    def refused(self, reason: str) -> None:
        """The pull refused the tip: nothing applied, the reason in the audit log and status."""
        before = (self.trust(), self.compartments(), len(self.events("pull.rejected")))
        tip = self.server.head()
        result = self.pull()
        assert result.returncode == 1, result.stdout + result.stderr
        assert (self.trust(), self.compartments()) == before[:2]
        rejected = self.events("pull.rejected")
        assert len(rejected) == before[2] + 1
        assert (rejected[-1]["commit"], rejected[-1]["deployed"]) == (tip, before[0]["commit"])
        assert reason in rejected[-1]["reason"], rejected[-1]["reason"]
        status = self.status()
        assert (status["outcome"], status["commit"], status["reason"]) == (
            "rejected",
            tip,
            rejected[-1]["reason"],
        )

    def lands(self, extras: tuple[str, ...], name: str = "lab-a") -> None:
        tip = self.server.head()
        result = self.pull(name)
        assert result.returncode == 0, result.stderr
        assert result.stdout.endswith(f"applied {tip[:12]}\n")
        assert self.trust(name)["commit"] == tip
        assert self.compartments(name) == sorted(["work", *extras])
        assert self.hosts[name].ok("drift") == NO_DRIFT
        assert self.events("pull.applied", name)[-1]["commit"] == tip


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    base = tmp_path_factory.mktemp("fleet")
    server = GitServer(base / "git")
    hosts: dict[str, LiveHost] = {}
    try:
        admin, admin_line = ssh_key(server.keys, "admin")
        _, declared_key = age_key(base, "declared.agekey")
        (base / "trusted_signers").write_text(admin_line)
        for name in HOSTS:
            identity, _ = age_key(base, f"{name}.agekey")
            hosts[name] = LiveHost(age_identity=identity)
            hosts[name].ok(
                "pull",
                "--init",
                server.url,
                "--host",
                name,
                "--signers",
                str(base / "trusted_signers"),
            )
        made = Fleet(server, hosts, admin, admin_line, declared_key, base)
        made.change((), admin, allowed_signers=admin_line)
        server.publish()
        for name in HOSTS:  # each test starts from a deployed commit
            made.lands((), name)
        yield made
    finally:
        with contextlib.ExitStack() as closing:  # each closed even if another fails to
            closing.callback(server.close)
            for host in hosts.values():
                closing.callback(host.close)


def test_a_signed_change_lands_on_both_hosts(fleet: Fleet) -> None:
    fleet.server.reset(fleet.trust("lab-b")["commit"])
    fleet.change(("notes",), fleet.admin)
    fleet.server.publish()
    for name in HOSTS:
        fleet.lands(("notes",), name)
        assert fleet.hosts[name].ls()["work"]["state"] == "running"
        status = fleet.status(name)
        assert (status["outcome"], status["deployed"], status["host"]) == (
            "applied",
            fleet.server.head(),
            name,
        )
    again = fleet.pull()
    assert (again.returncode, again.stdout) == (0, f"up to date at {fleet.server.head()[:12]}\n")
    metrics = (fleet.hosts["lab-a"].paths.state_root / "pull" / "metrics.prom").read_text()
    assert (
        f'qnix_pull_deployment_info{{commit_id="{fleet.server.head()}",status="done"}} 1\n'
        in metrics
    )
    assert f'qnix_pull_fetch_count{{remote_name="{fleet.server.url}",status="succeeded"}} 3\n' in (
        metrics
    )
    assert "qnix_pull_last_deployment_failed 0\n" in metrics


def test_an_unsigned_commit_is_refused_and_the_signed_one_lands(fleet: Fleet) -> None:
    start = fleet.at_deployed()
    fleet.change(("unsigned",), None)
    fleet.server.publish()
    fleet.refused("is not signed by an allowed signer")
    fleet.server.reset(start)
    fleet.change(("unsigned",), fleet.admin)
    fleet.server.publish()
    fleet.lands(("unsigned",))


def test_a_commit_by_an_unlisted_key_is_refused(fleet: Fleet) -> None:
    start = fleet.at_deployed()
    stranger, _ = ssh_key(fleet.base, "stranger")
    fleet.change(("stranger",), stranger)
    fleet.server.publish()
    fleet.refused("is not signed by an allowed signer")
    fleet.server.reset(start)
    fleet.change(("stranger",), fleet.admin)
    fleet.server.publish()
    fleet.lands(("stranger",))


def test_an_unsigned_commit_under_a_signed_tip_is_refused(fleet: Fleet) -> None:
    start = fleet.at_deployed()
    buried = fleet.change(("buried",), None)
    fleet.change(("buried", "tip"), fleet.admin)
    fleet.server.publish()
    fleet.refused(f"commit {buried} is not signed")
    fleet.server.reset(start)
    fleet.change(("buried",), fleet.admin)
    fleet.change(("buried", "tip"), fleet.admin)
    fleet.server.publish()
    fleet.lands(("buried", "tip"))


def test_a_force_push_is_refused_and_a_fast_forward_lands(fleet: Fleet) -> None:
    start = fleet.at_deployed()
    parent = fleet.server.run("rev-parse", "HEAD~1").strip()
    fleet.server.reset(parent)  # history rewritten: a signed commit beside the deployed one
    fleet.change(("rewritten",), fleet.admin)
    fleet.server.publish(force=True)
    fleet.refused(f"is not a fast-forward of the deployed commit {start}")
    fleet.server.reset(start)
    fleet.change(("rewritten",), fleet.admin)
    fleet.server.publish()
    fleet.lands(("rewritten",))


def test_a_new_signer_is_trusted_only_when_an_old_one_signs_it_in(fleet: Fleet) -> None:
    start = fleet.at_deployed()
    newcomer, newcomer_line = ssh_key(fleet.base, "newcomer")
    both = fleet.admin_line + newcomer_line
    fleet.change(("newcomer",), newcomer, allowed_signers=both)
    fleet.server.publish()
    fleet.refused("is not signed by an allowed signer")
    assert fleet.trust()["allowed_signers"] == fleet.admin_line
    # Control: the same change signed by the admin lands, and from then on the newcomer's
    # commits land too.
    fleet.server.reset(start)
    fleet.change(("newcomer",), fleet.admin, allowed_signers=both)
    fleet.server.publish()
    fleet.lands(("newcomer",))
    assert fleet.trust()["allowed_signers"] == both
    fleet.change(("newcomer", "second"), newcomer)
    fleet.server.publish()
    fleet.lands(("newcomer", "second"))


def test_a_change_that_breaks_apply_is_rolled_back(fleet: Fleet) -> None:
    start = fleet.at_deployed()
    before = fleet.compartments()
    generation = fleet.trust()["generation"]
    token = fleet.base / "token"
    token.write_text("not for these hosts\n")
    subprocess.run(
        [
            need("age"),
            "-r",
            fleet.declared_key,
            "-o",
            str(fleet.server.work / "token.age"),
            str(token),
        ],
        check=True,
    )
    broken = fleet_toml(fleet.declared_key, tuple(c for c in before if c != "work"), broken=True)
    tip = fleet.server.commit({"fleet.toml": broken}, "a secret the desks cannot open", fleet.admin)
    fleet.server.publish()
    result = fleet.pull()
    assert result.returncode == 1
    assert f"rolled-back {tip[:12]}: " in result.stderr
    assert fleet.compartments() == before
    assert fleet.hosts["lab-a"].ok("drift") == NO_DRIFT
    assert (fleet.trust()["commit"], fleet.trust()["generation"]) == (start, generation)
    installed = json.loads((fleet.hosts["lab-a"].paths.installed_dir / "manifest.json").read_text())
    assert installed["generation"] == generation
    [entry] = fleet.events("pull.rolled-back")
    assert (entry["commit"], entry["deployed"]) == (tip, start)
    assert "locked" in entry["reason"]
    status = fleet.status()
    assert (status["outcome"], status["deployed"], status["reason"]) == (
        "rolled-back",
        start,
        entry["reason"],
    )
    metrics = (fleet.hosts["lab-a"].paths.state_root / "pull" / "metrics.prom").read_text()
    fetches = sum(status["counts"].values())
    assert metrics == (
        "# HELP qnix_pull_deployment_info The deployed commit and how the last pull ended.\n"
        "# TYPE qnix_pull_deployment_info gauge\n"
        f'qnix_pull_deployment_info{{commit_id="{start}",status="failed"}} 1\n'
        "# HELP qnix_pull_fetch_count Fetches of the fleet repository, by result.\n"
        "# TYPE qnix_pull_fetch_count counter\n"
        f'qnix_pull_fetch_count{{remote_name="{fleet.server.url}",status="succeeded"}} '
        f"{fetches}\n"
        f'qnix_pull_fetch_count{{remote_name="{fleet.server.url}",status="failed"}} 0\n'
        "# HELP qnix_pull_last_fetch_failed Whether the last fetch failed.\n"
        "# TYPE qnix_pull_last_fetch_failed gauge\n"
        "qnix_pull_last_fetch_failed 0\n"
        "# HELP qnix_pull_last_deployment_failed Whether the last change fetched was rolled "
        "back.\n"
        "# TYPE qnix_pull_last_deployment_failed gauge\n"
        "qnix_pull_last_deployment_failed 1\n"
        "# HELP qnix_pull_last_rejected Whether the last change fetched was refused unverified.\n"
        "# TYPE qnix_pull_last_rejected gauge\n"
        "qnix_pull_last_rejected 0\n"
        "# HELP qnix_pull_last_run_timestamp_seconds When the last pull ended.\n"
        "# TYPE qnix_pull_last_run_timestamp_seconds gauge\n"
        f"qnix_pull_last_run_timestamp_seconds {status['time']}\n"
    )


def started(host: LiveHost, name: str) -> bool:
    """Whether the audit log has `name`'s successful start (read while qnix writes it: a last
    line not whole yet is left for the next look)."""
    for line in host.paths.audit_log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if (entry["event"], entry.get("compartment"), entry.get("result")) == (
                "start",
                name,
                "ok",
            ):
                return True
    return False


def test_a_change_that_fails_the_health_check_is_rolled_back(fleet: Fleet) -> None:
    """The change applies: its new autostart compartment starts. But it does not stay running,
    as a compartment whose program dies right after its start: once the pull recorded the
    start, the pull is held (SIGSTOP), every process of the compartment is killed, its keeper
    tears the run down, and the pull goes on to its health check, which finds the compartment
    stopped. The deployed generation is applied again, and drift is clean."""
    host = fleet.hosts["lab-a"]
    start = fleet.at_deployed()
    before = fleet.compartments()
    generation = fleet.trust()["generation"]
    extras = tuple(c for c in before if c != "work")
    assert not started(host, "doomed")
    text = fleet_toml(fleet.declared_key, extras, doomed=True)
    tip = fleet.server.commit({"fleet.toml": text}, "a compartment that will not stay", fleet.admin)
    fleet.server.publish()
    pulling = subprocess.Popen(
        [QNIX, "pull"], env=host.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not started(host, "doomed"):
            assert pulling.poll() is None, pulling.communicate()
            assert time.monotonic() < deadline, "the pull never started the compartment"
            time.sleep(0.002)
        pulling.send_signal(signal.SIGSTOP)
        cgroups.kill(cgroups.cgroup_of(host.paths.cgroup_name("doomed"), cgroups.detect()))
        while host.paths.run_dir("doomed").exists():  # its keeper's teardown
            assert time.monotonic() < deadline, "the keeper did not tear the run down"
            time.sleep(0.01)
    finally:
        pulling.send_signal(signal.SIGCONT)
    stdout, stderr = pulling.communicate(timeout=300)
    assert pulling.returncode == 1, stdout + stderr
    reason = (
        "health check: 1 difference(s) from the generation: "
        "compartment doomed: expected running, found stopped"
    )
    assert stderr.endswith(f"rolled-back {tip[:12]}: {reason}\n"), stderr
    assert fleet.compartments() == before
    assert host.ok("drift") == NO_DRIFT
    assert (fleet.trust()["commit"], fleet.trust()["generation"]) == (start, generation)
    installed = json.loads((host.paths.installed_dir / "manifest.json").read_text())
    assert installed["generation"] == generation
    entry = fleet.events("pull.rolled-back")[-1]
    assert (entry["commit"], entry["deployed"], entry["reason"]) == (tip, start, reason)
    assert "result" not in entry  # the roll-back itself went well
    status = fleet.status()
    assert (status["outcome"], status["commit"], status["deployed"], status["reason"]) == (
        "rolled-back",
        tip,
        start,
        reason,
    )
    metrics = (host.paths.state_root / "pull" / "metrics.prom").read_text()
    assert f'qnix_pull_deployment_info{{commit_id="{start}",status="failed"}} 1\n' in metrics
    assert "qnix_pull_last_deployment_failed 1\n" in metrics
    assert os.path.exists(host.paths.state_dir("doomed"))  # its home stays, as apply keeps it


def test_a_pull_killed_at_any_point_ends_at_the_old_or_the_new_generation(fleet: Fleet) -> None:
    """Killed, then either pulled again (the new commit lands) or, with the branch put back
    to the old commit, pulled again (the host is back at the old generation, or stays at
    the new one if the kill came after it was deployed: going back is no fast-forward)."""
    host = fleet.hosts["lab-b"]
    start = fleet.at_deployed()
    assert fleet.pull("lab-b").returncode == 0  # lab-b catches up with lab-a
    extras_of = {start: tuple(c for c in fleet.compartments("lab-b") if c != "work")}
    # How long a whole pull of one change takes here: the kills fall across it.
    extras_of[fleet.change((*extras_of[start], "timed"), fleet.admin)] = (
        *extras_of[start],
        "timed",
    )
    fleet.server.publish()
    began = time.monotonic()
    assert fleet.pull("lab-b").returncode == 0
    duration = time.monotonic() - began
    kill_points = random.Random(7)  # the same kill points on every run
    for round_number in range(8):
        old = fleet.trust("lab-b")["commit"]
        new_extras = (*extras_of[old], f"kill{round_number}")
        new = fleet.change(new_extras, fleet.admin)
        extras_of[new] = new_extras
        fleet.server.publish()
        process = subprocess.Popen(
            [QNIX, "pull"], env=host.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(kill_points.uniform(0.0, 1.1) * duration)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert fleet.trust("lab-b")["commit"] in (old, new)
        if round_number % 2:
            fleet.server.reset(old)
        result = fleet.pull("lab-b")
        deployed = fleet.trust("lab-b")["commit"]
        assert deployed in (old, new)
        assert result.returncode == (1 if deployed != fleet.server.head() else 0), result.stderr
        assert fleet.compartments("lab-b") == sorted(["work", *extras_of[deployed]])
        assert host.ok("drift") == NO_DRIFT
        pulled = host.paths.state_root / "pull"
        assert not [*pulled.glob(".tree-*"), *pulled.glob(".verify-*")]
        fleet.server.reset(deployed)


def test_the_trust_is_pinned_once(fleet: Fleet) -> None:
    """`--init` is recorded; a second one (which would replace the pinned signers) is refused,
    as is a branch name git would read as something else."""
    [entry] = fleet.events("pull.init")
    assert (entry["url"], entry["host"], entry["branch"]) == (fleet.server.url, "lab-a", "main")
    pinned = fleet.trust()
    _, stranger_line = ssh_key(fleet.base, "usurper")
    (fleet.base / "usurper_signers").write_text(stranger_line)
    again = fleet.hosts["lab-a"].qnix(
        "pull",
        "--init",
        fleet.server.url,
        "--host",
        "lab-a",
        "--signers",
        str(fleet.base / "usurper_signers"),
    )
    assert again.returncode == 1
    assert "error: this host already follows a fleet repository" in again.stderr
    assert fleet.trust() == pinned
    fresh = LiveHost()
    try:
        bad = fresh.qnix(
            "pull",
            "--init",
            fleet.server.url,
            "--host",
            "lab-a",
            "--branch",
            "main:refs/x",
            "--signers",
            str(fleet.base / "trusted_signers"),
        )
        assert (bad.returncode, bad.stderr) == (
            1,
            "error: 'main:refs/x' is not a branch name\n  hint: such as main\n",
        )
    finally:
        fresh.close()
