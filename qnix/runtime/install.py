"""qnix installed on a systemd host that is not NixOS (`qnix install`, `qnix uninstall`).

`make install` makes qnix's own virtual environment (VENV) and runs `VENV/bin/qnix install`,
which puts in place, under `root` (`/`, or a folder that stands for it, as
`systemctl --root` takes one):

* the command `/usr/local/bin/qnix`, a link to VENV's;
* the units of qnix.compile.services in /etc/systemd/system, enabled (`systemctl --root`,
  which needs no running systemd); on a booted systemd host also loaded and the timers started;
* /etc/tmpfiles.d/qnix.conf, and its folders made now (`systemd-tmpfiles --create`);
* /etc/rsyslog.d/qnix.conf when the spec given forwards the audit log to a remote syslog;
* with a spec, its AIDE configuration where `qnix integrity init` writes it and the integrity
  unit's `qnix integrity check` reads it (<state root>/integrity/aide.conf), unless one is
  there already (init writes it for the live generation, which is what the baseline has);
* the host's age identity /etc/qnix/host.agekey (0400), made when missing.

`qnix pull --install-timer` adds the pull units (qnix-pull.service and its timer) on a desk
that follows a fleet repository, and records them in the same file.

VENV/installed.json records what install made, so that uninstall removes exactly that, the
virtual environment last. The state root stays unless `purge`; so does a host identity install
made while the state root holds files other than install's own (the age copies of the
compartments' homes and the spec's secrets are encrypted to it), and one that was there before
install.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Set
from dataclasses import dataclass, field
from pathlib import Path

from qnix.compile import services
from qnix.errors import QnixError
from qnix.runner import require_tool, run
from qnix.runtime import integrity
from qnix.runtime.paths import RuntimePaths

VENV = Path("/opt/qnix")
COMMAND_LINK = Path("/usr/local/bin/qnix")
UNIT_DIR = Path("/etc/systemd/system")
TMPFILES_FILE = Path("/etc/tmpfiles.d") / services.TMPFILES_NAME
RSYSLOG_FILE = Path("/etc/rsyslog.d/qnix.conf")
IDENTITY = Path(services.HOST_IDENTITY)
STATE_ROOT = Path(services.STATE_ROOT)
# The roots the units run qnix with (its defaults).
UNIT_PATHS = RuntimePaths(state_root=STATE_ROOT, run_root=Path(services.RUN_ROOT))
AIDE_FILE = integrity.own_files(UNIT_PATHS).config
RECORD_NAME = "installed.json"
# Where a booted systemd keeps its runtime state (sd_booted(3)).
SYSTEMD_RUNNING = Path("/run/systemd/system")


def under(root: Path, path: Path) -> Path:
    """`path` of the host, inside `root`."""
    return root / path.relative_to("/")


@dataclass
class Record:
    """What install made: files and links, folders it created, the units it enabled."""

    files: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    units: list[str] = field(default_factory=list)
    made_identity: bool = False

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True) + "\n"


@dataclass(frozen=True)
class Outcome:
    """What was done, line by line, for the CLI to print; `notes` are what the admin must do."""

    done: tuple[str, ...]
    notes: tuple[str, ...]


def systemd_running(root: Path) -> bool:
    return root == Path("/") and SYSTEMD_RUNNING.is_dir()


def _missing_folders(path: Path) -> list[Path]:
    """The folders above `path` that do not exist yet, outermost first."""
    missing = []
    for parent in path.parents:
        if parent.exists():
            break
        missing.append(parent)
    return list(reversed(missing))


def _write(root: Path, path: Path, text: str, mode: int, record: Record) -> None:
    target = under(root, path)
    for folder in _missing_folders(target):
        folder.mkdir(mode=0o755)
        record.folders.append(str(folder))
    target.write_text(text)
    target.chmod(mode)
    record.files.append(str(target))


@dataclass(frozen=True)
class SpecFiles:
    """The configuration files a spec asks for: rsyslog forwarding ("" for none), aide.conf."""

    rsyslog: str = ""
    aide: str = ""


def _spec_files(spec: Path | None) -> SpecFiles:
    if spec is None:
        return SpecFiles()
    from qnix.compile.inputs import load
    from qnix.compile.rsyslog import AUDIT_LOG, rsyslog_config

    ws = load(spec).workstation
    return SpecFiles(
        rsyslog=rsyslog_config(ws, AUDIT_LOG), aide=integrity.config_text(UNIT_PATHS, ws)
    )


def _put_aide_config(root: Path, text: str, record: Record, done: list[str]) -> None:
    """aide.conf in the integrity folder (0700, as init makes it), after the state root."""
    target = under(root, AIDE_FILE)
    if target.exists():
        done.append(f"kept the AIDE configuration already in {AIDE_FILE}")
        return
    if not target.parent.exists():
        target.parent.mkdir(mode=0o700)
        record.folders.append(str(target.parent))
    _write(root, AIDE_FILE, text, 0o600, record)
    done.append(f"wrote {AIDE_FILE} (the spec's AIDE configuration)")


def _put_in_place(
    root: Path, program: Path, configs: SpecFiles, record: Record, done: list[str]
) -> None:
    """The link, the files, the folders, the identity and the enabled units, each recorded
    in `record` as soon as it is made."""
    link = under(root, COMMAND_LINK)
    for folder in _missing_folders(link):
        folder.mkdir(mode=0o755)
        record.folders.append(str(folder))
    link.symlink_to(program)
    record.files.append(str(link))
    done.append(f"linked {COMMAND_LINK} -> {program}")

    tools: dict[services.Tool, str] = {
        "qnix": str(program),
        "age-keygen": require_tool("age-keygen", "age"),
    }
    for name, text in sorted(services.unit_files(tools).items()):
        _write(root, UNIT_DIR / name, text, 0o644, record)
        done.append(f"wrote {UNIT_DIR / name}")
    _write(root, TMPFILES_FILE, services.tmpfiles_conf(), 0o644, record)
    done.append(f"wrote {TMPFILES_FILE}")
    if configs.rsyslog:
        _write(root, RSYSLOG_FILE, configs.rsyslog, 0o644, record)
        done.append(f"wrote {RSYSLOG_FILE} (the audit log to the spec's remote syslog)")

    # The folders of the tmpfiles rules, now (at boot systemd makes them again).
    for path in map(Path, _tmpfiles_paths()):
        target = under(root, path)
        if not target.exists():
            new = [f for f in _missing_folders(target) if str(f) not in record.folders]
            record.folders += [str(f) for f in [*new, target]]
    tmpfiles = require_tool("systemd-tmpfiles", "systemd")
    run([tmpfiles, f"--root={root}", "--create", str(under(root, TMPFILES_FILE))])
    if configs.aide:
        _put_aide_config(root, configs.aide, record, done)

    identity = under(root, IDENTITY)
    if identity.exists():
        done.append(f"kept the host identity {IDENTITY}")
    else:
        record.files.append(str(identity))
        record.made_identity = True
        run([tools["age-keygen"], "-o", str(identity)])
        identity.chmod(0o400)
        done.append(f"made the host identity {IDENTITY} (0400)")

    units = list(services.enabled_units())
    unit_dir = under(root, UNIT_DIR)
    before = {p for p in unit_dir.iterdir() if p.is_dir()}
    record.units = units
    _systemctl(root, "enable", *units)
    # The targets' .wants folders enable made.
    record.folders += sorted(str(p) for p in unit_dir.iterdir() if p.is_dir() and p not in before)
    done.append("enabled " + " ".join(units))


def install(root: Path = Path("/"), *, venv: Path = VENV, spec: Path | None = None) -> Outcome:
    """Install the units, the command link, the configuration and the host identity."""
    venv_dir = under(root, venv)
    program = venv / "bin" / "qnix"
    if not under(root, program).exists():
        raise QnixError(
            f"{under(root, program)} does not exist",
            hint="`make install` makes the virtual environment first, then runs this",
        )
    if (venv_dir / RECORD_NAME).exists():
        raise QnixError(
            f"qnix is already installed ({venv_dir / RECORD_NAME})",
            hint="`qnix uninstall` first, or `make uninstall install` to reinstall",
        )
    configs = _spec_files(spec)  # a bad spec stops install before it writes anything
    link = under(root, COMMAND_LINK)
    if link.is_symlink() or link.exists():
        raise QnixError(f"{link} exists", hint="remove it, or uninstall the other qnix first")
    record = Record()
    done: list[str] = []
    notes: list[str] = []
    try:
        _put_in_place(root, program, configs, record, done)
    finally:
        # Also after a failure: `qnix uninstall` then removes what was made.
        (venv_dir / RECORD_NAME).write_text(record.to_json())
    units = record.units

    if systemd_running(root):
        _systemctl(root, "daemon-reload")
        timers = [u for u in units if u.endswith(".timer")]
        _systemctl(root, "start", *timers)
        done.append("started " + " ".join(timers))
    elif root == Path("/"):
        notes.append(
            "systemd is not running here: `systemctl daemon-reload` and starting "
            "the timers were not possible; they start at the next boot"
        )
    notes.append(
        "`qnix apply SPEC` brings the host to a spec; from then on qnix-boot brings it back "
        "to that generation at each boot"
    )
    if spec is None:
        notes.append("no --spec: no rsyslog forwarding and no AIDE configuration were written")
    notes.append("`qnix integrity init` records the AIDE baseline the daily check compares with")
    return Outcome(tuple(done), tuple(notes))


def timer_commands(root: Path, running: bool, timers: tuple[str, ...]) -> list[list[str]]:
    """The systemctl commands that enable (and, with systemd running, start) `timers` whose
    units were just written under `root`."""
    systemctl = require_tool("systemctl", "systemd")
    if running:
        return [[systemctl, "daemon-reload"], [systemctl, "enable", "--now", *timers]]
    # Offline: only the links, in root's /etc/systemd/system (as install enables its units).
    return [[systemctl, f"--root={root}", "--quiet", "enable", *timers]]


def install_pull_timer(root: Path = Path("/"), *, venv: Path = VENV) -> Outcome:
    """qnix-pull.service and .timer (qnix.compile.services) in /etc/systemd/system, the timer
    enabled and started, both added to install's record so that `qnix uninstall` removes
    them. On the host itself systemd must be running: the pull's compartments live in scopes
    its manager makes."""
    running = systemd_running(root)
    if root == Path("/") and not running:
        raise QnixError(
            "systemd is not running here: the pull timer needs it as the service manager",
            hint="on a host booted with systemd run this again; until then run `qnix pull` "
            "by hand or from another scheduler (docs/fleet.md)",
        )
    venv_dir = under(root, venv)
    record_file = venv_dir / RECORD_NAME
    if not record_file.exists():
        raise QnixError(
            f"qnix is not installed at {venv_dir} (no {RECORD_NAME})",
            hint="`make install` first: the pull timer goes beside its units",
        )
    record = Record(**json.loads(record_file.read_text()))
    tools: dict[services.Tool, str] = {
        "qnix": str(venv / "bin" / "qnix"),
        "systemd-run": require_tool("systemd-run", "systemd"),
    }
    files = services.unit_files(tools, "pull")
    timers = services.enabled_units("pull")
    if any(str(under(root, UNIT_DIR / name)) in record.files for name in files):
        raise QnixError(
            "the pull timer is already installed",
            hint="`qnix uninstall` removes it with the rest of qnix",
        )
    done: list[str] = []
    unit_dir = under(root, UNIT_DIR)
    before = {p for p in unit_dir.iterdir() if p.is_dir()}
    try:
        for name, text in sorted(files.items()):
            _write(root, UNIT_DIR / name, text, 0o644, record)
            done.append(f"wrote {UNIT_DIR / name}")
        record.units += timers
        for command in timer_commands(root, running, timers):
            run(command, timeout=300)
        done.append(("enabled and started " if running else "enabled ") + " ".join(timers))
    finally:
        # The .wants folder enable made, if it was not there; and the record, also after a
        # failure, so that `qnix uninstall` removes what was made.
        record.folders += sorted(
            str(p) for p in unit_dir.iterdir() if p.is_dir() and p not in before
        )
        record_file.write_text(record.to_json())
    notes = []
    # The units' condition: what `qnix pull --init` writes.
    if not under(root, Path(services.PULL_DIR) / "trust.json").exists():
        notes.append(
            "this host follows no fleet repository yet: the timer runs `qnix pull` once "
            "`qnix pull --init URL --host NAME --signers FILE` has set it up"
        )
    return Outcome(tuple(done), tuple(notes))


def _tmpfiles_paths() -> list[str]:
    return [rule.split()[1] for rule in services.TMPFILES_RULES]


def _systemctl(root: Path, verb: str, *units: str) -> None:
    systemctl = require_tool("systemctl", "systemd")
    if verb in ("enable", "disable"):
        # Offline: links in root's /etc/systemd/system, whether or not systemd runs.
        run([systemctl, f"--root={root}", "--quiet", verb, *units])
    else:
        run([systemctl, verb, *units], timeout=300)


def _holds_files(folder: Path, besides: Set[str]) -> bool:
    """Whether `folder` holds a file that is not one of `besides`."""
    return folder.is_dir() and any(
        (p.is_file() or p.is_symlink()) and str(p) not in besides for p in folder.rglob("*")
    )


def uninstall(root: Path = Path("/"), *, venv: Path = VENV, purge: bool = False) -> Outcome:
    """Remove what install made (its record says what), the virtual environment last; the
    state root and the host identity only as the module docstring says."""
    venv_dir = under(root, venv)
    record_file = venv_dir / RECORD_NAME
    if not record_file.exists():
        raise QnixError(
            f"qnix is not installed at {venv_dir} (no {RECORD_NAME})",
            hint="`qnix uninstall` removes only what `qnix install` recorded",
        )
    record = Record(**json.loads(record_file.read_text()))
    done: list[str] = []
    notes: list[str] = []
    if systemd_running(root):
        # Stopping qnix-boot runs `qnix down`: the compartments stop, their state stays.
        _systemctl(root, "stop", *reversed(record.units))
        done.append("stopped " + " ".join(record.units))
    if record.units:
        _systemctl(root, "disable", *record.units)
        done.append("disabled " + " ".join(record.units))

    identity = str(under(root, IDENTITY))
    state_root = under(root, STATE_ROOT)
    keep_identity = (
        record.made_identity and not purge and _holds_files(state_root, set(record.files))
    )
    for name in reversed(record.files):
        if name == identity and keep_identity:
            notes.append(
                f"kept {IDENTITY}: the state root {STATE_ROOT} holds files encrypted to it "
                "(`qnix uninstall --purge` removes both)"
            )
            continue
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):  # never made
            os.unlink(name)
        done.append(f"removed {Path('/') / Path(name).relative_to(root)}")
    if purge and state_root.exists():
        shutil.rmtree(state_root)
        done.append(f"removed the state root {STATE_ROOT}")
    for folder in reversed(record.folders):
        # Only when empty: whatever someone put there since is theirs (an empty state root,
        # which install made, goes too).
        with contextlib.suppress(OSError):
            Path(folder).rmdir()
    if state_root.exists():
        notes.append(f"kept the state root {STATE_ROOT}")
    if systemd_running(root):
        _systemctl(root, "daemon-reload")
    shutil.rmtree(venv_dir)
    done.append(f"removed {venv}")
    return Outcome(tuple(done), tuple(notes))
