"""What a compartment can still reach of the host once `qnix run` hands it a command: the
caller's descriptors, the host's run root, a command that outlives its client. Each attack runs
from inside a real compartment on the namespace and the container level (the VM's are in
tests/runtime/test_vm.py), with its control: the same attack against what the compartment may
touch, or through the one protection taken away.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qnix.runtime import agent, live, quickrun
from qnix.runtime.backends import namespace as ns
from qnix.runtime.paths import RuntimePaths
from tests.conftest import need
from tests.runtime.livehost import QNIX, LiveHost

# A run root on a small file system of its own: what a compartment could fill, if anything.
RUN_ROOT_MB = 16
SPEC = """\
[host]
hostname = "lab"
subnet = "10.206.0.0/16"

[compartments.work]
memory_mb = 256

[compartments.office]
isolation = "container"
memory_mb = 256
"""
LEVELS = {"namespace": "work", "container": "office"}

# Waits up to 10 s for `path`, then a background command inside rewrites its descriptor 1
# (truncate, then write at offset 0) and says how that went in `path`.done.
LATE_WRITER = """\
import os, sys, time
marker = sys.argv[1]
while not os.path.exists(marker):
    time.sleep(0.05)
try:
    os.ftruncate(1, 0)
    os.pwrite(1, b"REWRITTEN\\n", 0)
    said = "rewrote"
except OSError as exc:
    try:
        os.write(1, b"LATE\\n")
        said = "wrote late"
    except OSError as exc:
        said = f"refused: {exc.strerror}"
# Whole or not at all: the test reads the answer as soon as its name appears.
with open(marker + ".part", "w") as handle:
    handle.write(said)
os.rename(marker + ".part", marker + ".done")
"""

# Every mount inside on the run root's file system (major:minor), and what writing `size`
# bytes into it gave.
RUN_ROOT_FILLER = """\
import json, os, sys
device, size = sys.argv[1], int(sys.argv[2])
found = {}
with open("/proc/self/mountinfo") as handle:
    for line in handle:
        fields = line.split()
        if fields[2] != device:
            continue
        where = fields[4]
        target = os.path.join(where, "fill") if os.path.isdir(where) else where + ".fill"
        try:
            with open(target, "wb") as out:
                out.write(bytes(size))
            found[where] = "written"
            os.unlink(target)
        except OSError as exc:
            found[where] = exc.strerror
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def host() -> Iterator[LiveHost]:
    made = LiveHost()
    try:
        # The run root in a small tmpfs, as /run/qnix is in the host's /run.
        small = made.base / "small-run"
        small.mkdir()
        options = f"size={RUN_ROOT_MB}m,mode=0755"
        subprocess.run(
            [need("mount"), "-t", "tmpfs", "-o", options, "qnixtest", str(small)], check=True
        )
        made.mounts.append(small)
        made.paths = RuntimePaths(
            made.paths.state_root, small / "run", made.paths.netns_prefix, made.host_netns
        ).checked()
        made.ok("apply", str(made.spec(SPEC)))
        for name in LEVELS.values():
            made.ok("start", name)
        yield made
    finally:
        made.close()


def wait_for(path: Path, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)
    return path.read_text()


def home_inside(host: LiveHost, name: str) -> str:
    return str(json.loads(host.paths.state_file(name).read_text())["cwd"])


# ---- 1. the caller's output file ---------------------------------------------------------------


def late_writer(host: LiveHost, name: str, marker: str) -> list[str]:
    (host.paths.home(name) / "late.py").write_text(LATE_WRITER)
    script = f"{home_inside(host, name)}/late.py"
    background = f"setsid python3 {script} {marker} </dev/null 2>/dev/null &"
    return ["sh", "-c", f"echo normal; {background}"]


def output_file_after_the_end(host: LiveHost, name: str, out: Path) -> None:
    """`qnix run NAME` appends to `out`; what the command leaves running tries to rewrite
    `out` once `qnix run` has returned."""
    out.write_text("admin-data-line\n")
    marker = f"{home_inside(host, name)}/go"
    with out.open("ab") as appended:
        result = subprocess.run(
            [QNIX, "run", name, "--", *late_writer(host, name, marker)],
            stdout=appended,
            stderr=subprocess.PIPE,
            env=host.env,
            timeout=120,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    # The output reached the file while the command ran (the relay works) ...
    assert out.read_text() == "admin-data-line\nnormal\n"
    (host.paths.home(name) / "go").touch()
    said = wait_for(host.paths.home(name) / "go.done")
    # ... and what it left running holds a pipe to nobody: no file of ours to truncate.
    assert said.startswith("refused:"), said
    assert out.read_text() == "admin-data-line\nnormal\n"
    (host.paths.home(name) / "go").unlink()
    (host.paths.home(name) / "go.done").unlink()


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_a_command_cannot_touch_our_output_file_after_it_ends(
    host: LiveHost, level: str, tmp_path: Path
) -> None:
    output_file_after_the_end(host, LEVELS[level], tmp_path / "late.txt")


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_control_with_our_descriptors_passed_in_the_file_is_rewritten(
    host: LiveHost, level: str, tmp_path: Path
) -> None:
    """The same attack when the client hands the agent its own descriptors, as `qnix run`
    did before it relayed stdio: the compartment rewrites the admin's file after the end."""
    name = LEVELS[level]
    out = tmp_path / "late.txt"
    out.write_text("admin-data-line\n")
    marker = f"{home_inside(host, name)}/go"
    state = quickrun.running_state(host.paths, name)
    assert state is not None
    sock = agent.connect(str(host.paths.agent_socket(name)), peer_uid=state["host_uid"])
    null = os.open(os.devnull, os.O_RDONLY)
    written = os.open(out, os.O_WRONLY | os.O_APPEND)
    try:
        request = {"op": "exec", "argv": late_writer(host, name, marker), "env": state["env"]}
        agent.send_message(sock, {**request, "cwd": state["cwd"]}, [null, written, written])
        answers = [agent.recv_message(sock)[0]["op"], agent.recv_message(sock)[0]["op"]]
    finally:
        sock.close()
        os.close(null)
        os.close(written)
    assert answers == ["started", "exited"]
    (host.paths.home(name) / "go").touch()
    assert wait_for(host.paths.home(name) / "go.done") == "rewrote"
    assert out.read_text() == "REWRITTEN\n"
    (host.paths.home(name) / "go").unlink()
    (host.paths.home(name) / "go.done").unlink()


def test_output_is_relayed_whole_and_binary_safe(host: LiveHost) -> None:
    """Through the relay: every byte value, more than a pipe holds, both streams, stdin in."""
    data = bytes(range(256)) * 1024  # 256 KiB
    result = subprocess.run(
        [QNIX, "run", "work", "--", "sh", "-c", "cat; echo done >&2; exit 7"],
        input=data,
        capture_output=True,
        env=host.env,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (7, data, b"done\n")


# ---- 2. the host's run root -------------------------------------------------------------------


def device_of(path: Path) -> str:
    info = os.stat(path)
    return f"{os.major(info.st_dev)}:{os.minor(info.st_dev)}"


def fill_from_inside(host: LiveHost, name: str) -> dict[str, str]:
    (host.paths.home(name) / "fill.py").write_text(RUN_ROOT_FILLER)
    size = str(RUN_ROOT_MB << 20)
    script = f"{home_inside(host, name)}/fill.py"
    found = host.ok("run", name, "--", "python3", script, device_of(host.paths.run_root), size)
    return dict(json.loads(found))


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_a_compartment_cannot_write_into_the_run_root(host: LiveHost, level: str) -> None:
    name = LEVELS[level]
    found = fill_from_inside(host, name)
    # The call socket's folder is there, read-only; nothing of the run root takes a byte.
    assert found, "the call socket's folder should be found on the run root"
    assert "written" not in found.values(), found
    # Control: a file the size of the whole run root fits where the compartment may write.
    size = RUN_ROOT_MB << 20
    fits = host.ok("run", name, "--", "sh", "-c", f"head -c {size} /dev/zero > big; wc -c < big")
    assert int(fits) == size
    host.ok("run", name, "--", "rm", "big")


def test_control_a_writable_run_root_folder_is_found_and_filled(host: LiveHost) -> None:
    """The same probe in a sandbox with one writable bind of a run-root folder, as the agent's
    socket folder was: it finds the folder and fills it."""
    folder = host.paths.run_root / "writable"
    folder.mkdir()
    os.chown(folder, 0x70000000 + 0x7E00, 0x70000000 + 0x7E00)
    plan = ns.SandboxPlan(
        name="probe", home=None, user="user", extra_binds=((str(folder), "/run/writable"),)
    )
    size = str(1 << 20)
    python, prefix = live.agent_interpreter()  # what a compartment's agent runs with
    command = [python, "-I", "-S", "/opt/fill.py", device_of(host.paths.run_root), size]
    script = ns.sealed_memfd(RUN_ROOT_FILLER.encode(), "fill")
    system = (
        *ns.host_system_binds(interpreter_prefix=prefix),
        ns.RoData(script, "/opt/fill.py"),
    )
    try:
        with ns.prepare(plan, command, system=system) as prepared:
            process = ns.launch(
                prepared.argv,
                netns_path=None,
                cgroup=None,
                pass_fds=(*prepared.fds, script),
                run_as=ns.HostIdentity(0x70000000 + 0x7E00, 0x70000000 + 0x7E00),
                stdout=subprocess.PIPE,
            )
        out, _ = process.communicate(timeout=60)
        assert json.loads(out) == {"/run/writable": "written"}
    finally:
        os.close(script)
        for entry in folder.iterdir():
            entry.unlink()
        folder.rmdir()


# ---- 3. a command whose client is gone ---------------------------------------------------------


def sleeper(host: LiveHost, name: str) -> tuple[subprocess.Popen[bytes], int]:
    """`qnix run NAME -- sleep 300`, and the sleep's pid inside."""
    pid_file = host.paths.home(name) / "sleeper.pid"
    pid_file.unlink(missing_ok=True)
    client = subprocess.Popen(
        [
            QNIX,
            "run",
            name,
            "--",
            "sh",
            "-c",
            "echo $$ > .pid; mv .pid sleeper.pid; exec sleep 300",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        env=host.env,
    )
    return client, int(wait_for(pid_file))


def alive_inside(host: LiveHost, name: str, pid: int) -> bool:
    check = f"test -d /proc/{pid} && grep -q '^State:.[^Z]' /proc/{pid}/status"
    return host.qnix("run", name, "--", "sh", "-c", check).returncode == 0


def killed_client(host: LiveHost, name: str) -> None:
    """`qnix run NAME -- sleep 300` runs while its client lives, and ends when it is killed."""
    client, pid = sleeper(host, name)
    try:
        # Control: while its client lives, the command runs.
        assert alive_inside(host, name, pid)
        client.send_signal(signal.SIGKILL)
        client.wait(timeout=10)
        deadline = time.monotonic() + 30
        while alive_inside(host, name, pid):
            assert time.monotonic() < deadline, "the command outlived its killed client"
            time.sleep(0.1)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_a_command_ends_when_its_client_is_killed(host: LiveHost, level: str) -> None:
    killed_client(host, LEVELS[level])


def test_a_full_run_root_is_said_plainly(host: LiveHost) -> None:
    """Whatever fills the run root (the admin's own files here), qnix says so in one line."""
    python = json.loads(host.paths.keeper_config("work").read_text())["interpreter"]
    host.ok(
        *("run", "work", "--", python, "/opt/qnix-agent/clipboard.py", "set"),
        input="to the host\n",
    )
    filler = host.paths.run_root / "filler"
    try:
        with filler.open("wb") as handle, contextlib.suppress(OSError):
            while True:
                handle.write(bytes(1 << 20))
        result = host.qnix("clip", "copy", "work")
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        assert "error: No space left on device" in result.stderr
        assert "hint: its file system is full" in result.stderr
    finally:
        filler.unlink()
    # Control: with room again, the same copy works.
    assert host.qnix("clip", "copy", "work").returncode == 0
