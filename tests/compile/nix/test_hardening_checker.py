"""The emitted sysctls scored by kernel-hardening-checker's sysctl checks.

The checker is not on PyPI, so its checks (for x86_64, those that a sysctl file alone decides)
are written out here: the sysctl, and the values that pass. `ABSENT` passes when the sysctl is
not set at all (the checker's "is not set" alternative). Its two `MAX` checks
(`vm.mmap_rnd_bits`, `vm.mmap_rnd_compat_bits`) need the kernel's config to know the maximum
and are left out.
"""

from __future__ import annotations

from typing import Final

import pytest

from qnix.compile.nix.hardening import CHECKER_EXCEPTIONS
from tests.compile.nix.support import trees, workstation

ABSENT: Final = None

CHECKER_SYSCTL_CHECKS: Final[dict[str, tuple[int | None, ...]]] = {
    # self protection
    "net.core.bpf_jit_harden": (2,),
    "vm.mmap_min_addr": (65536,),
    "kernel.oops_limit": (100,),
    "kernel.warn_limit": (100,),
    # security policy
    "kernel.apparmor_restrict_unprivileged_unconfined": (1, ABSENT),
    # cut attack surface
    "kernel.dmesg_restrict": (1,),
    "kernel.perf_event_paranoid": (3,),
    "dev.tty.ldisc_autoload": (0,),
    "kernel.kptr_restrict": (2,),
    "dev.tty.legacy_tiocsti": (0,),
    "user.max_user_namespaces": (0,),
    "kernel.kexec_load_disabled": (1,),
    "kernel.unprivileged_bpf_disabled": (1,),
    "vm.unprivileged_userfaultfd": (0,),
    "kernel.modules_disabled": (1,),
    "kernel.io_uring_disabled": (2,),
    "kernel.sysrq": (0,),
    # network security
    "net.ipv4.icmp_ignore_bogus_error_responses": (1,),
    "net.ipv4.icmp_echo_ignore_broadcasts": (1,),
    "net.ipv4.conf.all.accept_redirects": (0,),
    "net.ipv4.conf.default.accept_redirects": (0,),
    "net.ipv6.conf.all.accept_redirects": (0,),
    "net.ipv6.conf.default.accept_redirects": (0,),
    "net.ipv4.conf.all.accept_source_route": (0,),
    "net.ipv4.conf.default.accept_source_route": (0,),
    "net.ipv6.conf.all.accept_source_route": (0,),
    "net.ipv6.conf.default.accept_source_route": (0,),
    "net.ipv4.tcp_syncookies": (1,),
    "net.ipv6.conf.all.accept_ra": (0,),
    "net.ipv6.conf.default.accept_ra": (0,),
    # harden user space
    "fs.protected_symlinks": (1,),
    "fs.protected_hardlinks": (1,),
    "fs.protected_fifos": (2,),
    "fs.protected_regular": (2,),
    "fs.suid_dumpable": (0,),
    "kernel.randomize_va_space": (2,),
    "kernel.yama.ptrace_scope": (3,),
}


def emitted_sysctls(profile: str) -> dict[str, int]:
    hardening = trees(workstation({"hardening": profile}))["hardening"]
    sysctl = hardening["boot"]["kernel"]["sysctl"]  # type: ignore[index]
    return dict(sysctl)  # type: ignore[call-overload]


def failed_checks(sysctl: dict[str, int]) -> set[str]:
    return {
        name
        for name, passing in CHECKER_SYSCTL_CHECKS.items()
        if sysctl.get(name, ABSENT) not in passing
    }


def test_the_checklist_has_the_checkers_37_sysctl_checks() -> None:
    assert len(CHECKER_SYSCTL_CHECKS) == 37


def test_paranoid_passes_every_check_but_the_documented_exceptions() -> None:
    assert failed_checks(emitted_sysctls("paranoid")) == set(CHECKER_EXCEPTIONS)
    assert len(CHECKER_SYSCTL_CHECKS) - len(CHECKER_EXCEPTIONS) == 35


def test_strict_also_keeps_io_uring_and_a_root_only_debugger() -> None:
    assert failed_checks(emitted_sysctls("strict")) == {
        *CHECKER_EXCEPTIONS,
        "kernel.io_uring_disabled",
        "kernel.yama.ptrace_scope",
    }


@pytest.mark.parametrize("profile", ["strict", "paranoid"])
def test_the_score_counts_what_the_profile_sets(profile: str) -> None:
    # Control: without one of the settings the score drops by exactly that check.
    sysctl = emitted_sysctls(profile)
    del sysctl["vm.mmap_min_addr"]
    assert "vm.mmap_min_addr" in failed_checks(sysctl)


def test_baseline_fails_most_checks() -> None:
    assert len(failed_checks(emitted_sysctls("baseline"))) == 33
