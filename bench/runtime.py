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
Also: ten `qnix dispose --template cold -- true` back to back (each timed), firejail's
throw-away sandbox without a network (the nearest peer), and the stdio relay of `qnix run`
(a file through `qnix run work -- cat`) beside `cat` itself; one compartment's network set up
and removed in-process beside the same steps as one `ip`/`nft` process each (as qnix did), and
the first import of the pyroute2 modules qnix loads.

It then prints each target with "met" or the factor by which it is missed:
  * a cold disposable: within the interpreter's start + 100 ms,
  * each of ten cold disposables back to back: within the interpreter's start + 100 ms,
  * a preloaded disposable: its own cost (beyond the interpreter's start) within 3 bare bwraps,
  * `qnix run` into a running compartment: within the interpreter's start + 10 ms,
  * `qnix restart` of a VM compartment: within 1.3 x a bare boot of the same kernel.

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
QNIX = str(Path(sys.executable).with_name("qnix"))
RUN_TARGET_SLACK_MS = 10.0
COLD_TARGET_SLACK_MS = 100.0
BACK_TO_BACK = 10
PRELOADED_TARGET_BWRAPS = 3
VM_RESTART_TARGET_RATIO = 1.3
RELAY_MIB = 256
FIREJAIL = ("firejail", "--quiet", "--noprofile", "--private", "--net=none", "true")

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


# ---- one compartment's network: in-process beside one ip/nft process per step ---------------

NET_RUNS = 15


def _process_steps(
    host: str, inside: str, ifname: str, link: tuple[str, str], rule: str
) -> list[tuple[list[str], str | None]]:
    """What qnix ran before, one process per step (its listings too), for one client of a net
    compartment: namespace, veth pair, addresses, default route, the two rules, its element;
    then its removal. Each entry: argv, and the nft transaction on stdin (or None)."""
    gateway, address = link
    on_host, in_ns = ["ip", "-n", host], ["ip", "-n", inside]
    nft = ["ip", "netns", "exec", host, "nft", "-f", "-"]
    element = f"compartment_addrs {{ {address} }}"
    rules = [
        ["-4", "rule", "add", "priority", "19999", "iif", ifname, "to", rule, "table", "main"],
        ["-4", "rule", "add", "priority", "20000", "iif", ifname, "table", "20999"],
    ]
    setup = [
        ["ip", "netns", "add", inside],
        [*in_ns, "-j", "link", "show", "dev", "lo"],
        [*in_ns, "link", "set", "lo", "up"],
        [*on_host, "-j", "link", "show"],
        [*in_ns, "-j", "link", "show"],
        [*on_host, "link", "add", ifname, "type", "veth", "peer", "name", "eth0", "netns", inside],
        [*on_host, "-j", "link", "show"],
        [*on_host, "-j", "-4", "addr", "show", "dev", ifname],
        [*on_host, "addr", "add", f"{gateway}/31", "dev", ifname],
        [*on_host, "link", "set", ifname, "up"],
        [*in_ns, "-j", "-4", "addr", "show", "dev", "eth0"],
        [*in_ns, "addr", "add", f"{address}/31", "dev", "eth0"],
        [*in_ns, "-j", "link", "show"],
        [*in_ns, "link", "set", "eth0", "up"],
        [*in_ns, "-j", "-4", "route", "show", "default"],
        [*in_ns, "route", "replace", "default", "via", gateway, "dev", "eth0"],
        [*on_host, "-j", "-4", "rule", "show"],
        [*on_host, "-j", "-4", "route", "show", "default", "table", "20999"],
        *([*on_host, *r] for r in rules),
    ]
    teardown = [
        [*on_host, "-j", "-4", "rule", "show"],
        *([*on_host, "-4", "rule", "del", *r[3:]] for r in rules),
        [*on_host, "-j", "link", "show"],
        [*on_host, "link", "del", ifname],
        ["ip", "netns", "delete", inside],
    ]
    return [
        *((argv, None) for argv in setup),
        (nft, f"add element inet qnix {element}\n"),
        (nft, f"delete element inet qnix {element}\n"),
        *((argv, None) for argv in teardown),
    ]


def network_setup_teardown_ms(host: StandInHost) -> dict[str, float]:
    """One client compartment's network made and removed in-process (as qnix does: netlink,
    libnftables) and as the same steps in `ip`/`nft` processes; medians in ms, after one
    warm-up each. Also the first import of the pyroute2 modules qnix loads, in a fresh process."""
    from qnix.compile.names import Link, host_ifname
    from qnix.runtime.net import HostNetwork, NetRoute, Uplink

    net = HostNetwork(prefix=f"{host.tag}n-", host_netns=host.host_netns)
    router = Uplink(host_ifname("bench-router"), Link("10.209.250.0", "10.209.250.1"))
    net.ensure_netns("router")
    net.ensure_link("router", router)
    route = NetRoute(20999, router.link.address, router.host_ifname, "10.209.0.0/16")
    client = Uplink(host_ifname("bench-client"), Link("10.209.250.2", "10.209.250.3"), route)
    elements = [("compartment_addrs", client.link.address)]

    def in_process() -> None:
        net.ensure_netns("client")
        net.ensure_link("client", client)
        net.add_elements(elements)
        net.delete_elements(elements)
        net.remove_link(client.host_ifname)
        net.remove_netns("client")

    steps = _process_steps(
        host.host_netns,
        net.netns("client"),
        client.host_ifname,
        (client.link.gateway, client.link.address),
        route.subnet,
    )

    def processes() -> None:
        for argv, stdin in steps:
            subprocess.run(argv, input=stdin, text=True, capture_output=True, check=True)

    figures = {}
    for label, once in (("in-process", in_process), ("processes", processes)):
        samples = []
        for attempt in range(NET_RUNS + 1):
            start = time.perf_counter()
            once()
            if attempt > 0:
                samples.append((time.perf_counter() - start) * 1000)
        figures[label] = statistics.median(samples)
    figures["steps"] = len(steps)
    net.remove_link(router.host_ifname)
    net.remove_netns("router")
    probe = (
        "import time; from qnix.runtime import netlink; start = time.perf_counter(); "
        "netlink.pyroute2(); print((time.perf_counter() - start) * 1000)"
    )
    imports = [
        float(
            subprocess.run(
                [sys.executable, "-c", probe], capture_output=True, text=True, check=True
            ).stdout
        )
        for _ in range(5)
    ]
    figures["pyroute2 import"] = statistics.median(imports)
    return figures


def verdict(measured: float, target: float, unit: str = "ms") -> str:
    shown = f"{measured:.1f} {unit} vs target {target:.1f} {unit}"
    if measured <= target:
        return f"{shown}: met"
    return f"{shown}: missed by x{measured / target:.2f}"


def each_ms(argv: Sequence[str], env: Mapping[str, str], count: int) -> list[float]:
    """`count` runs of `argv` back to back, none waiting for the one before to be cleaned up."""
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        samples.append((time.perf_counter() - start) * 1000)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr}")
    return samples


def throughput_mib_s(argv: Sequence[str], source: Path, env: Mapping[str, str] | None) -> float:
    """MiB/s of `source` through `argv` (stdin the file, stdout discarded), best of three."""
    best = 0.0
    for _ in range(3):
        with source.open("rb") as stdin:
            start = time.perf_counter()
            subprocess.run(argv, stdin=stdin, stdout=subprocess.DEVNULL, env=env, check=True)
            elapsed = time.perf_counter() - start
        best = max(best, source.stat().st_size / elapsed / (1 << 20))
    return best


def firejail_ms() -> float | str:
    if shutil.which("firejail") is None:
        return "unavailable: firejail is not installed (make bench installs it on Debian)"
    probe = subprocess.run(FIREJAIL, capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"unavailable: {probe.stderr.strip()[:120]}"
    return median_ms(FIREJAIL)


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
        cold = [QNIX, "dispose", "--template", "cold", "--", "true"]
        figures["qnix dispose --template cold -- true"] = median_ms(cold, host.env)
        back_to_back = each_ms(cold, host.env, BACK_TO_BACK)
        figures[f"{BACK_TO_BACK} cold disposables back to back, slowest"] = max(back_to_back)
        figures[f"{BACK_TO_BACK} cold disposables back to back, median"] = statistics.median(
            back_to_back
        )
        figures["firejail --noprofile --private --net=none true"] = firejail_ms()
        source = host.base / "relay.bin"
        with source.open("wb") as handle:
            handle.write(os.urandom(1 << 20) * RELAY_MIB)
        relayed = throughput_mib_s([QNIX, "run", "work", "--", "cat"], source, host.env)
        plain = throughput_mib_s(["cat"], source, None)
        source.unlink()
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
        network = network_setup_teardown_ms(host)
    finally:
        problems = host.close()
    for problem in problems:
        print(f"cleanup: {problem}", file=sys.stderr)

    print(f"median of {RUNS} runs each (one warm-up), on {os.cpu_count()} CPUs")
    width = max(len(label) for label in figures)
    for label, value in figures.items():
        shown = f"{value:8.1f} ms" if isinstance(value, float) else value
        print(f"  {label:<{width}}  {shown}")
    print(f"  qnix run work -- cat (stdio relay)  {relayed:8.0f} MiB/s")
    print(f"  cat                                 {plain:8.0f} MiB/s")
    python_ms, bwrap_ms = float(figures["python -c pass"]), float(figures["bare bwrap /bin/true"])
    print("targets:")
    cold_target = python_ms + COLD_TARGET_SLACK_MS
    cold_ms = float(figures["qnix dispose --template cold -- true"])
    print(f"  cold disposable <= python start + 100 ms:       {verdict(cold_ms, cold_target)}")
    slowest = max(back_to_back)
    print(
        f"  each of {BACK_TO_BACK} back to back <= python start + 100 ms: "
        f"{verdict(slowest, cold_target)}"
    )
    own = float(figures["qnix dispose -- true"]) - python_ms
    print(
        f"  preloaded disposable's own cost <= 3 x bwrap:   "
        f"{verdict(own, PRELOADED_TARGET_BWRAPS * bwrap_ms)}"
    )
    run_ms = float(figures["qnix run work -- true"])
    run_target = python_ms + RUN_TARGET_SLACK_MS
    print(f"  qnix run <= python start + 10 ms:               {verdict(run_ms, run_target)}")
    restart_ms = float(figures["qnix restart vmbox (vm boot)"])
    boot_ratio = restart_ms / bare_ms
    print(
        f"  VM restart <= 1.3 x a bare boot:                "
        f"{verdict(boot_ratio, VM_RESTART_TARGET_RATIO, 'x')} "
        f"({restart_ms:.0f} ms / {bare_ms:.0f} ms)"
    )
    peer = figures["firejail --noprofile --private --net=none true"]
    if isinstance(peer, float):
        print(
            f"beside firejail: cold disposable x{cold_ms / peer:.2f}, "
            f"preloaded x{float(figures['qnix dispose -- true']) / peer:.2f}"
        )
    print(f"stdio relay: x{relayed / plain:.2f} of cat's throughput")
    print(
        f"one compartment's network set up and removed (median of {NET_RUNS}): in-process "
        f"{network['in-process']:.1f} ms, as {network['steps']:.0f} ip/nft processes "
        f"{network['processes']:.1f} ms: {network['processes'] / network['in-process']:.1f} x "
        f"faster; pyroute2's modules import in {network['pyroute2 import']:.1f} ms, once"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
