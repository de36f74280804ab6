"""The VM backend (`isolation = "vm"`): QEMU with a kernel of its own per compartment.

* **Kernel:** the host's installed Linux kernel (/boot/vmlinuz-VERSION with its modules in
  /lib/modules/VERSION): the running kernel's if it is installed, else the newest. The guest
  boots from an initramfs only; it has no disk.
* **Initramfs:** a base the same for every start (busybox, the virtio modules the guest needs
  in the order modules.dep gives, /init, qnix's programs: vmlink.py, also compiled by the
  guest's interpreter, and the agent's peers in qnix/inside), cached in the run root per
  kernel; then per start a second archive: the guest's configuration and the compartment's
  secrets, which never touch a disk. QEMU reads the two concatenated from one sealed memfd
  (/dev/fd/N).
* **Filesystems:** /usr, /nix/store where there is one, and the interpreter's prefix when it
  lies elsewhere, shared read-only over 9p; the home shared read-write over 9p for a
  persistent compartment, a tmpfs in the guest for a disposable. QEMU drops to the
  compartment's host uid (`-runas`) before the guest runs, so its 9p server reaches only what
  that uid may, and what the guest writes belongs to it; the user in the guest has that uid.
* **Agent channel:** a virtio-serial port joined to the relay (qnix.runtime.backends.vm_relay) on
  the host; qnix.runtime.vmlink is its guest end.
* **Network:** a tap device in the compartment's own network namespace, owned by its host uid;
  tc redirects every frame between the tap and the namespace's end of the veth, so the guest
  holds the compartment's address and the namespace itself never sees its traffic. The host's
  nft table judges it like any compartment's.
* **Confinement of QEMU:** it runs in the compartment's cgroup and network namespace, as its
  host uid once started, with QEMU's own seccomp sandbox (no new privileges, no spawning, no
  resource control, obsolete syscalls denied).
* **Acceleration:** KVM when /dev/kvm is usable and boots a guest (probed once a boot: a nested
  KVM can open fine and hang guests), else TCG; `QNIX_VM_ACCEL=kvm|tcg` chooses.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from qnix.errors import QnixError
from qnix.runner import require_tool, run
from qnix.runtime.bytecode import compiled_by, interpreter_identity
from qnix.runtime.files import atomic_write

log = logging.getLogger("qnix.vm")

ISOLATION = "vm"
TAP_IFNAME = "qnixtap"  # inside the compartment's network namespace
ACCEL_ENV = "QNIX_VM_ACCEL"
ACCEL_FILE = "vm-accel"  # in the run root: the probe's answer (paths.RUN_ROOT_ENTRIES)
CONSOLE_LOG = "console.log"  # in the run folder: the guest's kernel and init messages
# QEMU's own memory beside the guest's, in the compartment's cgroup.
QEMU_OVERHEAD_BYTES = 256 << 20
# What the guest loads, with what they need (modules.dep decides the order).
GUEST_MODULES = ("virtio_pci", "virtio_console", "9pnet_virtio", "9p", "virtio_net")
MODULES_INSIDE = "/qnix/kmod"
PREFIX_FILE = "/qnix/prefix"  # the interpreter's prefix to mount, if any (one line)
INTERPRETER_FILE = "/qnix/interpreter"  # the Python that runs vmlink.py (one line)
VMLINK_INSIDE = "/qnix/vmlink.py"
AGENT_CODE_INSIDE = "/qnix/vmlink.pyc"  # VMLINK_INSIDE compiled by the guest's interpreter
BASE_CACHE_DIR = "vm-initramfs"  # in the run root: base initramfs per kernel (RUN_ROOT_ENTRIES)
CONFIG_INSIDE = "/qnix/config"  # qnix.runtime.vmlink.CONFIG_INSIDE says the same
INSIDE_DIR = "/opt/qnix-agent"  # as in a namespace compartment

# The guest's first process: load the modules, mount what the agent needs, start it. Fixed
# text: everything that differs per compartment is in files of the per-start archive. The
# read-only shares are cached in the guest (cache=loose, meant for read-only mounts): without
# it every page of the interpreter and every module lookup is a round trip to QEMU, which
# under TCG costs the guest seconds per start; the read-write home is never cached, so each
# write is on the host when it returns. Each stage says its name on the console (the kernel is
# quiet), so a start that hangs shows how far the guest got. /dev/shm is there for what
# shares memory through shm_open (GUI apps' buffers under waypipe).
INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
echo "qnix: init"
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm /tmp /run /home
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 shm /dev/shm
mount -t tmpfs -o mode=1777 tmp /tmp
while read -r module; do insmod "/qnix/kmod/$module"; done < /qnix/modules
ro=trans=virtio,version=9p2000.L,ro,cache=loose
mount -t 9p -o $ro usr /usr
if [ -e /qnix/nix-store ]; then
  mkdir -p /nix/store
  mount -t 9p -o $ro nixstore /nix/store
fi
read -r prefix < /qnix/prefix
if [ -n "$prefix" ]; then
  mkdir -p "$prefix"
  mount -t 9p -o $ro prefix "$prefix"
fi
echo "qnix: shares mounted"
read -r interpreter < /qnix/interpreter
agent=/qnix/vmlink.py
if [ -e /qnix/vmlink.pyc ]; then agent=/qnix/vmlink.pyc; fi
exec "$interpreter" -I -S "$agent" guest
"""


@dataclass(frozen=True, slots=True)
class Kernel:
    version: str
    image: Path
    modules: Path


NIXOS_SYSTEM = Path("/run/current-system")
NIX_STORE = Path("/nix/store")
NIX_STORE_MARK = "/qnix/nix-store"  # in the per-start archive when the store is shared


def find_kernel(boot: Path = Path("/boot"), modules: Path = Path("/lib/modules")) -> Kernel:
    """The running kernel if it is installed here, else the newest installed one; on NixOS
    the current system's."""
    if (NIXOS_SYSTEM / "kernel").exists() and not boot.joinpath("vmlinuz").exists():
        tree = NIXOS_SYSTEM / "kernel-modules" / "lib" / "modules"
        versions = (
            sorted((p.name for p in tree.iterdir()), key=_version_key) if tree.is_dir() else []
        )
        if versions:
            return Kernel(versions[-1], NIXOS_SYSTEM / "kernel", tree / versions[-1])
    installed = sorted(
        (
            entry.name.removeprefix("vmlinuz-")
            for entry in (boot.iterdir() if boot.is_dir() else ())
            if entry.name.startswith("vmlinuz-")
            and (modules / entry.name.removeprefix("vmlinuz-") / "modules.dep").is_file()
        ),
        key=_version_key,
    )
    if not installed:
        raise QnixError(
            f"no kernel for a VM: no {boot}/vmlinuz-VERSION with {modules}/VERSION/modules.dep",
            hint="install one: apt-get install linux-image-amd64 (Debian)",
        )
    running = platform.release()
    version = running if running in installed else installed[-1]
    return Kernel(version, boot / f"vmlinuz-{version}", modules / version)


def _version_key(version: str) -> list[tuple[int, str]]:
    return [
        (int(part), "") if part.isdigit() else (-1, part) for part in re.split(r"[.-]", version)
    ]


def module_order(modules_dir: Path, wanted: Sequence[str] = GUEST_MODULES) -> list[str]:
    """Paths (relative to `modules_dir`) of `wanted` and what they need, each after its needs."""
    needs: dict[str, str] = {}  # split only for the few modules the guest loads
    by_name: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        module, _, deps = line.partition(":")
        needs[module] = deps
        by_name[_module_name(module)] = module
    ordered: list[str] = []

    def add(path: str) -> None:
        if path in ordered:
            return
        for dependency in reversed(needs.get(path, "").split()):
            add(dependency)
        ordered.append(path)

    for name in wanted:
        if name not in by_name:
            raise QnixError(
                f"the kernel in {modules_dir} has no module {name}",
                hint="a VM needs virtio and 9p support in the guest kernel",
            )
        add(by_name[name])
    return ordered


def _module_name(path: str) -> str:
    """kernel/fs/9p/9p.ko.xz -> 9p; net_failover for net-failover.ko (as modprobe names it)."""
    return path.rpartition("/")[2].split(".ko")[0].replace("-", "_")


# ---- initramfs (cpio "newc") ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One member of an initramfs: a folder (data None), a file, or a symlink (target)."""

    path: str  # without a leading /
    mode: int
    data: bytes | None = None
    target: str | None = None
    uid: int = 0


def newc(entries: Sequence[Entry]) -> bytes:
    """The entries as a cpio archive in the "newc" format the kernel unpacks."""
    out = bytearray()
    for number, entry in enumerate([*entries, Entry("TRAILER!!!", 0)], start=1):
        if entry.target is not None:
            kind, body = stat.S_IFLNK, entry.target.encode()
        elif entry.data is None:
            kind, body = (stat.S_IFDIR if entry.path != "TRAILER!!!" else 0), b""
        else:
            kind, body = stat.S_IFREG, entry.data
        name = entry.path.encode() + b"\0"
        fields = (number, kind | entry.mode, entry.uid, entry.uid, 1, 0, len(body), 0, 0, 0, 0)
        header = b"070701" + b"".join(f"{value:08X}".encode() for value in fields)
        header += f"{len(name):08X}".encode() + b"00000000"
        out += header + name
        out += b"\0" * (-len(out) % 4)
        out += body
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def base_initramfs(
    kernel: Kernel, programs: Mapping[str, bytes] | None = None, interpreter: str | None = None
) -> bytes:
    """busybox, the guest's modules, /init and qnix's `programs` (path inside -> source:
    VMLINK_INSIDE and the agent's peers) for `kernel`: nothing of any compartment's, so the
    same archive for every start. With `interpreter` (the guest's) vmlink.py comes compiled by
    it too, which under TCG spares the guest a quarter of a second at each start."""
    programs = dict(programs or {})
    if interpreter is not None and VMLINK_INSIDE in programs:
        programs[AGENT_CODE_INSIDE] = compiled_by(
            interpreter, programs[VMLINK_INSIDE], VMLINK_INSIDE
        )
    busybox = _static_busybox()
    modules = module_order(kernel.modules)
    entries = [
        Entry("bin", 0o755),
        Entry("bin/busybox", 0o755, busybox),
        Entry("init", 0o755, INIT.encode()),
        *(Entry(name, 0o755) for name in ("dev", "proc", "sys", "usr", "etc", "qnix")),
        Entry(MODULES_INSIDE.lstrip("/"), 0o755),
        Entry("lib", 0o777, target="usr/lib"),
        Entry("lib64", 0o777, target="usr/lib64"),
        *(
            Entry(f"{MODULES_INSIDE.lstrip('/')}/{_plain_name(path)}", 0o644, _module(kernel, path))
            for path in modules
        ),
        Entry("qnix/modules", 0o644, "".join(f"{_plain_name(p)}\n" for p in modules).encode()),
        Entry("etc/passwd", 0o644, b"root:x:0:0::/root:/bin/sh\n"),
        Entry("etc/group", 0o644, b"root:x:0:\n"),
        *_folders(programs),
        *(Entry(path.strip("/"), 0o644, data) for path, data in sorted(programs.items())),
    ]
    return newc(entries)


def cached_base_initramfs(
    kernel: Kernel, programs: Mapping[str, bytes], interpreter: str, cache_dir: Path
) -> bytes:
    """base_initramfs, kept in `cache_dir` (root's, in the run root) under a hash of the kernel
    version and everything the archive is built from: a changed module, modules.dep, busybox,
    /init, program or interpreter makes a new one, which replaces the kernel's older one. It
    never holds a secret: what is a compartment's is in the per-start archive only."""
    digest = hashlib.sha256(f"qnix-vm-base-1\0{kernel.version}\0{INIT}\0".encode())
    digest.update(interpreter_identity(interpreter))
    for part in (_static_busybox(), (kernel.modules / "modules.dep").read_bytes()):
        digest.update(hashlib.sha256(part).digest())
    for path in module_order(kernel.modules):
        digest.update(f"\0{path}\0".encode() + hashlib.sha256(_module_bytes(kernel, path)).digest())
    for path, data in sorted(programs.items()):
        digest.update(f"\0{path}\0".encode() + hashlib.sha256(data).digest())
    folder, name = cache_dir / kernel.version, f"{digest.hexdigest()[:32]}.cpio"
    with contextlib.suppress(FileNotFoundError):
        return (folder / name).read_bytes()
    archive = base_initramfs(kernel, programs, interpreter)
    cache_dir.mkdir(mode=0o700, exist_ok=True)
    folder.mkdir(mode=0o700, exist_ok=True)
    for older in folder.glob("*.cpio"):
        older.unlink(missing_ok=True)
    atomic_write(folder / name, archive, 0o600)
    return archive


def _static_busybox() -> bytes:
    """A busybox that needs no library: the guest has none until /usr is mounted."""
    for candidate in (shutil.which("busybox"), "/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate) if candidate else None
        if path is not None and path.is_file():
            data = path.read_bytes()
            if b"ld-linux" not in data[:4096] and b"ld-musl" not in data[:4096]:
                return data
    raise QnixError(
        "no statically linked busybox for the VM's initramfs",
        hint="install it: apt-get install busybox-static (Debian)",
    )


def start_initramfs(
    files: dict[str, bytes], secret_files: dict[str, bytes], owner_uid: int
) -> bytes:
    """The per-start archive: `files` (world-readable) and the secrets (0400, the
    compartment's uid), with the folders they need. Appended to the base."""
    entries = _folders([*files, *secret_files])
    entries += [Entry(path.strip("/"), 0o644, data) for path, data in sorted(files.items())]
    entries += [
        Entry(path.strip("/"), 0o400, data, uid=owner_uid)
        for path, data in sorted(secret_files.items())
    ]
    return newc(entries)


def guest_config(
    *,
    uid: int,
    user: str,
    home: str,
    home_share: bool,
    hostname: str,
    address: str | None,
    gateway: str | None,
    runtime_dir: str,
    gui: bool = False,
) -> bytes:
    """The guest's configuration file, as qnix.runtime.vmlink.read_config reads it. With
    `gui`, the guest serves its GUI socket (vmlink.GUI_SOCKET_INSIDE) for waypipe's server."""
    values = {
        "uid": str(uid),
        "user": user,
        "home": home,
        "runtime_dir": runtime_dir,
        "gui": "yes" if gui else "",
        "home_share": "yes" if home_share else "",
        "hostname": hostname,
        "address": address or "",
        "gateway": gateway or "",
    }
    for key, value in values.items():
        if "\n" in value:
            raise QnixError(f"a VM's {key} cannot hold a line break: {value!r}")
    return "".join(f"{key}={value}\n" for key, value in values.items()).encode()


def _folders(paths: Iterable[str]) -> list[Entry]:
    """The folders that hold `paths` (inside, absolute), parents first."""
    folders: set[str] = set()
    for path in paths:
        parts = path.strip("/").split("/")[:-1]
        folders |= {"/".join(parts[: i + 1]) for i in range(len(parts))}
    return [Entry(folder, 0o755) for folder in sorted(folders)]


def _plain_name(path: str) -> str:
    return Path(path).name.split(".ko")[0] + ".ko"


def _module_bytes(kernel: Kernel, path: str) -> bytes:
    return (kernel.modules / path).read_bytes()


def _module(kernel: Kernel, path: str) -> bytes:
    """The module, uncompressed: busybox's insmod hands the kernel the bytes as they are."""
    data = _module_bytes(kernel, path)
    if path.endswith(".ko.xz"):
        import lzma

        return lzma.decompress(data)
    if path.endswith(".ko.gz"):
        import gzip

        return gzip.decompress(data)
    if not path.endswith(".ko"):
        raise QnixError(
            f"{kernel.modules / path}: qnix cannot uncompress this kind of module",
            hint="use a kernel whose modules are plain, xz or gzip",
        )
    return data


# ---- QEMU ----------------------------------------------------------------------------------


def qemu_binary() -> str:
    machine = platform.machine()
    name = {"x86_64": "qemu-system-x86_64", "aarch64": "qemu-system-aarch64"}.get(machine)
    if name is None:
        raise QnixError(f"no VM backend for {machine} yet")
    package = "qemu-system-x86" if machine == "x86_64" else "qemu-system-arm"
    return require_tool(name, package)


def accelerator(cache: Path | None = None, kernel: Kernel | None = None) -> str:
    """QNIX_VM_ACCEL if set; TCG without a usable /dev/kvm; else KVM if it boots a guest here
    (probed once, the answer kept in `cache`): a nested KVM can open fine and hang guests."""
    chosen = os.environ.get(ACCEL_ENV, "")
    if chosen in ("kvm", "tcg"):
        return chosen
    if chosen:
        raise QnixError(f"{ACCEL_ENV}={chosen!r}: say kvm or tcg")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    if cache is None or kernel is None:
        return "kvm"
    with contextlib.suppress(OSError):
        known = cache.read_text().strip()
        if known in ("kvm", "tcg"):
            return known
    found = "kvm" if probe(kernel, "kvm") else "tcg"
    if found == "tcg":
        log.warning(
            "KVM does not boot a guest on this host: VMs use TCG (%s=kvm insists)", ACCEL_ENV
        )
    atomic_write(cache, f"{found}\n".encode(), 0o644)
    return found


PROBE_TIMEOUT = 15.0  # TCG boots the probe in seconds; KVM in well under one
PROBE_MARK = "qnix-guest-booted"


def poweroff_initramfs(say: str = "") -> bytes:
    """busybox and an /init that prints `say` (a fixed word of qnix's) on the console, if
    anything, and powers off: the least a guest boot is."""
    echo = f"/bin/busybox echo {say}\n" if say else ""
    init = f"#!/bin/busybox sh\n{echo}/bin/busybox poweroff -f\n"
    return newc(
        [
            Entry("bin", 0o755),
            Entry("bin/busybox", 0o755, _static_busybox()),
            Entry("init", 0o755, init.encode()),
        ]
    )


def bare_boot_argv(kernel: Kernel, accel: str, initrd: str, memory_mb: int = 128) -> list[str]:
    """QEMU booting `kernel` with `initrd` alone (the machine a VM compartment gets, without
    its devices), the console on stdout."""
    return [
        qemu_binary(),
        *("-machine", _machine(), "-accel", accel, "-cpu", _cpu(accel), "-m", str(memory_mb)),
        *("-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"),
        *("-serial", "stdio", "-kernel", str(kernel.image), "-initrd", initrd),
        *("-append", "console=ttyS0 quiet panic=-1 rdinit=/init"),
    ]


def probe(kernel: Kernel, accel: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether `kernel` boots under `accel` here: a poweroff_initramfs that says so."""
    with tempfile.NamedTemporaryFile(prefix="qnix-probe-", suffix=".cpio") as initrd:
        initrd.write(poweroff_initramfs(PROBE_MARK))
        initrd.flush()
        argv = bare_boot_argv(kernel, accel, initrd.name)
        try:
            return PROBE_MARK in run(argv, timeout=timeout, check=False).stdout
        except QnixError:  # timed out: a hung guest
            return False


def _machine() -> str:
    return "q35" if platform.machine() == "x86_64" else "virt"


def _cpu(accel: str) -> str:
    return "host" if accel == "kvm" else "max"


@dataclass(frozen=True, slots=True)
class VmPlan:
    """Everything that differs between two VM compartments' QEMU command lines."""

    name: str
    memory_mb: int
    cpus: int
    host_uid: int
    host_gid: int
    home: str | None  # host folder shared as the home; None: a tmpfs in the guest
    interpreter_prefix: str | None  # shared read-only when outside /usr
    port_fd: int  # QEMU's end of the agent port: a socket joined to the relay's
    console_log: str
    networked: bool
    mac: str


def qemu_argv(plan: VmPlan, kernel: Kernel, initrd_fd: int, accel: str) -> list[str]:
    argv = [
        qemu_binary(),
        "-name",
        f"qnix-{plan.name}",
        "-machine",
        _machine(),
        "-accel",
        accel,
        "-cpu",
        _cpu(accel),
        "-m",
        str(plan.memory_mb),
        "-smp",
        str(plan.cpus),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        f"file:{_option_path(plan.console_log)}",
        "-no-reboot",
        "-kernel",
        _option_path(str(kernel.image)),
        "-initrd",
        f"/dev/fd/{initrd_fd}",
        "-append",
        "console=ttyS0 quiet panic=-1 rdinit=/init",
        "-runas",
        f"{plan.host_uid}:{plan.host_gid}",
        "-sandbox",
        "on,obsolete=deny,spawn=deny,resourcecontrol=deny",
        "-device",
        "virtio-serial-pci",
        "-chardev",
        f"socket,id=agent,fd={plan.port_fd},server=off",
        "-device",
        "virtserialport,chardev=agent,name=qnix.agent",
        *_share("usr", "/usr", readonly=True),
    ]
    if NIX_STORE.is_dir():
        argv += _share("nixstore", str(NIX_STORE), readonly=True)
    if plan.interpreter_prefix is not None:
        argv += _share("prefix", plan.interpreter_prefix, readonly=True)
    if plan.home is not None:
        argv += _share("home", plan.home, readonly=False)
    if plan.networked:
        argv += [
            "-netdev",
            f"tap,id=net,ifname={TAP_IFNAME},script=no,downscript=no",
            "-device",
            f"virtio-net-pci,netdev=net,mac={plan.mac}",
        ]
    return argv


def _option_path(path: str) -> str:
    """A path as it goes into a QEMU option, which QEMU splits at commas: one holding a comma
    is refused, never passed on."""
    if "," in path:
        raise QnixError(f"a VM cannot use the path {path!r}: QEMU splits its options at commas")
    return path


def _share(tag: str, path: str, *, readonly: bool) -> list[str]:
    flags = ",readonly=on" if readonly else ""
    return [
        "-virtfs",
        f"local,path={_option_path(path)},mount_tag={tag},security_model=none{flags}",
    ]


def mac_address(name: str) -> str:
    """Locally administered, unicast, from the name (as the NixOS output's VMs)."""
    digest = hashlib.sha256(name.encode()).digest()
    return "02:" + ":".join(f"{byte:02x}" for byte in digest[:5])


# ---- the tap in the compartment's namespace ---------------------------------------------------


def connect_tap(netns: str, inner_ifname: str, host_uid: int) -> None:
    """A tap owned by `host_uid` in `netns`, joined to the veth's inner end frame for frame."""
    ip = require_tool("ip", "iproute2")
    tc = require_tool("tc", "iproute2")
    disconnect_tap(netns, inner_ifname)
    run([ip, "-n", netns, "tuntap", "add", "dev", TAP_IFNAME, "mode", "tap", "user", str(host_uid)])
    run([ip, "-n", netns, "link", "set", TAP_IFNAME, "up"])
    for source, dest in ((inner_ifname, TAP_IFNAME), (TAP_IFNAME, inner_ifname)):
        run([ip, "netns", "exec", netns, tc, "qdisc", "add", "dev", source, "ingress"])
        run(
            [
                *(ip, "netns", "exec", netns, tc, "filter", "add", "dev", source),
                *("parent", "ffff:", "protocol", "all", "u32", "match", "u32", "0", "0"),
                *("action", "mirred", "egress", "redirect", "dev", dest),
            ]
        )


def disconnect_tap(netns: str, inner_ifname: str) -> None:
    """Undo connect_tap (whatever of it is there)."""
    ip = require_tool("ip", "iproute2")
    tc = require_tool("tc", "iproute2")
    run([ip, "-n", netns, "link", "del", TAP_IFNAME], check=False)
    run(
        [ip, "netns", "exec", netns, tc, "qdisc", "del", "dev", inner_ifname, "ingress"],
        check=False,
    )
