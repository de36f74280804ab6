"""Kernel and host hardening per profile, and the host's identity.

Profiles build on each other: `strict` is `baseline` plus the Kernel Self Protection Project's
recommended sysctls and boot parameters (and the CIS network settings), `paranoid` is `strict`
plus settings that cost performance or features (no SMT, no io_uring, no ptrace at all, kernel
lockdown, panic on oops).

kernel-hardening-checker's sysctl checks are the yardstick: `paranoid` passes every one of them
but the two in `CHECKER_EXCEPTIONS`, `strict` every one but those and the two paranoid settings.
"""

from __future__ import annotations

from typing import Final

from qnix.compile.nix.printer import NixValue
from qnix.spec.model import NETWORK_NONE, NETWORK_UPLINK, Hardening, Workstation

BASELINE_SYSCTL: Final[dict[str, int]] = {
    "kernel.dmesg_restrict": 1,
    "kernel.kptr_restrict": 2,
    "net.ipv4.tcp_syncookies": 1,
}
STRICT_SYSCTL: Final[dict[str, int]] = {
    "dev.tty.ldisc_autoload": 0,
    "dev.tty.legacy_tiocsti": 0,
    "fs.protected_fifos": 2,
    "fs.protected_hardlinks": 1,
    "fs.protected_regular": 2,
    "fs.protected_symlinks": 1,
    "fs.suid_dumpable": 0,
    "kernel.kexec_load_disabled": 1,
    # Past this many oopses or warnings the kernel panics: an exploit that keeps trying
    # (each miss an oops) is stopped, a single bug does not take the machine down.
    "kernel.oops_limit": 100,
    "kernel.perf_event_paranoid": 3,
    "kernel.randomize_va_space": 2,
    "kernel.sysrq": 0,
    "kernel.unprivileged_bpf_disabled": 1,
    "kernel.warn_limit": 100,
    # Only root may attach to a process: no compartment needs a debugger on the host.
    "kernel.yama.ptrace_scope": 2,
    "net.core.bpf_jit_harden": 2,
    "net.ipv4.conf.all.accept_redirects": 0,
    "net.ipv4.conf.all.accept_source_route": 0,
    "net.ipv4.conf.all.log_martians": 1,
    "net.ipv4.conf.all.secure_redirects": 0,
    "net.ipv4.conf.all.send_redirects": 0,
    "net.ipv4.conf.default.accept_redirects": 0,
    "net.ipv4.conf.default.accept_source_route": 0,
    "net.ipv4.conf.default.log_martians": 1,
    "net.ipv4.conf.default.secure_redirects": 0,
    "net.ipv4.conf.default.send_redirects": 0,
    "net.ipv4.icmp_echo_ignore_broadcasts": 1,
    "net.ipv4.icmp_ignore_bogus_error_responses": 1,
    "net.ipv6.conf.all.accept_ra": 0,
    "net.ipv6.conf.all.accept_redirects": 0,
    "net.ipv6.conf.all.accept_source_route": 0,
    # The kernel ignores router advertisements; NetworkManager, systemd-networkd and dhcpcd
    # take them in user space and configure IPv6 themselves.
    "net.ipv6.conf.default.accept_ra": 0,
    "net.ipv6.conf.default.accept_redirects": 0,
    "net.ipv6.conf.default.accept_source_route": 0,
    # No mapping below 64 KiB: a kernel NULL dereference cannot reach user-controlled memory.
    "vm.mmap_min_addr": 65536,
    "vm.unprivileged_userfaultfd": 0,
}
PARANOID_SYSCTL: Final[dict[str, int]] = {
    "kernel.io_uring_disabled": 2,
    "kernel.yama.ptrace_scope": 3,
}
# The checker's sysctls no profile sets, and why.
CHECKER_EXCEPTIONS: Final[dict[str, str]] = {
    "user.max_user_namespaces": (
        "0 would forbid user namespaces, which namespace compartments (bubblewrap) and"
        " container compartments (nspawn's private users) are made of"
    ),
    "kernel.modules_disabled": (
        "set to 1 at run time by NixOS's security.lockKernelModules once the boot has loaded"
        " its modules; as a boot-time sysctl it would stop the boot loading them"
    ),
}

STRICT_KERNEL_PARAMS: Final = (
    "slab_nomerge",
    "init_on_alloc=1",
    "init_on_free=1",
    "page_alloc.shuffle=1",
    "randomize_kstack_offset=on",
    "vsyscall=none",
    "debugfs=off",
)
PARANOID_KERNEL_PARAMS: Final = ("lockdown=confidentiality", "module.sig_enforce=1", "oops=panic")
# vsyscall exists on x86 only; elsewhere the kernel would hand the word on to init.
X86_ONLY_PARAMS: Final = frozenset({"vsyscall=none"})

# Reverse-path filtering: strict, unless replies come back through a net compartment. Those
# carry the far end's address on the net compartment's link, which a strict filter drops.
RP_FILTER_STRICT = 1
RP_FILTER_LOOSE = 2


def behind_net_compartment(ws: Workstation) -> bool:
    """Whether any compartment or disposable template routes through a net compartment."""
    bodies = [*ws.compartments.values(), *ws.disposable_templates.values()]
    return any(body.network not in (NETWORK_NONE, NETWORK_UPLINK) for body in bodies)


def sysctls(ws: Workstation) -> dict[str, int]:
    profile: Hardening = ws.host.hardening
    values = dict(BASELINE_SYSCTL)
    if profile in ("strict", "paranoid"):
        values.update(STRICT_SYSCTL)
        rp_filter = RP_FILTER_LOOSE if behind_net_compartment(ws) else RP_FILTER_STRICT
        values["net.ipv4.conf.all.rp_filter"] = rp_filter
        values["net.ipv4.conf.default.rp_filter"] = rp_filter
    if profile == "paranoid":
        values.update(PARANOID_SYSCTL)
    return dict(sorted(values.items()))


def kernel_params(ws: Workstation) -> list[str]:
    profile = ws.host.hardening
    params: list[str] = []
    if profile in ("strict", "paranoid"):
        params += STRICT_KERNEL_PARAMS
    if profile == "paranoid":
        params += PARANOID_KERNEL_PARAMS
    if ws.host.system != "x86_64-linux":
        params = [p for p in params if p not in X86_ONLY_PARAMS]
    return params


def hardening_module(ws: Workstation) -> dict[str, NixValue]:
    profile = ws.host.hardening
    locked = profile in ("strict", "paranoid")
    boot: dict[str, NixValue] = {"kernel": {"sysctl": dict(sysctls(ws))}}
    params = kernel_params(ws)
    if params:
        boot["kernelParams"] = list(params)
    if locked:
        boot["kexec"] = {"enable": False}

    security: dict[str, NixValue] = {}
    if profile == "paranoid":
        security["allowSimultaneousMultithreading"] = False
    if locked:
        apparmor: dict[str, NixValue] = {"enable": True}
        if profile == "paranoid":
            apparmor["killUnconfinedConfinables"] = True
        security["apparmor"] = apparmor
        security["lockKernelModules"] = True
    # Protecting the running kernel image rules out hibernation, so a spec that asks to
    # hibernate on lid close keeps it.
    security["protectKernelImage"] = ws.host.desktop.lid_switch != "hibernate"

    return {
        "boot": boot,
        "networking": {"hostName": ws.host.hostname},
        "nixpkgs": {"hostPlatform": ws.host.system},
        "security": security,
        "system": {"stateVersion": ws.host.state_version},
        "time": {"timeZone": ws.host.timezone},
    }
