"""How fast a compartment starts and runs a command, beside the raw tools in one run.

Each figure is the median of several runs of a fresh process (after one warm-up run):
  * `qnix dispose -- true` (the whole CLI: a preloaded disposable taken from the pool, its
    command, its end; before each run the pool is refilled and settled, untimed — the refill
    happens behind the command, as Qubes preloads disposables),
  * `qnix dispose --template cold -- true` (no preloaded disposable: namespace, link, nft
    elements and sandbox built for the command and removed after it),
  * `qnix run work -- true` (`work` already running),
  * a bare `bwrap` sandbox running /bin/true,
  * `unshare` of the user, pid, ipc, uts, net and mount namespaces running /bin/true,
  * `systemd-nspawn` running /bin/true in a minimal tree (when it can run on this host),
  * `qnix run box -- true` (`box`, a container compartment under systemd-nspawn, running),
  * `qnix run vmbox -- true` (`vmbox`, a VM compartment under QEMU, running),
  * `qnix restart vmbox` (a VM's stop and boot up to its agent's hello) beside a bare QEMU
    booting the same kernel with a busybox initramfs whose /init powers off at once,
  * the interpreter's own start (`python -c pass`, the floor of any Python CLI).
QEMU uses KVM when /dev/kvm is usable, else TCG; QNIX_VM_ACCEL=tcg chooses TCG (for a host
whose nested KVM hangs guests).
It then prints the issue's targets: dispose within the interpreter's start plus 3 bare bwraps,
run within the interpreter's start plus 10 ms, a VM's restart within 1.3 x the bare QEMU boot.

qnix runs on a stand-in host, as the live tests do: temporary state and run roots, a network
namespace of its own playing the host, and a namespace prefix of its own; all of it is removed
at the end, also on error. Run it as root: `python bench/runtime.py`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

RUNS = 15
VM_BOOTS = 3
VM_RESTART_TARGET = 1.3  # x the bare QEMU boot of the same kernel, measured in the same run
QNIX = str(Path(sys.executable).with_name("qnix"))
RUN_TARGET_SLACK_MS = 10.0
DISPOSE_TARGET_BWRAPS = 3

SPEC = """\
default_disposable = "dvm"

[host]
hostname = "bench"
subnet = "10.209.0.0/16"

[compartments.sys-net]
network = "uplink"
provides_network = true
memory_mb = 128
firewall = [{ cidr = "0.0.0.0/0" }]

[compartments.work]
network = "sys-net"
autostart = true
memory_mb = 128

[compartments.box]
isolation = "container"
network = "sys-net"
autostart = true
memory_mb = 128

[compartments.vmbox]
isolation = "vm"
network = "sys-net"
memory_mb = 256

[disposable_templates.dvm]
network = "sys-net"
memory_mb = 128
preload = 2

[disposable_templates.cold]
network = "sys-net"
memory_mb = 128
"""

BARE_BWRAP = (
    "bwrap",
    "--unshare-all",
    *("--ro-bind", "/usr", "/usr"),
    *("--symlink", "usr/bin", "/bin"),
    *("--symlink", "usr/lib", "/lib"),
    *("--symlink", "usr/lib64", "/lib64"),
    *("--proc", "/proc"),
    *("--dev", "/dev"),
    "--",
    "/bin/true",
)
UNSHARE = (
    "unshare",
    *("--user", "--pid", "--ipc", "--uts", "--net", "--mount", "--fork"),
    "/bin/true",
)


def median_ms(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    runs: int = RUNS,
    before: Callable[[], None] | None = None,
) -> float:
    """The median wall time of `argv` in ms, after one warm-up; every run must succeed.
    `before` runs untimed ahead of each run."""
    samples = []
    for attempt in range(runs + 1):
        if before is not None:
            before()
        start = time.perf_counter()
        result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr}")
        if attempt > 0:
            samples.append(elapsed * 1000)
    return statistics.median(samples)


class StandInHost:
    """Temporary roots, a throwaway network namespace as the host and a prefix of its own."""

    def __init__(self) -> None:
        self.tag = "qxb" + secrets.token_hex(3)
        self.host_netns = f"{self.tag}host"
        self.base = Path(tempfile.mkdtemp(prefix=f"qnixbench-{self.tag}-", dir="/tmp"))
        self.base.chmod(0o711)  # compartment users pass through it to their homes
        self.env = {
            **os.environ,
            "QNIX_STATE_ROOT": str(self.base / "state"),
            "QNIX_RUN_ROOT": str(self.base / "run"),
            "QNIX_NETNS_PREFIX": f"{self.tag}-",
            "QNIX_HOST_NETNS": self.host_netns,
        }
        subprocess.run(["ip", "netns", "add", self.host_netns], check=True)
        subprocess.run(["ip", "-n", self.host_netns, "link", "set", "lo", "up"], check=True)

    def qnix(self, *args: str) -> str:
        result = subprocess.run(
            [QNIX, *args], env=self.env, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"qnix {' '.join(args)}: {result.stderr}")
        return result.stdout

    def wait_pool_full(self, template: str, size: int, timeout: float = 60) -> None:
        """Until `template` has `size` preloaded disposables and nothing of qnix is busy
        behind the last command (refill, a keeper removing a used disposable)."""
        pool = self.base / "run" / "pool" / template
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            waiting = len(list(pool.glob("*.sock")))
            if waiting == size and not self._busy():
                return
            time.sleep(0.05)
        raise RuntimeError(f"the pool of {template} did not fill up in {timeout} s")

    def _busy(self) -> bool:
        run_root = str(self.base / "run").encode()
        compartments = self.base / "run" / "compartments"
        keepers = len([d for d in compartments.iterdir() if (d / "state.json").exists()])
        running_dirs = len(list(compartments.iterdir()))
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    argv = Path(f"/proc/{entry}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"qnix.runtime.refill" in argv and run_root in argv:
                    return True
        return keepers != running_dirs

    def close(self) -> list[str]:
        """Remove everything made; what could not be removed, as messages."""
        problems = []
        down = subprocess.run(
            [QNIX, "down"], env=self.env, capture_output=True, text=True, check=False
        )
        if down.returncode != 0:
            problems.append(f"qnix down: {down.stderr.strip()}")
        netns_dir = Path("/run/netns")
        made = sorted(n for n in os.listdir(netns_dir) if n.startswith(self.tag))
        for name in made:
            deleted = subprocess.run(["ip", "netns", "delete", name], check=False)
            if deleted.returncode != 0:
                problems.append(f"could not delete network namespace {name}")
        shutil.rmtree(self.base, ignore_errors=True)
        return problems


def nspawn_tree(base: Path) -> Path:
    """An empty root with /usr to bind and the usual symlinks into it."""
    root = base / "nspawn-root"
    for folder in ("usr", "etc"):
        (root / folder).mkdir(parents=True)
    (root / "etc" / "os-release").touch()  # nspawn wants to recognise an OS tree
    for link in ("bin", "lib", "lib64", "sbin"):
        (root / link).symlink_to(f"usr/{link}")
    return root


def nspawn_argv(root: Path, command: Sequence[str]) -> list[str]:
    # --keep-unit: no machine registration or scope of its own, which needs systemd's bus.
    return [
        "systemd-nspawn",
        *("-D", str(root)),
        "--bind-ro=/usr",
        *("--register=no", "--keep-unit", "--quiet", "--pipe"),
        *command,
    ]


def nspawn_unavailable(root: Path) -> str | None:
    """Why nspawn cannot run here, or None: it must run a command and pass its exit code."""
    if shutil.which("systemd-nspawn") is None:
        return "systemd-nspawn is not installed"
    probe = subprocess.run(
        nspawn_argv(root, ["/bin/sh", "-c", "exit 3"]),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if probe.returncode != 3:
        lines = probe.stderr.strip().splitlines()
        reason = lines[0] if lines else f"exit code {probe.returncode}"
        return f"{reason} (PID 1 is {Path('/proc/1/comm').read_text().strip()})"
    return None


def bare_qemu_boot_ms(base: Path, run_root: Path) -> tuple[float, str]:
    """The same kernel and machine as a VM compartment, with an initramfs of busybox and an
    /init that powers off: the boot a VM compartment cannot do without; and the accelerator."""
    from qnix.runtime.backends import vm

    kernel = vm.find_kernel()
    initrd = base / "bare-initramfs.cpio"
    initrd.write_bytes(vm.poweroff_initramfs())
    accel = vm.accelerator(run_root / vm.ACCEL_FILE, kernel)  # as the VM compartment chose
    argv = vm.bare_boot_argv(kernel, accel, str(initrd), memory_mb=256)
    return median_ms(argv, runs=VM_BOOTS), accel


def ratio_verdict(ratio: float, target: float) -> str:
    met = "met" if ratio <= target else f"missed by x{ratio / target:.2f}"
    return f"{ratio:.2f} x vs target {target:.2f} x: {met}"


def verdict(measured: float, target: float) -> str:
    met = "met" if measured <= target else "NOT met"
    return f"{measured:.1f} ms vs target {target:.1f} ms: {met} (ratio {measured / target:.2f})"


def main() -> int:
    if os.geteuid() != 0:
        print("run this as root: qnix needs it", file=sys.stderr)
        return 1
    # Timed commands must not pay for compiling qnix's modules (a fresh checkout, or
    # PYTHONDONTWRITEBYTECODE in the environment, leaves no .pyc files).
    package = Path(__file__).resolve().parent.parent / "qnix"
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True)
    host = StandInHost()
    try:
        spec = host.base / "spec.toml"
        spec.write_text(SPEC)
        host.qnix("apply", str(spec))
        figures: dict[str, float | str] = {}
        figures["qnix dispose -- true"] = median_ms(
            [QNIX, "dispose", "--", "true"],
            host.env,
            before=lambda: host.wait_pool_full("dvm", 2),
        )
        figures["qnix dispose --template cold -- true"] = median_ms(
            [QNIX, "dispose", "--template", "cold", "--", "true"], host.env
        )
        figures["qnix run work -- true"] = median_ms([QNIX, "run", "work", "--", "true"], host.env)
        figures["bare bwrap /bin/true"] = median_ms(BARE_BWRAP)
        figures["unshare (6 namespaces) /bin/true"] = median_ms(UNSHARE)
        root = nspawn_tree(host.base)
        reason = nspawn_unavailable(root)
        nspawn_label = "systemd-nspawn /bin/true"
        if reason is None:
            figures[nspawn_label] = median_ms(nspawn_argv(root, ["/bin/true"]))
        else:
            figures[nspawn_label] = f"unavailable: {reason}"
        figures["qnix run box -- true (container)"] = median_ms(
            [QNIX, "run", "box", "--", "true"], host.env
        )
        figures["python -c pass"] = median_ms([sys.executable, "-c", "pass"])
        # Last: even idle, a running guest takes CPU from the figures above.
        host.qnix("start", "vmbox")
        figures["qnix run vmbox -- true (vm)"] = median_ms(
            [QNIX, "run", "vmbox", "--", "true"], host.env
        )
        figures["qnix restart vmbox (vm boot)"] = median_ms(
            [QNIX, "restart", "vmbox"], host.env, runs=VM_BOOTS
        )
        host.qnix("stop", "vmbox")
        bare_ms, accel = bare_qemu_boot_ms(host.base, host.base / "run")
        figures[f"bare qemu boot to poweroff ({accel})"] = bare_ms
    finally:
        problems = host.close()
    for problem in problems:
        print(f"cleanup: {problem}", file=sys.stderr)

    print(f"median of {RUNS} runs each (one warm-up), on {os.cpu_count()} CPUs")
    width = max(len(label) for label in figures)
    for label, value in figures.items():
        shown = f"{value:8.1f} ms" if isinstance(value, float) else value
        print(f"  {label:<{width}}  {shown}")
    python_ms, bwrap_ms = float(figures["python -c pass"]), float(figures["bare bwrap /bin/true"])
    dispose_ms, run_ms = (
        float(figures["qnix dispose -- true"]),
        float(figures["qnix run work -- true"]),
    )
    print("targets:")
    dispose_target = python_ms + DISPOSE_TARGET_BWRAPS * bwrap_ms
    print(f"  dispose <= python start + 3 x bare bwrap: {verdict(dispose_ms, dispose_target)}")
    run_target = python_ms + RUN_TARGET_SLACK_MS
    print(f"  run <= python start + 10 ms:              {verdict(run_ms, run_target)}")
    restart_ms = float(figures["qnix restart vmbox (vm boot)"])
    boot_ratio = restart_ms / bare_ms
    print(
        f"  vm restart <= {VM_RESTART_TARGET} x bare qemu boot:       "
        f"{ratio_verdict(boot_ratio, VM_RESTART_TARGET)} ({restart_ms:.1f} ms / {bare_ms:.1f} ms)"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
