"""The VM backend's pure parts: the initramfs it writes (read back by the real cpio), the order
of the guest's modules, the kernel it picks, and the exact QEMU command line."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import lzma
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qnix.errors import QnixError
from qnix.runtime import vmlink
from qnix.runtime.backends import vm
from tests.conftest import need


def unpacked(archive: bytes, where: Path) -> dict[str, tuple[str, int, int, bytes | str]]:
    """What the real cpio makes of `archive`: kind, mode, owner, content or link target."""
    where.mkdir()
    subprocess.run(
        [need("cpio"), "-idm", "--quiet", "--no-absolute-filenames"],
        input=archive,
        cwd=where,
        check=True,
    )
    found: dict[str, tuple[str, int, int, bytes | str]] = {}
    for folder, folders, files in os.walk(where):
        for name in folders + files:
            path = Path(folder, name)
            info = path.lstat()
            relative = str(path.relative_to(where))
            mode = info.st_mode & 0o7777
            if path.is_symlink():
                found[relative] = ("link", mode, info.st_uid, os.readlink(path))
            elif path.is_dir():
                found[relative] = ("folder", mode, info.st_uid, b"")
            else:
                found[relative] = ("file", mode, info.st_uid, path.read_bytes())
    return found


def test_the_archive_is_what_cpio_reads(tmp_path: Path) -> None:
    archive = vm.newc(
        [
            vm.Entry("etc", 0o755),
            vm.Entry("etc/odd name", 0o644, b"x" * 5),  # content not a multiple of 4
            vm.Entry("etc/empty", 0o600, b""),
            vm.Entry("lib", 0o777, target="usr/lib"),
            vm.Entry("run", 0o755),
            vm.Entry("run/secret", 0o400, b"s3", uid=4242),
        ]
    )
    assert len(archive) % 4 == 0
    found = unpacked(archive, tmp_path / "out")
    assert found == {
        "etc": ("folder", 0o755, 0, b""),
        "etc/odd name": ("file", 0o644, 0, b"xxxxx"),
        "etc/empty": ("file", 0o600, 0, b""),
        "lib": ("link", 0o777, 0, "usr/lib"),
        "run": ("folder", 0o755, 0, b""),
        "run/secret": ("file", 0o400, 4242, b"s3"),
    }


def test_the_per_start_archive_makes_its_folders_and_keeps_secrets_private(
    tmp_path: Path,
) -> None:
    archive = vm.start_initramfs(
        {"/qnix/config.json": b"{}", "/opt/qnix-agent/qfile.py": b"pass\n"},
        {"/run/secrets/token": b"hunter2"},
        owner_uid=0x70000005,
    )
    found = unpacked(archive, tmp_path / "out")
    assert found["run/secrets/token"] == ("file", 0o400, 0x70000005, b"hunter2")
    assert found["qnix/config.json"] == ("file", 0o644, 0, b"{}")
    assert {name for name, entry in found.items() if entry[0] == "folder"} == {
        "opt",
        "opt/qnix-agent",
        "qnix",
        "run",
        "run/secrets",
    }


def test_the_guest_reads_its_configuration_as_the_host_writes_it() -> None:
    assert vm.CONFIG_INSIDE == vmlink.CONFIG_INSIDE
    written = vm.guest_config(
        uid=0x70000005,
        user="user",
        home="/home/user",
        home_share=True,
        hostname="box",
        address="10.0.0.3",
        gateway="10.0.0.2",
        runtime_dir="/run/user/1000",
        gui=True,
    )
    assert vmlink.read_config(written.decode()) == {
        "uid": str(0x70000005),
        "user": "user",
        "home": "/home/user",
        "runtime_dir": "/run/user/1000",
        "gui": "yes",
        "home_share": "yes",
        "hostname": "box",
        "address": "10.0.0.3",
        "gateway": "10.0.0.2",
    }
    sealed = vm.guest_config(
        uid=1,
        user="u",
        home="/h=x",
        home_share=False,
        hostname="s",
        address=None,
        gateway=None,
        runtime_dir="/run/user/1000",
    )
    read = vmlink.read_config(sealed.decode())
    assert (read["home"], read["home_share"], read["address"], read["gateway"], read["gui"]) == (
        "/h=x",
        "",
        "",
        "",
        "",
    )
    with pytest.raises(QnixError, match="line break"):
        vm.guest_config(
            uid=1,
            user="u",
            home="/h",
            home_share=False,
            hostname="a\nb",
            address=None,
            gateway=None,
            runtime_dir="/run/user/1000",
        )


def test_the_guest_agent_loads_no_module_before_it_needs_it(tmp_path: Path) -> None:
    """Under TCG each module the guest's interpreter loads before its hello costs the start
    tens of milliseconds: vmlink.py, run alone as the guest runs it, loads none of the heavy
    ones when it is loaded itself (they come where they are used)."""
    heavy = ("json", "threading", "subprocess", "contextlib", "queue", "socket", "select", "re")
    (tmp_path / "vmlink.py").write_bytes(Path(vmlink.__file__).read_bytes())
    probe = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import vmlink; "
        f"print(sorted(name for name in {heavy!r} if name in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True, check=True
    )
    assert loaded.stdout == "[]\n"


def modules_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "6.1.0-test"
    folder.mkdir()
    (folder / "modules.dep").write_text(
        "kernel/drivers/virtio/virtio.ko:\n"
        "kernel/drivers/virtio/virtio_ring.ko:\n"
        "kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_ring.ko "
        "kernel/drivers/virtio/virtio.ko\n"
        "kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio_ring.ko "
        "kernel/drivers/virtio/virtio.ko\n"
        "kernel/fs/netfs/netfs.ko:\n"
        "kernel/net/9p/9pnet.ko:\n"
        "kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio.ko\n"
        "kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko\n"
        "kernel/drivers/net/virtio_net.ko: kernel/drivers/virtio/virtio.ko\n"
    )
    return folder


def test_each_module_comes_after_what_it_needs_and_once(tmp_path: Path) -> None:
    folder = modules_dir(tmp_path)
    order = vm.module_order(folder)
    assert len(order) == len(set(order)) == 9  # all of modules.dep, each once
    needs = {
        "virtio_pci.ko": ["virtio_ring.ko", "virtio.ko"],
        "9pnet_virtio.ko": ["9pnet.ko", "virtio.ko"],
        "9p.ko.xz": ["9pnet.ko", "netfs.ko"],
    }
    names = [Path(path).name for path in order]
    for module, required in needs.items():
        assert all(names.index(r) < names.index(module) for r in required), names
    with pytest.raises(QnixError, match="has no module vsock"):
        vm.module_order(folder, ("vsock",))


def test_the_base_initramfs_is_cached_until_what_it_is_built_from_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = modules_dir(tmp_path)
    for path in vm.module_order(folder):
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        data = f"module {path}".encode()
        (folder / path).write_bytes(lzma.compress(data) if path.endswith(".xz") else data)
    kernel = vm.Kernel(folder.name, tmp_path / "vmlinuz", folder)
    busybox = [b"busybox 1"]
    monkeypatch.setattr(vm, "_static_busybox", lambda: busybox[0])
    builds: list[bytes] = []
    real_build = vm.base_initramfs

    def counted(*args: Any, **kwargs: Any) -> bytes:
        builds.append(real_build(*args, **kwargs))
        return builds[-1]

    monkeypatch.setattr(vm, "base_initramfs", counted)
    agent = b"import sys\nprint('agent', sys.argv[1:])\n"
    programs = {vm.VMLINK_INSIDE: agent, "/opt/qnix-agent/qcall.py": b"pass\n"}
    cache = tmp_path / "run" / vm.BASE_CACHE_DIR
    (tmp_path / "run").mkdir()

    interpreter = [sys.executable]

    def base(kernel: vm.Kernel = kernel) -> bytes:
        return vm.cached_base_initramfs(kernel, programs, interpreter[0], cache)

    def kept() -> list[Path]:
        return sorted(cache.rglob("*.cpio"))

    first = base()
    assert len(builds) == 1 and base() == first and len(builds) == 1  # reused
    assert [p.read_bytes() for p in kept()] == [first]  # the base alone: nothing of a start
    assert [oct(p.stat().st_mode & 0o777) for p in (cache, *kept())] == ["0o700", "0o600"]
    inside = unpacked(first, tmp_path / "first")
    assert inside["qnix/kmod/9p.ko"][3] == b"module kernel/fs/9p/9p.ko.xz"
    assert inside["opt/qnix-agent/qcall.py"] == ("file", 0o644, 0, b"pass\n")
    compiled = tmp_path / "first" / "qnix" / "vmlink.pyc"  # runs as the script, as the init does
    ran = subprocess.run([sys.executable, "-I", "-S", compiled, "guest"], capture_output=True)
    assert ran.stdout == b"agent ['guest']\n"

    changes = [
        lambda: (folder / "kernel/net/9p/9pnet.ko").write_bytes(b"rebuilt module"),
        lambda: busybox.__setitem__(0, b"busybox 2"),
        lambda: programs.__setitem__(vm.VMLINK_INSIDE, agent + b"# changed\n"),
        lambda: (folder / "modules.dep").write_text(
            (folder / "modules.dep").read_text() + "kernel/extra.ko:\n"
        ),
    ]
    for change in changes:
        before = len(builds)
        change()
        rebuilt = base()
        assert len(builds) == before + 1 and base() == rebuilt and len(builds) == before + 1
        assert [p.read_bytes() for p in kept()] == [rebuilt]  # the kernel's older one is gone
    assert unpacked(rebuilt, tmp_path / "last")["qnix/kmod/9pnet.ko"][3] == b"rebuilt module"
    # Another build of the interpreter (an upgrade replaces the file): its own bytecode.
    interpreter[0] = str(shutil.copy(sys.executable, tmp_path / "python3"))
    base()
    assert len(builds) == len(changes) + 2
    other = vm.Kernel("6.2.0-other", kernel.image, folder)
    base(kernel=other)
    assert [p.parent.name for p in kept()] == [folder.name, "6.2.0-other"]  # one per kernel


def test_the_running_kernel_is_chosen_when_installed_else_the_newest(tmp_path: Path) -> None:
    boot, modules = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    modules.mkdir()
    with pytest.raises(QnixError, match="no kernel for a VM") as refused:
        vm.find_kernel(boot, modules)
    assert "apt-get install linux-image-amd64" in (refused.value.hint or "")
    for version in ("6.1.0-9-amd64", "6.1.0-10-amd64", platform.release()):
        (boot / f"vmlinuz-{version}").write_bytes(b"")
    for version in ("6.1.0-9-amd64", "6.1.0-10-amd64"):
        (modules / version).mkdir()
        (modules / version / "modules.dep").write_text("")
    # The running kernel has no modules here: the newest complete one (10 > 9, not as text).
    assert vm.find_kernel(boot, modules).version == "6.1.0-10-amd64"
    (modules / platform.release()).mkdir()
    (modules / platform.release() / "modules.dep").write_text("")
    chosen = vm.find_kernel(boot, modules)
    assert (chosen.version, chosen.image) == (
        platform.release(),
        boot / f"vmlinuz-{platform.release()}",
    )


PLAN = vm.VmPlan(
    name="box",
    memory_mb=256,
    cpus=2,
    host_uid=0x70000007,
    host_gid=0x70000007,
    home="/var/lib/qnix/compartments/box/home",
    interpreter_prefix=None,
    port_fd=8,
    console_log="/run/qnix/compartments/box/console.log",
    networked=True,
    mac="02:aa:bb:cc:dd:ee",
)
KERNEL = vm.Kernel("6.1.0-test", Path("/boot/vmlinuz-6.1.0-test"), Path("/lib/modules/x"))


def test_the_qemu_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vm, "qemu_binary", lambda: "/usr/bin/qemu-system-x86_64")
    monkeypatch.setattr(vm, "NIX_STORE", Path("/nonexistent/nix/store"))
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert vm.qemu_argv(PLAN, KERNEL, 7, "tcg") == [
        "/usr/bin/qemu-system-x86_64",
        *("-name", "qnix-box", "-machine", "q35", "-accel", "tcg", "-cpu", "max"),
        *("-m", "256", "-smp", "2", "-nodefaults", "-no-user-config", "-display", "none"),
        *("-serial", "file:/run/qnix/compartments/box/console.log", "-no-reboot"),
        *("-kernel", "/boot/vmlinuz-6.1.0-test", "-initrd", "/dev/fd/7"),
        *("-append", "console=ttyS0 quiet panic=-1 rdinit=/init"),
        *("-runas", f"{0x70000007}:{0x70000007}"),
        *("-sandbox", "on,obsolete=deny,spawn=deny,resourcecontrol=deny"),
        *("-device", "virtio-serial-pci"),
        *("-chardev", "socket,id=agent,fd=8,server=off"),
        *("-device", "virtserialport,chardev=agent,name=qnix.agent"),
        *("-virtfs", "local,path=/usr,mount_tag=usr,security_model=none,readonly=on"),
        "-virtfs",
        "local,path=/var/lib/qnix/compartments/box/home,mount_tag=home,security_model=none",
        *("-netdev", "tap,id=net,ifname=qnixtap,script=no,downscript=no"),
        *("-device", "virtio-net-pci,netdev=net,mac=02:aa:bb:cc:dd:ee"),
    ]
    kvm = vm.qemu_argv(PLAN, KERNEL, 7, "kvm")
    assert kvm[kvm.index("-cpu") + 1] == "host"


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=40))
def test_no_path_can_add_an_option_to_qemu(untrusted: str) -> None:
    """QEMU splits option values at commas: a path holding one is refused, never passed on."""
    path = "/srv/" + untrusted
    try:
        argv = vm.qemu_argv(dataclasses.replace(PLAN, home=path), KERNEL, 3, "tcg")
    except QnixError as refused:
        assert "," in path and "comma" in refused.message
        return
    assert "," not in path
    shares = [argv[i + 1] for i, value in enumerate(argv) if value == "-virtfs"]
    home = next(share for share in shares if "mount_tag=home" in share)
    assert home == f"local,path={path},mount_tag=home,security_model=none"


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=40))
def test_no_run_root_can_add_an_option_to_qemu(untrusted: str) -> None:
    """The console log lies under the run root, which an option names: a comma there is
    refused as well, never passed on."""
    folder = "/run/" + untrusted
    plan = dataclasses.replace(PLAN, console_log=f"{folder}/console.log")
    try:
        argv = vm.qemu_argv(plan, KERNEL, 3, "tcg")
    except QnixError as refused:
        assert "," in folder and "comma" in refused.message
        return
    assert "," not in folder
    assert argv[argv.index("-serial") + 1] == f"file:{folder}/console.log"


def test_the_accelerator_is_chosen_or_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(vm.ACCEL_ENV, "tcg")
    assert vm.accelerator() == "tcg"
    monkeypatch.setenv(vm.ACCEL_ENV, "xen")
    with pytest.raises(QnixError, match="say kvm or tcg"):
        vm.accelerator()
    monkeypatch.delenv(vm.ACCEL_ENV)
    assert vm.accelerator() == ("kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg")


def test_the_mac_is_local_unicast_and_stable() -> None:
    mac = vm.mac_address("box")
    first = int(mac.split(":")[0], 16)
    assert first & 0b10 and not first & 0b1
    assert mac == vm.mac_address("box") != vm.mac_address("bux")


def test_the_probe_boots_the_installed_kernel() -> None:
    """TCG boots everywhere; whether KVM does depends on the host, but the probe answers
    within its timeout either way instead of hanging."""
    kernel = vm.find_kernel()
    assert vm.probe(kernel, "tcg") is True
    assert vm.probe(kernel, "kvm") in (True, False)


def test_the_accelerator_is_probed_once_and_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(vm.ACCEL_ENV, raising=False)
    kernel = vm.find_kernel()
    probes: list[str] = []
    real_probe = vm.probe

    def counted(kernel: vm.Kernel, accel: str, timeout: float = vm.PROBE_TIMEOUT) -> bool:
        probes.append(accel)
        return real_probe(kernel, accel, timeout)

    monkeypatch.setattr(vm, "probe", counted)
    cache = tmp_path / "vm-accel"
    first = vm.accelerator(cache, kernel)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        assert (first, probes, cache.exists()) == ("tcg", [], False)
        return
    assert probes == ["kvm"] and cache.read_text() == f"{first}\n"
    assert vm.accelerator(cache, kernel) == first and probes == ["kvm"]  # kept, not probed


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_whatever_the_guest_sends_is_a_frame_or_the_end_of_the_link(untrusted: bytes) -> None:
    link = vmlink.Link(io.BytesIO(untrusted), io.BytesIO())  # type: ignore[arg-type]
    frames = 0
    while True:
        try:
            channel, kind, payload = link.receive()
        except vmlink.LinkError:
            break
        frames += 1
        assert vmlink.HELLO <= kind <= vmlink.LAST_KIND
        assert len(payload) <= vmlink.MAX_PAYLOAD and 0 <= channel < 1 << 32
    assert frames * vmlink.HEADER_SIZE <= len(untrusted)


def test_a_frame_says_what_it_carries() -> None:
    out = io.BytesIO()
    link = vmlink.Link(io.BytesIO(), out)  # type: ignore[arg-type]
    link.send(7, vmlink.STDOUT, b"abc")
    assert out.getvalue() == b"\x00\x00\x00\x07\x05\x00\x00\x00\x03abc"
    oversized = (1).to_bytes(4, "big") + bytes((vmlink.STDOUT,)) + (1 << 20).to_bytes(4, "big")
    with pytest.raises(vmlink.LinkError, match="malformed frame"):
        vmlink.Link(io.BytesIO(oversized), io.BytesIO()).receive()  # type: ignore[arg-type]


def sent_frames(out: io.BytesIO) -> list[tuple[int, int, bytes]]:
    link = vmlink.Link(io.BytesIO(out.getvalue()), io.BytesIO())  # type: ignore[arg-type]
    frames = []
    with contextlib.suppress(vmlink.LinkError):
        while True:
            frames.append(link.receive())
    return frames


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, vmlink.MAX_PAYLOAD)), max_size=40))
def test_an_inbox_holds_at_most_a_window_of_data_and_grants_what_is_written(
    steps: list[tuple[bool, int]],
) -> None:
    """Data beyond what was granted breaks the protocol; what is written out is granted back,
    as one CREDIT frame each (none for nothing); control frames never count."""
    out = io.BytesIO()
    inbox = vmlink.Inbox(vmlink.Link(io.BytesIO(), out), 9)  # type: ignore[arg-type]
    queued: list[tuple[int, int]] = []  # what the inbox holds, in order
    granted = []
    for arrives, size in steps:
        if arrives:
            inbox.put(vmlink.EXIT, b"x" * size)  # not data: never refused
            queued.append((vmlink.EXIT, size))
            held = sum(n for kind, n in queued if kind == vmlink.STDOUT)
            if held + size > vmlink.WINDOW:
                with pytest.raises(vmlink.LinkError, match="beyond its window"):
                    inbox.put(vmlink.STDOUT, b"o" * size)
                continue
            inbox.put(vmlink.STDOUT, b"o" * size)
            queued.append((vmlink.STDOUT, size))
        elif queued:
            kind, payload = inbox.take()
            assert (kind, len(payload)) == queued.pop(0)
            if kind == vmlink.STDOUT:
                inbox.written(len(payload))
                granted.append(len(payload))
    assert sent_frames(out) == [(9, vmlink.CREDIT, n.to_bytes(4, "big")) for n in granted if n]


def test_a_window_lets_a_sender_wait_for_credit_and_gives_up_when_closed() -> None:
    window = vmlink.Window()
    assert window.take(vmlink.WINDOW)
    results: list[bool] = []
    waiting = threading.Thread(target=lambda: results.append(window.take(10)))
    waiting.start()
    waiting.join(timeout=0.2)
    assert waiting.is_alive() and results == []  # no credit: it waits
    window.grant((9).to_bytes(4, "big"))
    waiting.join(timeout=0.2)
    assert waiting.is_alive()  # 9 bytes are not enough for 10
    window.grant((1).to_bytes(4, "big"))
    waiting.join(timeout=10)
    assert results == [True] and window.credit == 0
    waiting = threading.Thread(target=lambda: results.append(window.take(1)))
    waiting.start()
    window.close()
    waiting.join(timeout=10)
    assert results == [True, False] and not window.take(0)
