"""`qnix install` / `qnix uninstall` into a folder that stands for / (`--root`, as systemctl
takes one), with the real systemctl, systemd-tmpfiles and age-keygen: what lands where, and
that uninstall leaves the tree as it found it; `qnix pull --install-timer` the same way, and
its refusal where systemd is not running."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from qnix.compile import services
from qnix.compile.aide import aide_config
from qnix.compile.inputs import load
from qnix.compile.rsyslog import AUDIT_LOG, rsyslog_config
from qnix.errors import QnixError
from qnix.runner import Result, run
from qnix.runtime import install as install_module
from tests.conftest import EXAMPLES, need
from tests.install.support import QNIX, listing

OFFICE = EXAMPLES / "smb-office.toml"  # forwards its audit log to a remote syslog


def qnix(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(QNIX), *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A small Debian-like tree: the folders a host has before qnix comes."""
    root = tmp_path / "root"
    for folder in (
        "etc/systemd/system/multi-user.target.wants",
        "etc/tmpfiles.d",
        "etc/rsyslog.d",
        "usr/local/bin",
        "var/lib",
        "run",
        "opt",
    ):
        (root / folder).mkdir(parents=True)
    (root / "etc/systemd/system/multi-user.target.wants/ssh.service").symlink_to(
        "/lib/systemd/system/ssh.service"
    )
    return root


def with_venv(root: Path) -> None:
    """What `make install` makes before it runs `qnix install`: /opt/qnix with bin/qnix (here
    this checkout's own qnix)."""
    (root / "opt/qnix/bin").mkdir(parents=True)
    (root / "opt/qnix/bin/qnix").symlink_to(QNIX)


def installed(root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    with_venv(root)
    result = qnix("install", "--root", str(root), *extra)
    assert result.returncode == 0, result.stderr
    return result


def test_install_puts_each_file_in_place_and_uninstall_leaves_the_tree_as_before(
    root: Path,
) -> None:
    before = listing(root, skip="/nowhere")
    result = installed(root)

    tools: dict[services.Tool, str] = {
        "qnix": "/opt/qnix/bin/qnix",
        "age-keygen": need("age-keygen"),
    }
    for name, text in services.unit_files(tools).items():
        assert (root / "etc/systemd/system" / name).read_text() == text
    wants = root / "etc/systemd/system"
    assert sorted(str(p.relative_to(wants)) for p in wants.glob("*.wants/qnix-*")) == [
        "multi-user.target.wants/qnix-boot.service",
        "multi-user.target.wants/qnix-host-key.service",
        "timers.target.wants/qnix-audit-seal.timer",
        "timers.target.wants/qnix-gc.timer",
        "timers.target.wants/qnix-integrity.timer",
        "timers.target.wants/qnix-received-append-only.timer",
    ]
    assert (wants / "multi-user.target.wants/qnix-boot.service").readlink() == Path(
        "/etc/systemd/system/qnix-boot.service"
    )
    assert (root / "usr/local/bin/qnix").readlink() == Path("/opt/qnix/bin/qnix")
    assert (root / "etc/tmpfiles.d/qnix.conf").read_text() == services.tmpfiles_conf()
    for folder in ("etc/qnix", "var/lib/qnix", "var/lib/qnix/audit", "run/qnix"):
        assert (root / folder).stat().st_mode & 0o777 == 0o700, folder
    key = root / "etc/qnix/host.agekey"
    assert key.stat().st_mode & 0o777 == 0o400
    public = run([need("age-keygen"), "-y", str(key)]).stdout
    assert public.startswith("age1")
    assert not (root / "etc/rsyslog.d/qnix.conf").exists()  # no --spec
    assert not (root / AIDE_CONF).exists()
    assert "note: no --spec: no rsyslog forwarding and no AIDE configuration were written" in (
        result.stdout.splitlines()
    )

    result = qnix("uninstall", "--root", str(root))
    assert result.returncode == 0, result.stderr
    # The empty state root install made goes with the rest: nothing is left.
    assert listing(root, skip="/nowhere") == before


def test_uninstall_keeps_what_was_there_before_and_what_others_put_in_its_folders(
    root: Path,
) -> None:
    (root / "etc/qnix").mkdir(mode=0o700)
    key = root / "etc/qnix/host.agekey"
    key.write_text("AGE-SECRET-KEY-1 (the host's own, from before)\n")
    key.chmod(0o400)
    before = listing(root)
    result = installed(root)
    assert "kept the host identity /etc/qnix/host.agekey" in result.stdout
    assert key.read_text().startswith("AGE-SECRET-KEY-1 (the host's own")
    # Someone else's drop-in in a folder install made: not install's to remove.
    (root / "etc/systemd/system/timers.target.wants/other.timer").symlink_to("/dev/null")

    assert qnix("uninstall", "--root", str(root)).returncode == 0
    after = listing(root)
    assert [line for line in after if line not in before] == [
        "drwxr-xr-x /etc/systemd/system/timers.target.wants",
        "lrwxrwxrwx /etc/systemd/system/timers.target.wants/other.timer -> /dev/null",
    ]
    assert [line for line in before if line not in after] == []


def test_the_host_identity_stays_with_the_state_unless_purged(root: Path) -> None:
    installed(root)
    home = root / "var/lib/qnix/compartments/work/home"
    home.mkdir(parents=True)
    (home / "notes.txt").write_text("state")
    result = qnix("uninstall", "--root", str(root))
    assert result.returncode == 0, result.stderr
    assert "kept /etc/qnix/host.agekey: the state root /var/lib/qnix holds files" in result.stdout
    assert "kept the state root /var/lib/qnix" in result.stdout
    assert (root / "etc/qnix/host.agekey").exists()
    assert (home / "notes.txt").read_text() == "state"
    assert not (root / "opt/qnix").exists()

    # Installed again (the identity is kept, not made), then purged: both go.
    result = installed(root)
    assert "kept the host identity" in result.stdout
    result = qnix("uninstall", "--root", str(root), "--purge")
    assert result.returncode == 0, result.stderr
    assert "removed the state root /var/lib/qnix" in result.stdout
    assert not (root / "var/lib/qnix").exists()
    # The identity was there before this install: purging the state does not take it.
    assert (root / "etc/qnix/host.agekey").exists()


def test_purge_removes_the_identity_install_made(root: Path) -> None:
    installed(root)
    (root / "var/lib/qnix/audit/events.jsonl").write_text("{}\n")
    result = qnix("uninstall", "--root", str(root), "--purge")
    assert result.returncode == 0, result.stderr
    assert not (root / "etc/qnix").exists()
    assert not (root / "var/lib/qnix").exists()


def test_a_spec_that_forwards_the_audit_log_gets_its_rsyslog_configuration(root: Path) -> None:
    installed(root, "--spec", str(OFFICE))
    text = (root / "etc/rsyslog.d/qnix.conf").read_text()
    workstation = load(OFFICE).workstation
    assert text == rsyslog_config(workstation, AUDIT_LOG)
    assert workstation.audit.remote_syslog is not None
    assert f'target="{workstation.audit.remote_syslog.hosts[0]}"' in text
    assert qnix("uninstall", "--root", str(root)).returncode == 0
    assert not (root / "etc/rsyslog.d/qnix.conf").exists()


AIDE_CONF = "var/lib/qnix/integrity/aide.conf"


def test_a_spec_gets_its_aide_configuration_where_the_integrity_check_reads_it(
    root: Path,
) -> None:
    before = listing(root, skip="/nowhere")
    result = installed(root, "--spec", str(OFFICE))
    assert "wrote /var/lib/qnix/integrity/aide.conf (the spec's AIDE configuration)" in (
        result.stdout.splitlines()
    )
    conf = root / AIDE_CONF
    # What `qnix integrity init` writes for this spec on the units' roots, the spec's own
    # aide_paths among what it covers.
    workstation = load(OFFICE).workstation
    assert conf.read_text() == aide_config(
        workstation,
        database_dir="/var/lib/qnix/integrity",
        generation_dir="/run/qnix/generation",
        state_root="/var/lib/qnix",
    )
    assert workstation.audit.aide_paths == ("/srv/office-share",)
    assert "\n/srv/office-share(/|\\z) QnixStatic\n" in conf.read_text()
    assert conf.stat().st_mode & 0o777 == 0o600
    assert conf.parent.stat().st_mode & 0o777 == 0o700
    # AIDE itself takes it.
    checked = run([need("aide"), f"--config={conf}", "--config-check"], check=False)
    assert checked.returncode == 0, checked.stderr
    # The integrity unit waits for the baseline init records, not for the folder install made.
    unit = (root / "etc/systemd/system/qnix-integrity.service").read_text()
    assert "\nConditionPathExists=/var/lib/qnix/integrity/aide.db\n" in unit
    assert "ConditionPathIsDirectory" not in unit

    result = qnix("uninstall", "--root", str(root))
    assert result.returncode == 0, result.stderr
    assert "removed /var/lib/qnix/integrity/aide.conf" in result.stdout.splitlines()
    # The host identity install made goes too: aide.conf is install's, not state encrypted to it.
    assert listing(root, skip="/nowhere") == before


def test_an_aide_configuration_init_wrote_is_kept(root: Path) -> None:
    conf = root / AIDE_CONF
    conf.parent.mkdir(parents=True, mode=0o700)
    conf.write_text("# written by qnix integrity init for the live generation\n")
    conf.chmod(0o600)
    result = installed(root, "--spec", str(OFFICE))
    assert "kept the AIDE configuration already in /var/lib/qnix/integrity/aide.conf" in (
        result.stdout.splitlines()
    )
    assert conf.read_text() == "# written by qnix integrity init for the live generation\n"
    assert qnix("uninstall", "--root", str(root)).returncode == 0
    assert conf.read_text() == "# written by qnix integrity init for the live generation\n"


def test_install_refuses_without_its_virtual_environment_and_twice(root: Path) -> None:
    before = listing(root)
    result = qnix("install", "--root", str(root))
    assert result.returncode == 1
    assert "opt/qnix/bin/qnix does not exist" in result.stderr
    assert "make install" in result.stderr
    assert listing(root) == before  # nothing written

    installed(root)
    again = qnix("install", "--root", str(root))
    assert again.returncode == 1
    assert "already installed" in again.stderr
    assert qnix("uninstall", "--root", str(root)).returncode == 0
    assert listing(root) == before

    result = qnix("uninstall", "--root", str(root))
    assert result.returncode == 1
    assert "not installed" in result.stderr


def test_a_bad_spec_stops_install_before_it_writes_anything(root: Path, tmp_path: Path) -> None:
    with_venv(root)
    before = listing(root)
    bad = tmp_path / "bad.toml"
    bad.write_text('[host]\nhostname = "Not A Hostname"\n')
    result = qnix("install", "--root", str(root), "--spec", str(bad))
    assert result.returncode == 2, result.stderr
    assert listing(root) == before


def test_uninstall_cleans_up_after_an_install_that_failed_half_way(root: Path) -> None:
    # A file where the host identity's folder should be: age-keygen cannot write the key.
    (root / "etc/qnix").write_text("not a folder\n")
    with_venv(root)
    before = listing(root)
    failed = qnix("install", "--root", str(root))
    assert failed.returncode == 1
    assert "age-keygen -o" in failed.stderr
    assert (root / "etc/systemd/system/qnix-boot.service").exists()  # written before it failed

    again = qnix("install", "--root", str(root))
    assert again.returncode == 1 and "already installed" in again.stderr
    result = qnix("uninstall", "--root", str(root))
    assert result.returncode == 0, result.stderr
    after = listing(root)
    # Gone: what install made, and the virtual environment (here the test's stand-in).
    assert sorted(set(before) - set(after)) == ["drwxr-xr-x /opt/qnix"]  # listed one deep
    assert [line for line in after if line not in before] == []
    assert (root / "etc/qnix").read_text() == "not a folder\n"


# ---- qnix pull --install-timer ---------------------------------------------------------------


def test_the_pull_timer_goes_beside_install_and_leaves_with_uninstall(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = listing(root, skip="/nowhere")
    installed(root)
    ran: list[tuple[str, ...]] = []

    def recorded(argv: list[str], **options: Any) -> Result:
        ran.append(tuple(argv))
        return run(argv, **options)

    monkeypatch.setattr(install_module, "run", recorded)
    outcome = install_module.install_pull_timer(root)

    tools: dict[services.Tool, str] = {
        "qnix": "/opt/qnix/bin/qnix",
        "systemd-run": need("systemd-run"),
    }
    units = root / "etc/systemd/system"
    for name, text in services.unit_files(tools, "pull").items():
        assert (units / name).read_text() == text
        assert (units / name).stat().st_mode & 0o777 == 0o644
    # Under a root systemd is not running: the link only, made offline.
    assert ran == [(need("systemctl"), f"--root={root}", "--quiet", "enable", "qnix-pull.timer")]
    assert (units / "timers.target.wants/qnix-pull.timer").readlink() == Path(
        "/etc/systemd/system/qnix-pull.timer"
    )
    assert outcome.done == (
        "wrote /etc/systemd/system/qnix-pull.service",
        "wrote /etc/systemd/system/qnix-pull.timer",
        "enabled qnix-pull.timer",
    )
    assert outcome.notes == (
        "this host follows no fleet repository yet: the timer runs `qnix pull` once "
        "`qnix pull --init URL --host NAME --signers FILE` has set it up",
    )
    with pytest.raises(QnixError, match="the pull timer is already installed"):
        install_module.install_pull_timer(root)

    # uninstall reads install's record, which now lists the pull units too.
    result = qnix("uninstall", "--root", str(root))
    assert result.returncode == 0, result.stderr
    assert "removed /etc/systemd/system/qnix-pull.timer" in result.stdout.splitlines()
    assert listing(root, skip="/nowhere") == before


def test_on_a_running_systemd_the_timer_is_loaded_and_started() -> None:
    """What `qnix pull --install-timer` runs on a booted systemd host (not this one): the
    manager reloads the new units, then the timer is enabled and started in one call."""
    systemctl = need("systemctl")
    assert install_module.timer_commands(Path("/"), True, ("qnix-pull.timer",)) == [
        [systemctl, "daemon-reload"],
        [systemctl, "enable", "--now", "qnix-pull.timer"],
    ]


def test_the_pull_timer_is_refused_without_systemd_or_before_install(root: Path) -> None:
    # This host was not booted with systemd (no /run/systemd/system): refused, nothing written.
    assert not Path("/run/systemd/system").exists()
    refused = qnix("pull", "--install-timer")
    assert (refused.returncode, refused.stdout, refused.stderr) == (
        1,
        "",
        "error: systemd is not running here: the pull timer needs it as the service manager\n"
        "  hint: on a host booted with systemd run this again; until then run `qnix pull` by "
        "hand or from another scheduler (docs/fleet.md)\n",
    )
    # Under a root, without `qnix install` first: nothing to put it beside.
    before = listing(root, skip="/nowhere")
    early = qnix("pull", "--install-timer", "--root", str(root))
    assert early.returncode == 1
    assert early.stderr == (
        f"error: qnix is not installed at {root}/opt/qnix (no installed.json)\n"
        "  hint: `make install` first: the pull timer goes beside its units\n"
    )
    assert listing(root, skip="/nowhere") == before
    # The CLI under a root does what the function above does.
    installed(root)
    done = qnix("pull", "--install-timer", "--root", str(root))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:3] == [
        "wrote /etc/systemd/system/qnix-pull.service",
        "wrote /etc/systemd/system/qnix-pull.timer",
        "enabled qnix-pull.timer",
    ]
    assert qnix("uninstall", "--root", str(root)).returncode == 0
    assert listing(root, skip="/nowhere") == before
