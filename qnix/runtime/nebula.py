"""A compartment's identity on the overlay: Nebula, run by its keeper inside the compartment's
own network namespace (never the host's), with a certificate `nebula-cert` signs at each start.

At a start the keeper (root) makes a folder of its own in the compartment's run folder, which
nothing of the compartment sees: the generation's configuration for the compartment
(`overlay/nebula/compartments/<name>.yml`, qnix.compile.overlay), the CA's certificate and a
fresh certificate and key for the compartment, with its overlay address and its groups. nebula
runs there (the configuration names its certificates relative to it), in the compartment's
network namespace, and ends with the keeper: when the compartment stops, and by its
parent-death signal if the keeper is killed. The overlay's interface (`nebula1`) exists only in
that namespace, so the compartment's programs use it like any interface and the host has none.

The certificate authority is the spec's (`ca_cert`, `ca_key` on this host) or one qnix makes
once under the state root (`overlay/ca.crt`, `overlay/ca.key`, root's only), limited to the
spec's groups and overlay subnet: a certificate it signs can claim no other group and no other
address, whatever asks it to. The office server adds that `ca.crt` to the CAs it trusts.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import shlex
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from qnix.compile.overlay import (
    CA_CERT,
    HOST_CERT,
    HOST_KEY,
    compartment_config_file,
    groups_of,
)
from qnix.errors import QnixError
from qnix.runner import require_tool, run
from qnix.runtime.paths import RuntimePaths
from qnix.spec.model import Workstation

FOLDER_NAME = "nebula"
CONFIG_NAME = "config.yml"
LOG_NAME = "nebula.log"
# What nebula says once its interface is up and it handles packets.
READY_LINE = "Nebula interface is active"
READY_TIMEOUT = 15.0
STOP_GRACE = 5.0
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)
log = logging.getLogger("qnix.run")


def ca_folder(paths: RuntimePaths) -> Path:
    return paths.state_root / "overlay"


def certificate_authority(paths: RuntimePaths, ws: Workstation) -> tuple[Path, Path]:
    """The CA's certificate and key: the spec's, or the one qnix made (made now if missing)."""
    overlay = ws.overlay
    if overlay is None:
        raise QnixError("the spec has no [overlay]", hint="add [overlay] (docs/fleet.md)")
    if overlay.ca_cert is not None and overlay.ca_key is not None:
        return Path(overlay.ca_cert), Path(overlay.ca_key)
    folder = ca_folder(paths)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert, key = folder / CA_CERT, folder / "ca.key"
    with _locked(folder / ".lock"):  # two keepers starting at once make one CA
        if not key.exists():
            run(make_ca_argv(ws, cert, key))
    return cert, key


def make_ca_argv(ws: Workstation, cert: Path, key: Path) -> list[str]:
    """`nebula-cert ca` for the CA qnix makes: it can sign the spec's groups and subnet only."""
    assert ws.overlay is not None
    return [
        require_tool("nebula-cert", "nebula"),
        "ca",
        "-name",
        f"qnix {ws.host.hostname}",
        "-groups",
        ",".join(groups_of(ws)),
        "-ips",
        ws.overlay.subnet,
        "-out-crt",
        str(cert),
        "-out-key",
        str(key),
    ]


def sign_argv(ws: Workstation, name: str, ca: tuple[Path, Path], folder: Path) -> list[str]:
    """`nebula-cert sign` for a compartment: its overlay address (in the subnet's prefix) and
    its groups, the name `<compartment>.<host>`."""
    compartment = ws.compartments[name]
    assert ws.overlay is not None and compartment.overlay is not None
    prefix = ws.overlay.subnet.partition("/")[2]
    return [
        require_tool("nebula-cert", "nebula"),
        "sign",
        "-ca-crt",
        str(ca[0]),
        "-ca-key",
        str(ca[1]),
        "-name",
        f"{name}.{ws.host.hostname}",
        "-ip",
        f"{compartment.overlay.address}/{prefix}",
        "-groups",
        ",".join(compartment.overlay.groups),
        "-out-crt",
        str(folder / HOST_CERT),
        "-out-key",
        str(folder / HOST_KEY),
    ]


def prepare(paths: RuntimePaths, ws: Workstation, name: str, run_dir: Path) -> Path:
    """The compartment's nebula folder in its run folder: configuration, CA certificate, and
    a certificate and key signed now."""
    config = paths.generation_dir / compartment_config_file(name)
    ca = certificate_authority(paths, ws)
    folder = run_dir / FOLDER_NAME
    folder.mkdir(mode=0o700)
    shutil.copyfile(config, folder / CONFIG_NAME)
    shutil.copyfile(ca[0], folder / CA_CERT)
    try:
        run(sign_argv(ws, name, ca, folder))
    except QnixError as exc:
        raise QnixError(
            f"the overlay's CA would not sign compartment {name}'s certificate: {exc.message}",
            hint="a CA qnix made signs only the groups and subnet the spec had then: remove "
            f"{ca_folder(paths)} to make a new one, and give the office server its ca.crt",
        ) from exc
    return folder


def nebula_argv() -> list[str]:
    return [require_tool("nebula", "nebula"), "-config", CONFIG_NAME]


@dataclass
class Running:
    """A nebula process and what tells that its interface is up."""

    process: subprocess.Popen[str]
    ready: threading.Event
    log: Path


def _in_namespace(netns_fd: int) -> Callable[[], None]:
    """Between fork and exec: enter the compartment's network namespace, and die with the
    keeper (SIGTERM when the thread that started us ends)."""

    def child() -> None:
        if _libc.setns(netns_fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")

    return child


def _copy_log(process: subprocess.Popen[str], log: Path, ready: threading.Event) -> None:
    """nebula's output into its log file; `ready` once it says its interface is active."""
    assert process.stdout is not None
    with log.open("a") as out:
        for line in process.stdout:
            out.write(line)
            out.flush()
            if READY_LINE in line:
                ready.set()


def start(folder: Path, netns_path: str) -> Running:
    """nebula in the namespace at `netns_path`, from `folder`; returns once its interface is
    up (QnixError with its last words if it ends or takes too long)."""
    argv = nebula_argv()
    # What --debug shows, as `ip netns exec` would run it by hand.
    log.debug("$ (cd %s && nsenter --net=%s %s)", folder, netns_path, shlex.join(argv))
    netns_fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        process = subprocess.Popen(
            argv,
            cwd=folder,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=_in_namespace(netns_fd),  # setns must happen in the child
        )
    finally:
        os.close(netns_fd)
    running = Running(process, threading.Event(), folder / LOG_NAME)
    threading.Thread(
        target=_copy_log, args=(process, running.log, running.ready), daemon=True
    ).start()
    if not _wait_ready(running):
        end(running)
        said = running.log.read_text(errors="replace").strip().splitlines()[-5:]
        raise QnixError(
            "nebula did not bring the overlay's interface up: " + " | ".join(said),
            hint=f"its whole output is in {running.log} while the compartment runs",
        )
    return running


def _wait_ready(running: Running) -> bool:
    deadline = READY_TIMEOUT
    step = 0.05
    while deadline > 0:
        if running.ready.wait(step):
            return True
        if running.process.poll() is not None:
            return running.ready.is_set()
        deadline -= step
    return False


def start_for(
    paths: RuntimePaths, ws: Workstation, name: str, run_dir: Path, netns: str
) -> Running | None:
    """What the keeper calls at a start: nebula for a compartment on the overlay, else None."""
    compartment = ws.compartments.get(name)
    if ws.overlay is None or compartment is None or compartment.overlay is None:
        return None
    return start(prepare(paths, ws, name, run_dir), netns)


def end(running: Running | None) -> None:
    if running is None:
        return
    running.process.terminate()
    try:
        running.process.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        running.process.kill()
        running.process.wait()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
